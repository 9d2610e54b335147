"""Negative controls: a deliberately broken transition per invariant.

Each control removes one check the real transition makes — the ownership check of
``get_page_from_l1e``, the writable-type check that keeps page tables read-only, the
write protection of shadowed page tables, the TLB flush of an untagged context
switch, the restore of one register — and must yield a Z3 counterexample: a state
satisfying every invariant (over a :mod:`bounded <specs.bounded>` state) that the
broken step takes to one violating the control's invariant. The correct transition
is refuted on the same query (no counterexample), so the check the control removes
is what the invariant rests on.

The model is then turned into a concrete operation sequence (:mod:`specs.replay`):
a machine and domains set up through the model's own interfaces, and the broken step
with the values the counterexample chose (the entry index and flags, which frame —
another domain's, Xen's, a page table — the new entry points at, which register
differs). The tests replay it on the Python model with the same defect injected
(a monkeypatch, in the test only) and see the violation with the concrete twin from
:mod:`refmodel.hv.invariants`.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import z3

from . import pv, shadow, vcpu
from . import words as w
from .bounded import Bounds, bounded, one_of
from .invariants import all_core, by_name, config
from .replay import Op, op
from .state import DomMode, PageType, State, with_fields
from .steps import Step, Transition
from .transitions import by_name as transition
from .words import Expr

RW = 1 << w.RW
PTE_ALLOWED = (1 << w.P) | RW | (1 << w.US) | (1 << w.A) | (1 << w.D) | (1 << 63)


# -- the broken transitions ------------------------------------------------------------------------


def _l1_update(
    s: State, a: dict[str, Expr], entry_ok: Callable[[State, Expr, Expr], Expr], writable_type: bool = True
) -> Step:
    """``pv_mmu_update_l1`` with ``get_page_from_l1e`` replaced by ``entry_ok``
    (and, if not ``writable_type``, no writable type taken by an RW target)."""
    a = pv.without_tables(a)
    table, index, value = a["table"], a["index"], a["value"]
    old = s.mem[w.key(table, index)]
    l1_ok = z3.Or(
        z3.Not(w.present(value)),
        z3.And(pv.l1_flags_ok(value), z3.Or(pv.fast_path(old, value), entry_ok(s, value, s.cur_dom))),
    )
    ok = z3.And(pv._mmu_update_guard(s, a), s.validated[table], s.ptype[table] == pv.L1_T, l1_ok)
    post, choice = pv.with_types(s, a, z3.Store(s.mem, w.key(table, index), value))
    t = w.target(value)
    writable = z3.And(w.present(value), z3.Not(pv.fast_path(old, value)), w.writable(value))
    if writable_type:
        choice = z3.And(choice, z3.Implies(writable, z3.Or(s.ptype[t] == pv.WRITABLE_T, a["wr"][t])))
    return Step(ok=ok, post=post, choice=choice)


def _writable_ok(s: State, e: Expr) -> Expr:
    t = w.target(e)
    return z3.Implies(w.writable(e), z3.Or(s.ptype[t] == pv.WRITABLE_T, z3.Not(s.validated[t])))


def l1_update_without_owner_check(s: State, a: dict[str, Expr]) -> Step:
    """mmu_update of an L1 entry whose ``get_page_from_l1e`` forgets to check that
    the frame belongs to the caller."""
    return _l1_update(s, a, lambda st, e, dom: _writable_ok(st, e))


def l1_update_accepting_xen_frames(s: State, a: dict[str, Expr]) -> Step:
    """mmu_update of an L1 entry that takes a frame owned by Xen for one of the
    caller's (as if every Xen page were shared with guests)."""
    return _l1_update(
        s, a, lambda st, e, dom: z3.And(z3.Or(st.owner[w.target(e)] == dom, st.owner[w.target(e)] == w.dom_val(w.DOMID_XEN)), _writable_ok(st, e))
    )


def l1_update_without_writable_type(s: State, a: dict[str, Expr]) -> Step:
    """mmu_update of an L1 entry that allows a writable mapping of any frame of the
    caller — a page table included (no writable type reference is taken)."""
    return _l1_update(s, a, lambda st, e, dom: st.owner[w.target(e)] == dom, writable_type=False)


