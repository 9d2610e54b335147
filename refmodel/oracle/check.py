"""Compare the observations an implementation recorded with the model.

The rule (docs/oracle.md, "The check"). The checker follows every state the
implementation could be in. It starts with the trace's initial state; for each
operation it asks each state for every outcome the architecture allows
(:meth:`refmodel.oracle.replay.Model.outcomes`: the model's own run, a fresh walk,
each translation a legal TLB may still hold, each spurious #PF) and keeps the
outcomes whose observation agrees with the recorded one. An operation recorded
without an observation keeps every outcome. States that no later operation can tell
apart are merged; at most :data:`MAX_STATES` are followed.

The first operation for which no state has an agreeing outcome is the divergence:
its index, line, the operation, what was recorded and what the model allows.

Agreement: ``result`` must be equal; every other field the recording carries must
equal the model's (a field the recording leaves out is not compared). Counters are
compared only if recorded, and then only the names recorded (an unnamed counter is
not compared, a named one the model did not count must be 0).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field, replace

from .replay import Model, Outcome, build_model, run_step, step_outcomes
from ..errors import RefmodelError
from .trace import Fetch, Observation, Read, Step, Trace, TraceError, Write, dumps_line, op_json

#: How many indistinguishable-so-far states the checker follows at most.
MAX_STATES = 64


def agrees(recorded: Observation, model: Observation) -> bool:
    """Whether a recorded observation agrees with one the model allows."""
    for name in recorded.recorded():
        if name == "counters":
            counted = dict(model.counters or ())
            if any(counted.get(key, 0) != n for key, n in recorded.counters or ()):
                return False
        elif getattr(recorded, name) != getattr(model, name):
            return False
    return True


@dataclass(frozen=True)
class Divergence:
    """The first operation whose recorded observation the model does not allow."""

    index: int  #: 0-based operation index
    step: Step
    recorded: Observation
    allowed: tuple[tuple[Observation, str], ...]  #: (observation, how), distinct
    previous: Step | None  #: the operation before, for context

    def describe(self) -> str:
        where = f" (trace line {self.step.line})" if self.step.line else ""
        lines = [f"divergence at operation {self.index}{where}: {dumps_line(op_json(self.step.op))}"]
        if self.step.note:
            lines.append(f"  note: {self.step.note}")
        if self.previous is not None:
            lines.append(f"  after: {dumps_line(op_json(self.previous.op))}")
        lines.append(f"  recorded: {dumps_line(self.recorded.to_json())}")
        for obs, how in self.allowed:
            lines.append(f"  allowed:  {dumps_line(_comparable(obs, self.recorded).to_json())}  ({how})")
        return "\n".join(lines)


def _comparable(model: Observation, recorded: Observation) -> Observation:
    """The model's observation restricted to counters the recording named."""
    if recorded.counters is None:
        return model.without_counters()
    named = {k for k, _ in recorded.counters}
    counted = dict(model.counters or ())
    return replace(model, counters=tuple((k, counted.get(k, 0)) for k in sorted(named)))


@dataclass
class CheckResult:
    """The outcome of a check: clean, or the first divergence."""

    operations: int
    compared: int  #: operations with a recorded observation
    divergence: Divergence | None = None
    max_states: int = 1  #: the most states followed at once
    truncated: bool = False  #: more than MAX_STATES were possible at some point
    #: operation index -> the distinct observations (without counters) allowed there,
    #: for operations where the TLB rules allow more than one
    ambiguous: dict[int, tuple[Observation, ...]] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return self.divergence is None

    def summary(self) -> str:
        if self.divergence is not None:
            return self.divergence.describe()
        text = f"ok: {self.operations} operations, {self.compared} observations agree with the model"
        if self.max_states > 1:
            text += f" (up to {self.max_states} states allowed by the TLB rules were followed)"
        if self.truncated:
            text += f"; warning: more than {MAX_STATES} states were possible, some were not followed"
        return text


def _merge(outcomes: list[Outcome], look: bool = True) -> tuple[list[Model], bool]:
    """Distinct states, first occurrence kept, at most MAX_STATES. With ``look``
    false the states are kept as they are, unmerged (telling states apart costs a
    walk over each whole machine; following two equal states is only slower)."""
    if len(outcomes) == 1 or (not look and len(outcomes) <= MAX_STATES):
        return [o.model for o in outcomes], False
    seen: set[Hashable] = set()
    models: list[Model] = []
    for out in outcomes:
        key = out.model.fingerprint()
        if key not in seen:
            seen.add(key)
            models.append(out.model)
    return models[:MAX_STATES], len(models) > MAX_STATES


def _distinct(outcomes: list[Outcome], recorded: Observation | None) -> tuple[tuple[Observation, str], ...]:
    seen: set[Observation] = set()
    out: list[tuple[Observation, str]] = []
    for o in outcomes:
        key = o.obs if recorded is None else _comparable(o.obs, recorded)
        if key not in seen:
            seen.add(key)
            out.append((o.obs, o.how))
    return tuple(out)


def _outcomes(model: Model, step: Step) -> list[Outcome]:
    """The allowed outcomes of one step; an operation with only one (anything but
    an access) runs on the state itself, without a copy."""
    if model.may_branch(step.op):
        return step_outcomes(model, step)
    return [Outcome(run_step(model, step), model, "the model")]


def check(trace: Trace) -> CheckResult:
    """Check every recorded observation of ``trace`` against the model; a trace the
    model cannot run is a :class:`TraceError` naming the line."""
    try:
        return _check(trace)
    except TraceError as err:
        raise err.with_source(trace.source) from None
    except RefmodelError as err:
        raise TraceError(1, None, f"the model cannot build this initial state: {err}", trace.source) from None


def _check(trace: Trace) -> CheckResult:
    states: list[Model] = [build_model(trace.header)]
    result = CheckResult(operations=len(trace.steps), compared=0)
    previous: Step | None = None
    for index, step in enumerate(trace.steps):
        outcomes = [o for model in states for o in _outcomes(model, step)]
        distinct = tuple(dict.fromkeys(o.obs.without_counters() for o in outcomes))
        if len(distinct) > 1:
            result.ambiguous[index] = distinct
        if step.obs is not None:
            result.compared += 1
            matching = [o for o in outcomes if agrees(step.obs, o.obs)]
            if not matching:
                result.divergence = Divergence(index, step, step.obs, _distinct(outcomes, step.obs), previous)
                return result
            outcomes = matching
        # States become equal again through an operation that drops what told them
        # apart (a flush, a hypercall, a write of a table); an access that did not
        # branch rarely does, so merging is only tried after the others.
        branched = len(outcomes) > len(states)
        states, truncated = _merge(outcomes, look=branched or not isinstance(step.op, (Read, Write, Fetch)))
        result.truncated = result.truncated or truncated
        result.max_states = max(result.max_states, len(states))
        previous = step
    return result
