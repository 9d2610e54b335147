"""Negative controls: each broken transition yields a Z3 counterexample, turned into
a concrete operation sequence; the Python model with the same defect injected here
(a monkeypatch, never in shipped code) replays it into the same violation, seen by
the concrete twin; the correct model on the same sequence stays clean."""

from collections.abc import Callable, Iterator

import pytest

from refmodel.arch.vcpu import ArchState
from refmodel.hv import invariants as twins
from refmodel.hv.pv import mmu_update as pv_mmu_update
from refmodel.hv.pv import pagetype
from refmodel.hv.pv.errno import Errno, neg
from refmodel.hv.pv.pteflags import entry_mfn, l1_disallow_mask
from refmodel.hv.sched import Scheduler
from refmodel.hv.shadow import backend as shadow_backend
from refmodel.hv.shadow.propagate import shadow_leaf_entry
from specs import negative
from specs.replay import Replay, replay

Check = Callable[[Replay], list[str]]


@pytest.fixture(scope="module")
def results() -> dict[str, negative.Found]:
    return {r.control.name: r for r in negative.run_all()}


def test_every_control_finds_a_counterexample_the_correct_step_does_not(results: dict[str, negative.Found]) -> None:
    assert len(results) == len(negative.CONTROLS) >= 6
    for name, r in results.items():
        assert r.found, name
        assert r.correct_refuted, name
        assert r.scenario is not None
    covered = {c.invariant for c in negative.CONTROLS}
    assert covered == {
        "memory_isolation", "hypervisor_integrity", "pt_integrity", "shadow_soundness", "tlb_isolation",
        "register_confidentiality",
    }


# -- the defects, injected into the Python model ---------------------------------------------------


def l1e_without_owner_check(ft: pagetype.FrameTable, l1e: int, l1e_owner: object, pg_owner: object) -> int:
    if l1e & l1_disallow_mask(False):
        return neg(Errno.EINVAL)
    if l1e & 2 and pagetype.get_page_type(ft, entry_mfn(l1e), pagetype.PageType.WRITABLE):
        return neg(Errno.EBUSY)
    return 0


def l1e_accepting_xen(ft: pagetype.FrameTable, l1e: int, l1e_owner: object, pg_owner: object) -> int:
    if ft.machine.is_hypervisor_frame(entry_mfn(l1e)):
        return 0
    return pagetype.get_page_from_l1e(ft, l1e, l1e_owner, pg_owner)  # type: ignore[arg-type]


def l1e_without_writable_type(ft: pagetype.FrameTable, l1e: int, l1e_owner: object, pg_owner: object) -> int:
    if l1e & l1_disallow_mask(False):
        return neg(Errno.EINVAL)
    return 0 if ft.machine.owner_of(entry_mfn(l1e)) == getattr(pg_owner, "domid") else neg(Errno.EBUSY)


def inject(mp: pytest.MonkeyPatch, name: str, r: Replay) -> None:
    """The defect of control ``name``, on the model ``r`` is about to step."""
    if name == "mmu_update without the ownership check":
        mp.setattr(pv_mmu_update, "get_page_from_l1e", l1e_without_owner_check)
    elif name == "mmu_update mapping Xen's frames":
        mp.setattr(pv_mmu_update, "get_page_from_l1e", l1e_accepting_xen)
    elif name == "writable mapping of a page-table frame":
        mp.setattr(pv_mmu_update, "get_page_from_l1e", l1e_without_writable_type)
        mp.setattr(pv_mmu_update, "put_page_from_l1e", lambda ft, l1e: None)
    elif name == "type change without the TLB flush":
        mp.setattr(pagetype, "flush_for_type_change", lambda ft, mfn, page: None)
    elif name == "shadow update that forgets write protection":
        mp.setattr(shadow_backend, "shadow_leaf_entry", lambda g, t, wp: shadow_leaf_entry(g, t, False))
    elif name == "switch with neither a flush nor distinct tags":
        assert r.machine is not None
        mp.setattr(r.machine.tlb, "flush_everything", lambda: 0)
    elif name == "switch that forgets to restore a register":
        original_switch = Scheduler.switch_to

        def keeps_rax(self: Scheduler, index: int) -> None:
            rax = self.regs.gprs[0]
            original_switch(self, index)
            self.regs = self.regs.with_gpr(0, rax)

        mp.setattr(Scheduler, "switch_to", keeps_rax)
    else:
        raise AssertionError(f"no defect for {name}")