def emulate_write_without_write_protection(s: State, a: dict[str, Expr]) -> Step:
    """The shadow code's emulated page-table write, propagating a leaf writable
    even when it maps a write-protected guest page table."""

    def forgetful(st: State, dom: Expr, ge: Expr) -> Expr:
        return shadow.propagate_l1(with_fields(st, gpt=z3.K(w.FrameS, z3.BoolVal(False))), dom, ge)

    return shadow.emulate_write(s, a, forgetful)


def switch_without_flush(s: State, a: dict[str, Expr]) -> Step:
    """A context switch that neither flushes the TLB nor has distinct tags (an
    untagged TLB kept across the switch)."""
    step = vcpu.context_switch(s, a)
    return replace(step, post=with_fields(step.post, tlb_valid=s.tlb_valid))


def switch_forgetting_a_register(s: State, a: dict[str, Expr]) -> Step:
    """A context switch that restores every register but RAX, which keeps the
    outgoing vCPU's value."""
    step = vcpu.context_switch(s, a)
    rax = z3.BitVecVal(0, w.REG_BITS)
    return replace(step, post=with_fields(step.post, regs=z3.Store(step.post.regs, rax, s.regs[rax])))


def get_type_without_flush(s: State, a: dict[str, Expr]) -> Step:
    """Taking a page-table type without the type-change TLB flush: a frame that was
    writably mapped becomes a page table while the TLB still holds the writable
    mapping."""
    step = pv.pv_get_type(s, a)
    keep_all = with_fields(step.post, tlb_valid=s.tlb_valid)
    return Step(ok=step.ok, post=keep_all, choice=pv.validation_choice(s, a["n"], a["wr"], s.cur_dom))


# -- the controls ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Control:
    """A negative control: the invariant and clause it must break, the correct and
    the broken transition, how to bound the search, and how to make ops of a model."""

    name: str
    invariant: str
    clause: str
    correct: str  #: the transition it breaks
    broken: Callable[[State, dict[str, Expr]], Step]
    assume: Callable[[State, dict[str, Expr]], list[Expr]]
    concretize: Callable[[z3.ModelRef, State, dict[str, Expr]], "Scenario"]
    bounds: Bounds = Bounds()

    @property
    def defect(self) -> str:
        return (self.broken.__doc__ or "").strip()

    @property
    def transition(self) -> Transition:
        return replace(transition(self.correct), name=f"{self.correct} (broken)", apply=self.broken, broken=True)


@dataclass(frozen=True)
class Scenario:
    """A concrete operation sequence: the set-up, the broken step, and what the
    counterexample chose (for the report)."""

    setup: tuple[Op, ...]
    step: Op
    facts: tuple[tuple[str, str], ...]

    @property
    def ops(self) -> tuple[Op, ...]:
        return (*self.setup, self.step)


@dataclass(frozen=True)
class Found:
    control: Control
    found: bool
    seconds: float
    correct_refuted: bool
    scenario: Scenario | None


B = Bounds()
#: Bounds for the shadow control: one vCPU, one entry per frame.
SHADOW_BOUNDS = Bounds(frames=(0x11, 0x12, 0x13), indices=(0,), slots=(0,), vcpus=(0,), regs=(0,), doms=(1,))
#: Bounds for the PV controls: one vCPU, three frames, one entry each.
PV_BOUNDS = Bounds(frames=(0x11, 0x12, 0x13), indices=(0,), slots=(0,), vcpus=(0,), regs=(0,))


def _in(e: Expr, values: tuple[int, ...], bits: int) -> Expr:
    return one_of(e, values, bits)


def _entry_args(s: State, a: dict[str, Expr]) -> list[Expr]:
    return [_in(a["table"], PV_BOUNDS.frames, w.FRAME_BITS), _in(a["index"], PV_BOUNDS.indices, w.INDEX_BITS)]


# -- scenarios: the concrete set-ups ------------------------------------------------------------------------

