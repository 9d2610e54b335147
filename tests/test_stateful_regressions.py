"""Shrunk sequences kept as regression tests (docs/stateful.md, "From a failure to a
regression test").

Each test is the sequence Hypothesis printed, pasted as it came (invariant checks
included), or — for a guest program — the same steps as a program compared across
modes (:func:`agree_with_native`, which also checks each mode's invariant after
every operation). The docstring says what the
sequence caught. So far every entry comes from the acceptance run of planted bugs:
each is the minimal sequence that exposed one wrong rule, kept so that the rule stays
pinned even on runs where the machines' random search goes elsewhere. Later entries
come from chance failures of ordinary runs (issue 16); their docstrings say so.
"""

from refmodel.arch.access import AccessKind
from refmodel.guest.kernel import as_stored_by
from refmodel.guest.ops import Mode
from refmodel.hv.modes import ModeSpec, standard_specs
from stateful_support import (
    Fork, GuestOp, GuestRun, Map, MapTable, Protect, Remap, Switch, Touch, Unmap, backend_problems, record_of,
)
from test_stateful_domains import DomainsMachine
from test_stateful_equivalence import EquivalenceMachine
from test_stateful_mmu import MmuMachine
from test_stateful_pv import PvMachine


def test_invlpg_drops_the_page() -> None:
    """Planted bug: INVLPG a no-op (refmodel/arch/mmu.py ``Mmu.invlpg``). The entry
    cached by the read must not survive the INVLPG of its page."""
    state = MmuMachine()
    state.access(cpl=0, kind=AccessKind.READ, offset=0, va=4194304, value=0, vpid=2)
    state.invlpg(va=4194304, vpid=2)
    state.tlb_holds_only_what_it_may()
    state.hits_and_misses_count_accesses()


def test_mov_cr3_flushes_the_pcid() -> None:
    """Planted bug: MOV to CR3 without its invalidation (``Mmu._apply``)."""
    state = MmuMachine()
    state.access(cpl=0, kind=AccessKind.READ, offset=0, va=4194304, value=0, vpid=1)
    state.mov_cr3(noflush=False, pcid=0, root=16, vpid=1)
    state.tlb_holds_only_what_it_may()


def test_a_foreign_frame_stops_a_batch() -> None:
    """Planted bug: get_page_from_l1e without its ownership check
    (refmodel/hv/pv/pagetype.py). Another domain's frame in the first request of a
    batch must stop it with -EBUSY, nothing done."""
    state = PvMachine()
    state.boot(batch_sizes=(1, 1), tagged=False)
    state.kernels_see_what_native_gives()
    state.page_tables_intact_and_isolated()
    state.registers_are_the_running_vcpus()
    state.partial_batch(before=0, d=0, frame=0, slot=1)
    state.page_tables_intact_and_isolated()
    state.teardown()


def test_a_switch_restores_rip() -> None:
    """Planted bug: the scheduler kept the outgoing RIP (refmodel/hv/sched.py
    ``Scheduler.switch_to``). Domain 1's vCPU left with RIP 0 and must come back
    with it, not with domain 0's RIP 1."""
    state = PvMachine()
    state.boot(batch_sizes=(1, 1), tagged=False)
    state.set_registers(d=0, reg=0, rip=1, value=0)
    state.registers_are_the_running_vcpus()
    state.unpin_spare(d=1)
    state.registers_are_the_running_vcpus()
    state.teardown()


def test_untagged_switches_flush() -> None:
    """Planted bug: no TLB flush on a vCPU switch without VPIDs. Booting three
    untagged domains switches twice; each switch must flush (the boot's own
    switches check TLB isolation as they happen)."""
    state = DomainsMachine()
    state.boot(modes=[Mode.SHADOW, Mode.SHADOW_OOS, Mode.PV], batch_size=1, self_mapping=True, tagged=False)
    state.untagged_switches_flush()
    state.every_domain_isolated()
    state.teardown()


def agree_with_native(program: list[GuestOp], specs: list[ModeSpec]) -> None:
    """Run ``program`` under every spec (native first), checking each mode's safety
    invariant after every operation and the guest's record against native at the end."""
    runs = [GuestRun(spec) for spec in specs]
    for op in program:
        for run in runs:
            run.apply(op)
            problems = backend_problems(run.backend)
            assert not problems, f"{run.spec.label} after {op}: {problems[:3]}"
    native = record_of(runs[0].kernel)
    for run in runs[1:]:
        record = record_of(run.kernel)
        assert record.observations == native.observations, f"{run.spec.label}: observations differ"
        assert record.page_tables == as_stored_by(native.page_tables, run.backend), f"{run.spec.label}: page tables differ"


def test_shadow_propagates_emulated_writes() -> None:
    """Planted bug: the shadow forgot to re-propagate an emulated page-table write
    (refmodel/hv/shadow/backend.py ``_emulate_pt_write``): after fork, unmap and
    remap, the shadow kept a mapping the guest had removed."""
    program: list[GuestOp] = [
        Unmap(0, 0, 1), Map(0, 0, 8, False, True), Map(0, 0, 1, False, False), Fork(),
        Map(0, 0, 1, False, False), Unmap(0, 0, 1), Touch(0, 2, 0, AccessKind.READ, 0), Remap(0, 0, 6),
    ]
    agree_with_native(program, standard_specs(batch_size=2, tagged=False))