def violations(name: str, r: Replay, expected: ArchState | None) -> list[str]:
    """The concrete twin of the control's invariant, on the replayed model."""
    assert r.machine is not None
    world = r.world()
    backends = list(world.backends)
    running = backends[world.running]
    invariant = negative.CONTROLS[[c.name for c in negative.CONTROLS].index(name)].invariant
    if invariant == "memory_isolation":
        return twins.memory_isolation(r.machine, backends, running)
    if invariant == "hypervisor_integrity":
        return twins.hypervisor_integrity(r.machine, backends, running)
    if invariant == "pt_integrity":
        return twins.pt_integrity(r.machine, backends)
    if invariant == "shadow_soundness":
        return twins.shadow_soundness(r.machine, backends)
    if invariant == "tlb_isolation":
        return twins.tlb_isolation(r.machine, running, r.filled_for())
    assert invariant == "register_confidentiality" and expected is not None and r.sched is not None
    return twins.register_confidentiality(r.sched.regs, expected)


def incoming_saved(r: Replay, name: str) -> ArchState | None:
    """Before a switch: the state the incoming vCPU saved (what it must see)."""
    if r.sched is None:
        return None
    return r.sched.vcpus[r.vcpu_index(2)].saved


def run_control(name: str, results: dict[str, negative.Found], broken: bool) -> tuple[Replay, list[str]]:
    scenario = results[name].scenario
    assert scenario is not None
    r = replay(scenario.setup)
    assert twins.all_violations(r.machine, list(r.world().backends), r.world().backends[r.running]) == []  # type: ignore[arg-type]
    expected = incoming_saved(r, name)
    with pytest.MonkeyPatch.context() as mp:
        if broken:
            inject(mp, name, r)
        r.apply(scenario.step)
    return r, violations(name, r, expected)


NAMES = [c.name for c in negative.CONTROLS]


@pytest.mark.parametrize("name", NAMES)
def test_the_counterexample_replays_into_the_same_violation(name: str, results: dict[str, negative.Found]) -> None:
    r, found = run_control(name, results, broken=True)
    assert found, f"{name}: the broken model shows no violation"


@pytest.mark.parametrize("name", NAMES)
def test_the_correct_model_refuses_or_stays_isolated(name: str, results: dict[str, negative.Found]) -> None:
    r, found = run_control(name, results, broken=False)
    assert found == []
    if name.startswith("mmu_update") or name.startswith("writable"):
        assert r.results[-1] != 0  # Xen refuses the update


def test_the_replayed_violation_names_what_the_counterexample_chose(results: dict[str, negative.Found]) -> None:
    _, found = run_control("mmu_update mapping Xen's frames", results, broken=True)
    assert any("Xen's mfn 0x5" in v for v in found)
    _, found = run_control("switch that forgets to restore a register", results, broken=True)
    assert found and found[0].startswith("gpr 0")


def iter_ops(results: dict[str, negative.Found]) -> Iterator[str]:
    for r in results.values():
        assert r.scenario is not None
        yield from (str(o) for o in r.scenario.ops)


def test_scenarios_print_as_operation_sequences(results: dict[str, negative.Found]) -> None:
    text = "\n".join(iter_ops(results))
    assert "pv_mmu_update(domid=1" in text and "switch(domid=2)" in text and "write_pte(" in text