PV_TREE = {"l4": 0, "l3": 1, "l2": 2, "l1": 3}
PV_DATA = (4, 5, 6, 7)
TABLE_FLAGS = (1 << w.P) | RW | (1 << w.US) | (1 << w.A)
DATA_FLAGS = TABLE_FLAGS | (1 << w.D)


def _f(gfn: int) -> tuple[str, int, int]:
    """Domain 1's guest frame ``gfn``."""
    return ("frame", 1, gfn)


def pv_setup(other_mode: str = "pv") -> tuple[Op, ...]:
    """Domain 1, PV, running on a four-level tree (L4 in gfn 0 .. L1 in gfn 3) that
    maps gfns 4..7 writable at linear pages 0..3, pinned and loaded; domain 2 beside
    it; one write through the first page (a TLB fill)."""
    ops = [
        op("machine", frames=96, xen_frames=16),
        op("domain", domid=1, mode="pv", pages=10, tagged=True),
        op("domain", domid=2, mode=other_mode, pages=4, tagged=True),
        op("pv_mmu_update", domid=1, table=_f(0), index=0, target=_f(1), flags=TABLE_FLAGS),
        op("pv_mmu_update", domid=1, table=_f(1), index=0, target=_f(2), flags=TABLE_FLAGS),
        op("pv_mmu_update", domid=1, table=_f(2), index=0, target=_f(3), flags=TABLE_FLAGS),
    ]
    ops += [op("pv_mmu_update", domid=1, table=_f(3), index=i, target=_f(g), flags=DATA_FLAGS) for i, g in enumerate(PV_DATA)]
    ops += [
        op("pv_mmuext", domid=1, cmd=3, frame=_f(0)),  # MMUEXT_PIN_L4_TABLE
        op("pv_mmuext", domid=1, cmd=5, frame=_f(0)),  # MMUEXT_NEW_BASEPTR
        op("touch", domid=1, va=0, write=True, value=0x1000),
    ]
    return tuple(ops)


def _val(m: z3.ModelRef, e: Expr) -> int:
    return int(m.eval(e, model_completion=True).as_long())


def _flags_of(m: z3.ModelRef, value: Expr) -> int:
    """The counterexample's entry flags, kept to the bits a guest may set."""
    return _val(m, value) & PTE_ALLOWED


def target_role(m: z3.ModelRef, s: State, value: Expr) -> tuple[tuple[str, int] | tuple[str, int, int], str]:
    """Which concrete frame plays the part of the counterexample's target: by its
    owner — Xen, nobody, another domain, or the writer itself (then a page table of
    its tree if the frame is typed as one)."""
    t = w.target(value)
    owner, me = _val(m, s.owner[t]), _val(m, s.cur_dom)
    if owner == w.DOMID_XEN:
        return ("xen", 5), "a frame owned by Xen"
    if owner == w.DOMID_INVALID:
        return ("free", 0), "a frame nobody owns"
    if owner != me:
        return ("frame", 2, 1), f"a frame of another domain ({owner:#x}; the writer is {me:#x})"
    kind = _val(m, s.ptype[t])
    if z3.is_true(m.eval(s.validated[t], model_completion=True)) and 1 <= kind <= 4:
        return ("frame", 1, PV_TREE[f"l{kind}"]), f"the writer's own L{kind} page table"
    return ("frame", 1, PV_DATA[-1]), "a frame of the writer"


def _pv_entry_scenario(m: z3.ModelRef, s: State, a: dict[str, Expr]) -> Scenario:
    """The set-up of :func:`pv_setup`, then the counterexample's update: an entry of
    the running domain's L1 (one the set-up left free), with the model's flags,
    pointing at the frame playing the model's target."""
    target, what = target_role(m, s, a["value"])
    index = 4 + _val(m, a["index"])
    flags = _flags_of(m, a["value"]) | (1 << w.P)
    step = op("pv_mmu_update", domid=1, table=("frame", 1, PV_TREE["l1"]), index=index, target=target, flags=flags)
    facts = (
        ("written table", "a validated L1 of the running domain"),
        ("new entry", f"{_val(m, a['value']):#x}, mapping {what}"),
        ("entry flags", f"{flags:#x}"),
    )
    return Scenario(pv_setup(), step, facts)