def test_pv_rw_mapping_takes_a_writable_reference() -> None:
    """Planted bug: get_page_from_l1e took no writable type reference for an RW
    mapping: after a read-only protect and a new RW mapping the type counts were off
    (found by the PV run's frame-table audit)."""
    program: list[GuestOp] = [Map(0, 0, 1, False, False), Protect(0, 0, 1, False), Map(0, 1, 1, True, True)]
    agree_with_native(program, standard_specs(batch_size=2, tagged=False))


def test_oos_write_fault_maps_the_table_writable() -> None:
    """Chance failure of the equivalence machine (issue 16): "shadow: the hidden
    fault at 0x801000 did not resolve" under shadow-oos. The guest maps its L1 table
    for 0x800000 writable at 0x801000 (the table holds its own mapping) and the
    MapTable store already unsynced that L1. A write through the mapping then faults:
    the frame is out of sync, so not write-protected, and the fault was taken as a
    hidden one; but its fill re-propagated the leaf as for a read, read-only (the
    target is a shadowed page table), and the retry faulted again, forever. Xen's
    ``sh_page_fault`` propagates the leaf with ``ft_demand_write``, which
    ``_sh_propagate`` maps writable for an out-of-sync target (``mfn_oos_may_write``);
    refmodel/hv/shadow/backend.py ``_sync_walk`` now does the same. (The earlier
    write to unmapped 0x803008 sets A in the L2 entry, linking the L1's shadow before
    the unsync, so no new link resyncs it.)"""
    state = EquivalenceMachine()
    state.boot(batch_size=2, self_mapping=True, tagged=False)
    state.step(op=Map(0, 0, 2, False, False))
    state.step(op=Touch(0, 0, 0, AccessKind.READ, 484))
    state.step(op=MapTable(4, 0, 0, False))
    state.step(op=Touch(4, 3, 8, AccessKind.WRITE, 3960209))
    state.step(op=MapTable(4, 1, 2, True))
    state.every_mode_is_safe()
    state.guest_sees_the_same_everywhere()
    state.hardware_grants_no_more_than_the_guest()
    state.step(op=Touch(4, 1, 0, AccessKind.WRITE, 18_446_744_073_709_551_614))
    state.every_mode_is_safe()
    state.guest_sees_the_same_everywhere()
    state.hardware_grants_no_more_than_the_guest()
    state.teardown()


def test_a_guest_that_rewrote_its_own_tables_loops_alike_everywhere() -> None:
    """Chance failure of the equivalence machine: a self-mapping program's stores
    (``Touch`` of region 4, the table window) rewrote an upper entry of its own
    tables; a later write fault was "resolved" by the kernel in a table the walk no
    longer reaches, and the access faulted again forever — in every mode alike,
    native included (a guest-kernel state, not a hypervisor bug). The harness now
    takes that loop as the guest's outcome for self-mapping kernels (it still fails
    for any other kernel), and the modes must agree on it."""
    state = EquivalenceMachine()
    state.boot(batch_size=2, self_mapping=True, tagged=False)
    state.step(op=Unmap(0, 0, 3))
    state.step(op=Unmap(0, 0, 4))
    state.step(op=Touch(0, 0, 0, AccessKind.READ, 2544989))
    state.step(op=Switch(0))
    state.step(op=Unmap(0, 0, 2))
    state.step(op=Remap(0, 0, 4))
    state.step(op=Touch(0, 0, 0, AccessKind.READ, 532))
    state.step(op=MapTable(4, 1, 15, True))
    state.step(op=Touch(4, 1, 0, AccessKind.WRITE, 77869))
    state.step(op=Protect(0, 0, 2, False))
    state.step(op=Touch(4, 0, 0, AccessKind.WRITE, 6195035))
    state.step(op=Protect(0, 0, 3, False))
    state.step(op=Touch(0, 0, 0, AccessKind.READ, 4799389))
    state.step(op=Touch(4, 0, 0, AccessKind.WRITE, 4_413_954_260))
    state.step(op=Touch(0, 0, 0, AccessKind.READ, 621))
    state.step(op=MapTable(4, 0, 14, False))
    state.step(op=Touch(0, 0, 0, AccessKind.READ, 119))
    state.step(op=Touch(4, 0, 0, AccessKind.WRITE, 9769))
    state.step(op=Touch(0, 0, 0, AccessKind.READ, 1000))
    state.step(op=Protect(0, 0, 3, True))
    state.step(op=Unmap(0, 0, 1))
    state.step(op=Touch(0, 0, 8, AccessKind.READ, 0))
    state.step(op=Unmap(1, 2, 4))
    state.step(op=MapTable(4, 1, 7, False))
    state.step(op=Remap(0, 3, 1))
    state.step(op=Map(0, 2, 3, True, False))
    state.step(op=Touch(0, 3, 8, AccessKind.WRITE, 4088))
    state.every_mode_is_safe()
    state.guest_sees_the_same_everywhere()
    state.hardware_grants_no_more_than_the_guest()
    state.teardown()

