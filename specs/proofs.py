"""The proof obligations and their runner.

For every transition T and invariant I (a *cell* of the table), and every clause C
of I's inductive core::

    Config(s) ∧ Core(s) ∧ T.ok(s, args) ∧ T.choice(s, args) ⇒ C(T.post(s, args))

for all states ``s`` and inputs ``args`` — Z3 is asked for a state and inputs that
violate it, and must answer *unsat*. ``Core`` is the conjunction of every
invariant's core; a failed transition (an error return) leaves the state unchanged
and needs no proof. A cell whose post-state clauses are the very terms of the
pre-state (the transition rewrites nothing the invariant reads) is marked
*unaffected*; it is proved all the same.

Each clause is first tried from ``Config ∧ Core_I`` alone (one short attempt:
most clauses follow from their own invariant), then from the full ``Core``.

Per invariant, one lemma: ``Config ∧ Core ⇒ Statement_I`` for all states.

No bound is used: every quantifier ranges over the full index sorts (2^40 frames,
2^49 entry addresses, 2^16 TLB slots, 2^8 vCPUs, 2^5 registers, 2^16 domains).
"""

import multiprocessing
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from . import transitions as T
from .invariants import INVARIANTS, Invariant, all_core, by_name, config
from .prover import QUICK, Answer, prove
from .state import FIELD_NAMES, fresh
from .steps import Transition

#: Components no transition may change (the configuration the invariants assume).
CONFIG_FIELDS = ("tagged", "vcpu_dom", "vcpu_vpid", "vcpu_pge", "dom_mode", "owner")


@dataclass(frozen=True)
class Cell:
    """One (transition, invariant) pair."""

    transition: str
    invariant: str
    status: str
    seconds: float
    unaffected: bool
    failed_clause: str = ""
    cpu: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "proved"


def prove_cell(transition: Transition, invariant: Invariant) -> Cell:
    """Prove that ``transition`` preserves every clause of ``invariant``'s core. A
    clause the transition leaves syntactically identical is proved from itself
    alone (still a Z3 query)."""
    s = fresh("s")
    args = transition.fresh_args()
    step = transition.apply(s, args)
    base = [c for _, c in config(s)] + [step.ok, step.choice]
    own = base + [c for _, c in invariant.core(s)]
    every = base + [c for _, c in all_core(s)]
    pre = dict(invariant.core(s))
    total = cpu = 0.0
    unaffected = True
    for name, clause in invariant.core(step.post):
        same = clause.eq(pre[name])
        unaffected = unaffected and same
        tag = f"{transition.name}.{name}"
        if same:
            answer = prove([pre[name]], clause, tag)
        else:
            # the invariant's own core usually suffices; one short try, then all cores
            answer = prove(own, clause, tag, QUICK)
            if answer.status != "proved":
                total, cpu = total + answer.seconds, cpu + answer.cpu
                answer = prove(every, clause, tag)
        total, cpu = total + answer.seconds, cpu + answer.cpu
        if answer.status != "proved":
            return Cell(transition.name, invariant.name, answer.status, total, False, name, cpu)
    return Cell(transition.name, invariant.name, "proved", total, unaffected, cpu=cpu)


def prove_lemma(invariant: Invariant) -> Answer:
    """``Config ∧ Core ⇒ Statement``: the core really implies the invariant's statement."""
    s = fresh("s")
    hyps = [c for _, c in config(s)] + [c for _, c in all_core(s)]
    return prove(hyps, invariant.semantic(s), f"{invariant.name}.statement")


def config_untouched(transition: Transition) -> list[str]:
    """Configuration components the transition rewrites (must be none)."""
    s = fresh("s")
    post = transition.apply(s, transition.fresh_args()).post
    return [f for f in CONFIG_FIELDS if f in FIELD_NAMES and not getattr(post, f).eq(getattr(s, f))]


@dataclass(frozen=True)
class Report:
    """Every cell and lemma, and the wall-clock time the whole run took."""

    cells: tuple[Cell, ...]
    lemmas: tuple[tuple[str, Answer], ...]
    seconds: float
    workers: int = 1

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.cells) and all(o.status == "proved" for _, o in self.lemmas)

    def cell(self, transition: str, invariant: str) -> Cell:
        for c in self.cells:
            if c.transition == transition and c.invariant == invariant:
                return c
        raise KeyError((transition, invariant))


Task = tuple[str, str]  #: (transition name, invariant name); "" as transition: the lemma


def _run_task(task: Task) -> Cell | tuple[str, Answer]:
    """One cell or one lemma, by name (so that a worker process can run it)."""
    transition, invariant = task
    inv = by_name(invariant)
    if not transition:
        return invariant, prove_lemma(inv)
    return prove_cell(T.by_name(transition), inv)


def _ignore(result: Cell | tuple[str, Answer]) -> None:
    """The default ``on_result``: nothing."""


def run(
    transitions: Iterable[Transition] | None = None,
    invariants: Iterable[Invariant] | None = None,
    workers: int = 1,
    on_result: Callable[[Cell | tuple[str, Answer]], None] | None = None,
) -> Report:
    """Prove every cell and every lemma, on ``workers`` processes (each with its own
    Z3 context; cells are handed out one at a time, the heaviest first).
    ``on_result`` is told each cell and each lemma ``(invariant, answer)`` as it
    finishes (``refmodel verify`` shows progress with it)."""
    tell = on_result if on_result is not None else _ignore
    ts = tuple(transitions) if transitions is not None else T.TRANSITIONS
    invs = tuple(invariants) if invariants is not None else INVARIANTS
    tasks: list[Task] = [(t.name, i.name) for t in ts for i in invs] + [("", i.name) for i in invs]
    tasks.sort(key=lambda task: (task[0] not in HEAVY, task[0] == ""))
    start = time.perf_counter()
    results: list[Cell | tuple[str, Answer]] = []
    if workers <= 1:
        for t in tasks:
            results.append(_run_task(t))
            tell(results[-1])
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers) as pool:
            for result in pool.imap_unordered(_run_task, tasks, chunksize=1):
                results.append(result)
                tell(result)
    seconds = time.perf_counter() - start
    cells = {(c.transition, c.invariant): c for c in results if isinstance(c, Cell)}
    lemmas = dict(r for r in results if not isinstance(r, Cell))
    ordered = tuple(cells[(t.name, i.name)] for i in invs for t in ts)
    return Report(ordered, tuple((i.name, lemmas[i.name]) for i in invs), seconds, max(workers, 1))


#: Transitions whose cells take longest (memory rewritten through lambdas): started
#: first so that two workers finish together.
HEAVY = frozenset({"shadow_emulate_write", "ept_update", "pv_update_va_mapping", "pv_mmu_update_l1", "ad_update",
                   "pv_mmu_update_upper", "guest_store", "tlb_fill_hap"})