def _pv_l1_assume(s: State, a: dict[str, Expr]) -> list[Expr]:
    return [*_entry_args(s, a), s.is_mode(s.cur, DomMode.PV)]


def _shadow_scenario(m: z3.ModelRef, s: State, a: dict[str, Expr]) -> Scenario:
    """A shadow-mode domain whose guest kernel mapped and touched pages (so its tables
    are shadowed); the guest then writes an L1 entry mapping one of its own page
    tables, writable, with the flags the counterexample chose."""
    from .replay import op as mk

    flags = (_val(m, a["value"]) & PTE_ALLOWED) | (1 << w.P) | RW | (1 << w.A) | (1 << w.D)
    setup = (
        mk("machine", frames=96, xen_frames=32),
        mk("domain", domid=1, mode="shadow", pages=12, tagged=True),
        *shadow_guest_tree(1),
        mk("touch", domid=1, va=0, write=True, value=0x22),
    )
    step = mk("write_pte", domid=1, gfn=SH_TREE["l1"], index=5, level=1, target_gfn=SH_TREE["l2"], flags=flags)
    facts = (
        ("written table", "a shadowed guest L1 (write-protected: the store traps and is emulated)"),
        ("new entry", f"{_val(m, a['value']):#x}: maps a frame that is itself a shadowed guest page table"),
        ("entry flags", f"{flags:#x}"),
    )
    return Scenario(setup, step, facts)


SH_TREE = {"l4": 0, "l3": 1, "l2": 2, "l1": 3}


def shadow_guest_tree(domid: int) -> tuple[Op, ...]:
    """A guest's own four-level tree in gfns 0..3 mapping gfns 4..7 at linear pages
    0..3, written while its frames are plain memory, then loaded into CR3 (which
    shadows it)."""
    ops = [
        op("write_pte", domid=domid, gfn=0, index=0, level=4, target_gfn=1, flags=TABLE_FLAGS),
        op("write_pte", domid=domid, gfn=1, index=0, level=3, target_gfn=2, flags=TABLE_FLAGS),
        op("write_pte", domid=domid, gfn=2, index=0, level=2, target_gfn=3, flags=TABLE_FLAGS),
    ]
    ops += [op("write_pte", domid=domid, gfn=3, index=i, level=1, target_gfn=g, flags=DATA_FLAGS) for i, g in enumerate(PV_DATA)]
    ops.append(op("load_cr3", domid=domid, gfn=0))
    return tuple(ops)


def _switch_setup(tagged: bool) -> tuple[Op, ...]:
    """Two HAP domains on one CPU without VPIDs (both tag 0000H), each with its own
    guest tree; domain 1 runs and fills the TLB."""
    ops = [
        op("machine", frames=96, xen_frames=32),
        op("domain", domid=1, mode="hap", pages=10, tagged=tagged),
        op("domain", domid=2, mode="hap", pages=10, tagged=tagged),
        op("scheduler", tagged=tagged),
        op("switch", domid=2),
        *shadow_guest_tree(2),
        op("switch", domid=1),
        *shadow_guest_tree(1),
        op("touch", domid=1, va=0, write=True, value=0x33),
    ]
    return tuple(ops)


def _tlb_scenario(m: z3.ModelRef, s: State, a: dict[str, Expr]) -> Scenario:
    facts = (
        ("TLB", "an entry filled by the running vCPU of one domain"),
        ("switch", f"to vCPU {_val(m, a['vcpu'])} of another domain with the same tag "
                   f"{_val(m, s.vcpu_vpid[a['vcpu']]):#x}, TLB untagged"),
    )
    return Scenario(_switch_setup(False), op("switch", domid=2), facts)


def _register_scenario(m: z3.ModelRef, s: State, a: dict[str, Expr]) -> Scenario:
    rax = z3.BitVecVal(0, w.REG_BITS)
    mine, theirs = _val(m, s.regs[rax]), _val(m, s.saved[a["vcpu"]][rax])
    setup = (
        *_switch_setup(True),
        op("set_gpr", index=0, value=mine),
        op("switch", domid=2),
        op("set_gpr", index=0, value=theirs),
        op("switch", domid=1),
        op("set_gpr", index=0, value=mine),
    )
    facts = (("rax", f"outgoing vCPU {mine:#x}, incoming vCPU's own {theirs:#x}"),)
    return Scenario(setup, op("switch", domid=2), facts)


