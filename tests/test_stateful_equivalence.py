"""Popek & Goldberg's equivalence property over generated guest programs: one
program run under native, shadow, shadow-oos, PV unbatched, PV batched and HAP gives
the guest identical results — every value it loads, every page fault it receives
(CR2 and error code), and its leaf entries read back with their Accessed/Dirty flags.
Only the accounting may differ.

The six runs advance in lock step, one guest operation at a time, and are compared
after every step, so a divergence is reported at the operation that caused it. Each
hypervisor mode's own safety invariant is checked after every step as well.

A failing sequence shrinks to a short list of ``state.step(op=...)`` calls; the ops
are plain values, so the list pastes into ``tests/test_stateful_regressions.py`` as a
program for :func:`stateful_support.run_program` (docs/stateful.md).
"""

import hypothesis.strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from refmodel.guest.kernel import as_stored_by
from refmodel.guest.ops import Mode
from refmodel.hv.modes import ModeSpec, standard_specs
from stateful_support import (
    GuestOp,
    GuestRun,
    PvBatchMonitor,
    allow_self_mapping,
    backend_problems,
    coherence_problems,
    guest_ops,
    machine_settings,
    record_of,
)


class EquivalenceMachine(RuleBasedStateMachine):
    """Six runs of one guest program, compared after every operation."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[GuestRun] = []

    @initialize(batch_size=st.sampled_from((2, 5, 32)), tagged=st.booleans(), self_mapping=st.booleans())
    def boot(self, batch_size: int, tagged: bool, self_mapping: bool) -> None:
        """Native first: the reference every other mode is compared with. A
        self-mapping program (raw PTE writes mapping the guest's own page tables)
        runs under the fully virtualized modes only: a PV guest cannot map a page
        table writable, and its tables hold machine frame numbers."""
        self.monitor = PvBatchMonitor()
        self.monitor.install()
        specs = standard_specs(batch_size=batch_size, tagged=tagged)
        if self_mapping:
            specs = [ModeSpec(Mode.NATIVE, tagged=False)] + [s for s in specs[1:] if s.mode is not Mode.PV]
        self.runs = [GuestRun(spec) for spec in specs]
        for run in self.runs:
            if self_mapping:
                allow_self_mapping(run.kernel)

    def teardown(self) -> None:
        monitor = getattr(self, "monitor", None)
        if monitor is not None:
            monitor.uninstall()

    @rule(op=guest_ops(self_mapping=True))
    def step(self, op: GuestOp) -> None:
        applied = {run.spec.label: run.apply(op) for run in self.runs}
        assert len(set(applied.values())) == 1, f"modes disagree on whether {op} could run: {applied}"

    @invariant()
    def guest_sees_the_same_everywhere(self) -> None:
        if not self.runs:
            return
        native = record_of(self.runs[0].kernel)
        for run in self.runs[1:]:
            other = record_of(run.kernel)
            label = run.spec.label
            assert other.observations == native.observations, _first_difference(label, other.observations, native.observations)
            expected = as_stored_by(native.page_tables, run.backend)
            assert other.page_tables == expected, f"{label}: page tables differ from native's as its mode stores them"

    @invariant()
    def every_mode_is_safe(self) -> None:
        for run in self.runs[1:]:
            problems = backend_problems(run.backend)
            assert not problems, f"{run.spec.label}: " + "; ".join(problems[:5])

    @invariant()
    def hardware_grants_no_more_than_the_guest(self) -> None:
        """The kernel has made its invalidations: TLB and shadows are coherent."""
        for run in self.runs:
            problems = coherence_problems(run.backend)
            assert not problems, f"{run.spec.label}: " + "; ".join(problems[:5])


def _first_difference(label: str, got: tuple[object, ...], want: tuple[object, ...]) -> str:
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return f"{label}: observation {i} is {a}, native saw {b}"
    return f"{label}: {len(got)} observations, native has {len(want)}"


TestEquivalence = EquivalenceMachine.TestCase
TestEquivalence.settings = machine_settings(examples=40, steps=30)
