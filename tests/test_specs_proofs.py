"""The Z3 proofs of :mod:`specs`: every (transition, invariant) cell and every
core-implies-statement lemma is proved, and the proofs are not vacuous."""

from dataclasses import replace

import pytest
import z3

from refmodel.cli import main
from specs import negative, proofs, prover
from specs.bounded import Bounds, bounded
from specs.invariants import INVARIANTS, all_core, config
from specs.state import FIELD_NAMES, State, fresh
from specs.transitions import TRANSITIONS, by_name
from specs.words import VCPU_BITS


@pytest.fixture(scope="module")
def report() -> proofs.Report:
    return proofs.run(workers=2)


def test_every_cell_and_lemma_is_proved(report: proofs.Report) -> None:
    failed = [(c.transition, c.invariant, c.status, c.failed_clause) for c in report.cells if not c.ok]
    assert failed == []
    assert [(n, a.status) for n, a in report.lemmas] == [(i.name, "proved") for i in INVARIANTS]
    assert len(report.cells) == len(TRANSITIONS) * len(INVARIANTS)


def test_unaffected_cells_are_those_rewriting_nothing_read(report: proofs.Report) -> None:
    """A register write touches no memory invariant; a TLB fill leaves the registers
    alone; a context switch touches both the TLB and the registers."""
    assert report.cell("reg_write", "memory_isolation").unaffected
    assert report.cell("tlb_fill_pv", "register_confidentiality").unaffected
    assert not report.cell("context_switch", "register_confidentiality").unaffected
    assert not report.cell("context_switch", "tlb_isolation").unaffected


def empty_machine() -> State:
    """The empty machine as a Z3 state of constants: every array holds its default
    everywhere (no entry present, no frame owned, typed or shadowed, no TLB entry
    valid, every vCPU in one ordinary domain), untagged, vCPU 0 running."""
    none = Bounds(frames=(), indices=(), slots=(), vcpus=(), regs=(), doms=(), gfns=())
    s, _ = bounded("empty", none)
    return replace(s, universe=None, tagged=z3.BoolVal(False), cur=z3.BitVecVal(0, VCPU_BITS))


def test_hypotheses_are_consistent() -> None:
    """Config ∧ Core is satisfiable, so no proof is vacuous: the empty machine is a
    model. Each hypothesis the proofs assume (over the symbolic state ``s``) is
    evaluated on it — the state substituted for ``s``, then simplified — and must
    come out true. Substitution and simplification are exact rewrites with no
    search, so the answer cannot depend on load or on a solver's heuristics (a
    quantified satisfiability query could, and did, come back unknown)."""
    s = fresh("s")
    empty = empty_machine()
    witness = [(getattr(s, f), getattr(empty, f)) for f in FIELD_NAMES]
    hypotheses = config(s) + all_core(s)
    assert len(hypotheses) > 2
    not_true = [n for n, c in hypotheses if not z3.is_true(z3.simplify(z3.substitute(c, *witness)))]
    assert not_true == []


def test_each_lemma_needs_the_core() -> None:
    """Without the PV typing clauses, memory isolation's statement does not follow:
    the prover does not prove it (a proof from nothing would mean a vacuous lemma).
    It gets the default schedule, in which Z3 finds the instances insufficient
    (*sat*): the "unknown" is not a short limit running out."""
    s = fresh("s")
    inv = INVARIANTS[0]
    hyps = [c for _, c in config(s)] + [c for n, c in all_core(s) if n != "pt.upper_typed"]
    assert prover.prove(hyps, inv.semantic(s)).status == "unknown"


def test_no_transition_changes_the_configuration() -> None:
    for t in TRANSITIONS:
        assert proofs.config_untouched(t) == [], t.name


def test_every_transition_and_invariant_is_documented() -> None:
    for t in TRANSITIONS:
        assert len(t.doc) > 40, t.name
    for inv in INVARIANTS:
        assert len(inv.doc) > 40, inv.name
    assert set(FIELD_NAMES) >= {"mem", "owner", "ptype", "p2m", "tlb_vpid", "regs"}


def test_a_weakened_transition_is_not_proved() -> None:
    """The prover does not rubber-stamp: EPT updates without the ownership check
    break memory isolation."""
    from dataclasses import replace

    from specs.steps import Step

    ept = by_name("ept_update")

    def unchecked(s: object, a: dict[str, object]) -> Step:
        step = ept.apply(s, a)  # type: ignore[arg-type]
        return Step(ok=z3.BoolVal(True), post=step.post, choice=step.choice)

    cell = proofs.prove_cell(replace(ept, apply=unchecked), INVARIANTS[0])
    assert not cell.ok and cell.failed_clause == "mi.p2m_owned"


def test_verify_cli_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "--transition", "invlpg", "--transition", "reg_write", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "invlpg" in out and "reg_write" in out and "core => statement" in out and "all proved" in out


def test_verify_cli_refuses_unknown_transition(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "--transition", "nope"]) == 2
    assert "unknown transition" in capsys.readouterr().err


#: A shadow walk needs four shadow tables, four guest tables and the page: more
#: frames than the default bound (vpn 0: every table uses entry 0).
WIDE = Bounds(frames=tuple(range(0x11, 0x1B)), indices=(0,), slots=(0,), vcpus=(0,), regs=(0,), doms=(1,), gfns=(0, 1, 2, 3, 4))


@pytest.mark.parametrize("name", [t.name for t in TRANSITIONS])
def test_no_cell_is_vacuous(name: str) -> None:
    """Every transition can fire: some state satisfying the configuration and
    every invariant's core (a genuine one: found over a bounded state, each clause
    checked on the model) enables it, with a choice its constraints allow."""
    t = by_name(name)
    wide = name == "tlb_fill_shadow"
    s, side = bounded("en", WIDE if wide else Bounds())
    args = t.fresh_args("en")
    step = t.apply(s, args)
    extra = [args["vpn"] == 0] if wide else []
    solver = z3.Solver()
    solver.add(*[z3.simplify(f) for f in [*side, *[c for _, c in config(s)], step.ok, step.choice, *extra]])
    model = negative.solve(solver, [(n, z3.simplify(c)) for n, c in all_core(s)])
    assert isinstance(model, z3.ModelRef), name