def _type_flush_scenario(m: z3.ModelRef, s: State, a: dict[str, Expr]) -> Scenario:
    """Domain 1 has written through data page gfn 4 (a writable TLB entry); it
    unmaps the page (no flush: L1 changes leave that to the guest), then pins the
    frame as a table of the counterexample's level: it takes the page-table type
    while the stale writable TLB entry survives."""
    setup = (
        *pv_setup(),
        op("pv_mmu_update", domid=1, table=_f(PV_TREE["l1"]), index=0, target=_f(4), flags=0),
    )
    level = _val(m, a["level"])
    step = op("pv_mmuext", domid=1, cmd=level - 1, frame=_f(4))  # MMUEXT_PIN_L<level>_TABLE
    slot = z3.BitVecVal(0, w.SLOT_BITS)
    facts = (
        ("TLB", f"a writable entry (vpid {_val(m, s.tlb_vpid[slot]):#x}) for frame {_val(m, s.tlb_frame[slot]):#x}"),
        ("type change", f"that frame takes the L{_val(m, a['level'])} page-table type; the entry survives"),
    )
    return Scenario(setup, step, facts)


def _slot_args(s: State, a: dict[str, Expr]) -> list[Expr]:
    return [_in(a["vcpu"], B.vcpus, w.VCPU_BITS)]


CONTROLS: tuple[Control, ...] = (
    Control(
        "mmu_update without the ownership check", "memory_isolation", "mi.pv_tables_owned",
        "pv_mmu_update_l1", l1_update_without_owner_check,
        lambda s, a: [*_pv_l1_assume(s, a), _in(s.owner[w.target(a["value"])], PV_BOUNDS.doms, w.DOM_BITS)],
        _pv_entry_scenario, PV_BOUNDS,
    ),
    Control(
        "mmu_update mapping Xen's frames", "hypervisor_integrity", "hi.pv_tables",
        "pv_mmu_update_l1", l1_update_accepting_xen_frames, _pv_l1_assume,
        _pv_entry_scenario, PV_BOUNDS,
    ),
    Control(
        "writable mapping of a page-table frame", "pt_integrity", "pt.l1_rw_writable",
        "pv_mmu_update_l1", l1_update_without_writable_type,
        lambda s, a: [*_pv_l1_assume(s, a), w.writable(a["value"]), s.validated[w.target(a["value"])]],
        _pv_entry_scenario, PV_BOUNDS,
    ),
    Control(
        "type change without the TLB flush", "pt_integrity", "pt.tlb_no_rw_pt",
        "pv_get_type", get_type_without_flush,
        lambda s, a: [_in(a["frame"], PV_BOUNDS.frames, w.FRAME_BITS), s.is_mode(s.cur, DomMode.PV)],
        _type_flush_scenario, PV_BOUNDS,
    ),
    Control(
        "shadow update that forgets write protection", "shadow_soundness", "ss.l1_sound",
        "shadow_emulate_write", emulate_write_without_write_protection,
        lambda s, a: [_in(a["gfn"], SHADOW_BOUNDS.gfns, w.FRAME_BITS), _in(a["index"], SHADOW_BOUNDS.indices, w.INDEX_BITS)],
        _shadow_scenario, SHADOW_BOUNDS,
    ),
    Control(
        "switch with neither a flush nor distinct tags", "tlb_isolation", "ti.foreign_unhittable",
        "context_switch", switch_without_flush, _slot_args, _tlb_scenario,
    ),
    Control(
        "switch that forgets to restore a register", "register_confidentiality", "rc.live_is_own",
        "context_switch", switch_forgetting_a_register, _slot_args, _register_scenario,
    ),
)


# -- the search ---------------------------------------------------------------------------------------------


def query(control: Control, broken: bool) -> tuple[z3.Solver, State, dict[str, Expr], list[tuple[str, Expr]]]:
    """The bounded query — the step (broken or correct), and the control's clause
    false afterwards — with the control's own invariant core and the configuration
    assumed; returns the solver and every core clause of the pre-state (to add)."""
    s, side = bounded("cx", control.bounds)
    t = control.transition if broken else transition(control.correct)
    args = t.fresh_args("cx")
    step = t.apply(s, args)
    clause = dict(by_name(control.invariant).core(step.post))[control.clause]
    solver = z3.Solver()
    own = [c for _, c in config(s)] + [c for _, c in by_name(control.invariant).core(s)]
    goal = [step.ok, step.choice, *control.assume(s, args), z3.Not(clause)]
    solver.add(*[z3.simplify(f) for f in [*side, *own, *goal]])
    return solver, s, args, [(n, z3.simplify(c)) for n, c in all_core(s)]


#: Rounds of adding the pre-state clauses a candidate violates.
ROUNDS = 8


def solve(solver: z3.Solver, clauses: list[tuple[str, Expr]]) -> z3.ModelRef | None | str:
    """Counterexample-guided: solve; if the model violates some invariant clause in
    the pre-state, assume that clause too and solve again. Returns a model that
    satisfies every clause (a genuine counterexample), None (unsat: there is none),
    or "unknown"."""
    added: set[str] = set()
    for _ in range(ROUNDS):
        answer = check_with_restarts(solver)
        if answer == z3.unsat:
            return None
        if answer != z3.sat:
            return "unknown"
        m = solver.model()
        violated = [(n, c) for n, c in clauses if n not in added and not z3.is_true(m.eval(c, model_completion=True))]
        if not violated:
            return m
        for n, c in violated:
            added.add(n)
            solver.add(c)
    return "unknown"


#: (rlimit, seed): solving times vary with the seed; short runs with fresh seeds.
#: The limits count Z3's work (``rlimit``: 3 to 5 million units a second of one
#: core), so load cannot turn an answer into "unknown" as a timeout can. Measured:
#: the hardest query here (a vacuity check, tests/test_specs_proofs.py) decided
#: with 7.9 million units; with 10 million, two control queries needed a second seed.
RESTARTS = ((15_000_000, 0), (15_000_000, 1), (30_000_000, 2), (60_000_000, 3), (120_000_000, 4), (240_000_000, 5))


def check_with_restarts(solver: z3.Solver) -> z3.CheckSatResult:
    """*sat* or *unsat* from the first attempt that decides; "unknown" only when
    every attempt exhausted its limit (the caller reports it, never retries)."""
    answer = z3.unknown
    for rlimit, seed in RESTARTS:
        solver.set("rlimit", rlimit)
        solver.set("random_seed", seed)
        answer = solver.check()
        if answer != z3.unknown:
            return answer
    return answer


def search(control: Control) -> Found:
    """Find the broken step's counterexample, and check the correct step has none."""
    start = time.perf_counter()
    solver, s, args, clauses = query(control, broken=True)
    model = solve(solver, clauses)
    found = isinstance(model, z3.ModelRef)
    scenario = control.concretize(model, s, args) if isinstance(model, z3.ModelRef) else None
    correct, _, _, clauses = query(control, broken=False)
    refuted = solve(correct, clauses) is None
    return Found(control, found, time.perf_counter() - start, refuted, scenario)


def run_all() -> list[Found]:
    return [search(c) for c in CONTROLS]


def print_table(results: list[Found]) -> None:
    print("negative controls: each broken transition must yield a counterexample (and the correct one none)")
    for r in results:
        status = "counterexample" if r.found else "NO COUNTEREXAMPLE"
        correct = "correct one refuted" if r.correct_refuted else "CORRECT ONE NOT REFUTED"
        print(f"- {r.control.name}: breaks {r.control.invariant} ({r.control.clause}) -> {status}, "
              f"{correct} ({r.seconds:.2f}s)")
        if r.scenario is not None:
            for k, v in r.scenario.facts:
                print(f"    {k}: {v}")
            print(f"    replay: {len(r.scenario.setup)} set-up ops, then {r.scenario.step}")


#: Types of pages by level, for scenario descriptions.
LEVEL_NAMES = {int(t): t.name for t in PageType}
