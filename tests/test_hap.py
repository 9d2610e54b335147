"""HAP as a backend: the 2-D walk's cost, no exits for the guest's own paging work,
EPT violations handled by the hypervisor, EPT updates with INVEPT, VPID tags, and the
isolation predicate catching what breaks it.
"""

from collections.abc import Callable
from dataclasses import replace

import pytest

from refmodel.account.events import Event, ExitReason
from refmodel.arch.access import Access, AccessKind
from refmodel.arch.fault import PageFault, PfErrorCode
from refmodel.arch.pte import Level, PageSize, PteFlag, table_index
from refmodel.arch.tlb import TlbEntry
from refmodel.arch.types import GFN, MFN, PAGE_SHIFT, PAGE_SIZE
from refmodel.arch.walk import Rights
from refmodel.errors import RefmodelError
from refmodel.guest.kernel import GuestKernel, PteFlavour
from refmodel.guest.ops import Mode
from refmodel.hv.hap import (
    CombinedTranslation,
    EptFlag,
    EptMisconfiguration,
    EptViolation,
    HapBackend,
    hap_isolated,
    nested_walk,
)
from refmodel.hv.hap.ept import make_leaf, make_table_entry
from refmodel.hv.machine import Machine
from refmodel.hv.native import NativeBackend

VA = 0x0000_0600_0000_0000  # 2 MiB aligned, as the compare scenarios use
SEED_PAGES = 1024
GUEST_FRAMES = SEED_PAGES + 64
R, W, X = EptFlag.R, EptFlag.W, EptFlag.X


def new_machine() -> Machine:
    return Machine(nr_frames=6144, hypervisor_frames=128)


def hap_guest(machine: Machine | None = None, domid: int = 1, tagged: bool = True,
              frames: int = GUEST_FRAMES,
              flavour: PteFlavour = PteFlavour.LINUX) -> tuple[HapBackend, GuestKernel, int]:
    machine = machine if machine is not None else new_machine()
    backend = HapBackend(machine, machine.create_domain(domid, frames), tagged=tagged)
    kernel = GuestKernel(backend, frames, flavour=flavour)
    return backend, kernel, kernel.create_process()


def refs_of(backend: HapBackend, action: Callable[[], None]) -> tuple[int, int]:
    """(guest entry reads, EPT entry reads) counted while ``action()`` ran."""
    before = backend.counters.copy()
    action()
    c = backend.counters.since(before)
    return c[Event.WALK_REF], c[Event.EPT_WALK_REF]


def leaf_gfns(kernel: GuestKernel, pid: int, va: int) -> tuple[GFN, GFN]:
    """(the L1 table holding va's PTE, the data frame) of a mapped page."""
    proc = kernel.process(pid)
    table = kernel.l1_table(proc, va)
    return table, kernel.frame_of(kernel.mmu.read_pte(table, table_index(va, Level.L1)))


# -- the cost of a TLB miss ------------------------------------------------------------------


def test_a_cold_miss_costs_24_references() -> None:
    """Bhargava et al.: (n+1)(m+1) - 1 = 24 for a 4-level guest on 4-level EPT with no
    paging-structure caches: 4 guest entries, each behind 4 EPT reads, and 4 more
    EPT reads for the final guest-physical address."""
    backend, kernel, pid = hap_guest()
    kernel.map_range(pid, VA, 1, populate=True)
    guest, ept = refs_of(backend, lambda: kernel.touch(VA))
    assert (guest, ept) == (4, 20)
    assert guest + ept == (4 + 1) * (4 + 1) - 1
    assert refs_of(backend, lambda: kernel.touch(VA + 8)) == (0, 0)  # a TLB hit


def test_seed_scenario_1024_pages() -> None:
    """The seed question: map 1024 pages at once, touch each. With HAP the 1024+ page
    table writes are plain stores (no exit of any kind) and every first touch is a
    cold miss of 24 references; native pays 4."""
    backend, kernel, pid = hap_guest()
    before = backend.counters.copy()
    kernel.map_range(pid, VA, SEED_PAGES, writable=True, populate=True)
    mapping = backend.counters.since(before)
    assert mapping[Event.VM_EXIT] == 0 and not mapping.exits
    assert mapping[Event.EMULATED_PT_WRITE] == 0 and mapping[Event.HYPERCALL] == 0

    before = backend.counters.copy()
    for i in range(SEED_PAGES):
        kernel.touch(VA + i * PAGE_SIZE, AccessKind.WRITE, i + 1)
    touching = backend.counters.since(before)
    misses = touching[Event.TLB_MISS]
    assert misses == SEED_PAGES and touching[Event.VM_EXIT] == 0
    assert touching[Event.GUEST_PAGE_FAULT] == 0
    total = touching[Event.WALK_REF] + touching[Event.EPT_WALK_REF]
    assert total == 24 * misses and touching[Event.WALK_REF] == 4 * misses

    native = NativeBackend(GUEST_FRAMES)
    nkernel = GuestKernel(native, GUEST_FRAMES)
    npid = nkernel.create_process()
    nkernel.map_range(npid, VA, SEED_PAGES, writable=True, populate=True)
    before = native.counters.copy()
    for i in range(SEED_PAGES):
        nkernel.touch(VA + i * PAGE_SIZE, AccessKind.WRITE, i + 1)
    assert native.counters.since(before)[Event.WALK_REF] == 4 * SEED_PAGES
    assert nkernel.page_table_view() == kernel.page_table_view()
    assert hap_isolated(backend) == []


def test_guest_paging_work_takes_no_exits() -> None:
    """CR3 loads, INVLPG, full flushes, demand faults, COW faults: all in the guest."""
    backend, kernel, pid = hap_guest()
    kernel.map_range(pid, VA, 40, writable=True)  # demand paged
    for i in range(40):
        kernel.touch(VA + i * PAGE_SIZE, AccessKind.WRITE, i)
    child = kernel.fork(pid)
    kernel.switch_to(child)
    kernel.touch(VA, AccessKind.WRITE, 7)  # copy-on-write fault
    kernel.switch_to(pid)
    kernel.protect(pid, VA, 40, writable=False)  # 40 pages > 33: a full flush
    kernel.unmap_range(pid, VA, 3)
    kernel.touch(VA)  # SIGSEGV-style fault, delivered to the guest
    assert backend.counters[Event.GUEST_PAGE_FAULT] > 40
    assert backend.counters[Event.VM_EXIT] == 0 and not backend.counters.exits
    assert backend.exits == []


def test_guest_state_holds_guest_physical_cr3_and_cr2() -> None:
    backend, kernel, pid = hap_guest()
    root = kernel.process(pid).root
    assert backend.guest_state.cr3 == root << PAGE_SHIFT  # a GPA, not the MFN
    assert int(backend.domain.p2m[root]) != int(root)
    kernel.touch(VA + 0x18)
    assert backend.guest_state.cr2 == VA + 0x18
    backend.guest_state = replace(backend.guest_state, cr2=0)
    assert backend.mmu.state.cr2 == 0
    assert backend.mode is Mode.HAP and backend.vpid == 2


def test_page_table_writes_land_in_guest_memory_with_guest_frame_numbers() -> None:
    backend, kernel, pid = hap_guest()
    kernel.map_range(pid, VA, 1, populate=True)
    table, data = leaf_gfns(kernel, pid, VA)
    pte = backend.machine.mem.read_u64((backend.domain.p2m[table] << PAGE_SHIFT) + table_index(VA, Level.L1) * 8)
    assert pte >> PAGE_SHIFT & ((1 << 40) - 1) == data  # the guest's number, not an MFN
    kernel.touch(VA, AccessKind.WRITE, 0xABC)
    assert backend.machine.mem.read_u64(backend.domain.p2m[data] << PAGE_SHIFT) == 0xABC
    assert backend.read_pte(table, table_index(VA, Level.L1)) & (PteFlag.A | PteFlag.D) == PteFlag.A | PteFlag.D


def test_nested_walk_returns_guest_faults_without_ept_involvement_beyond_the_walk() -> None:
    backend, kernel, pid = hap_guest()
    ctx = backend.mmu.ctx
    r = nested_walk(backend.machine.mem, backend.ept.eptp, ctx, VA, Access(AccessKind.READ, 3))
    assert isinstance(r.outcome, PageFault) and r.outcome.error_code == PfErrorCode.U
    assert (r.guest_refs, r.ept_refs) == (1, 4)  # the empty PML4E, behind one EPT walk
    kernel.map_range(pid, VA, 1, populate=True)
    r = nested_walk(backend.machine.mem, backend.ept.eptp, ctx, VA + 0x10, Access(AccessKind.READ, 3))
    assert isinstance(r.outcome, CombinedTranslation)
    _, data = leaf_gfns(kernel, pid, VA)
    assert r.outcome.pa == (backend.domain.p2m[data] << PAGE_SHIFT) + 0x10
    assert r.outcome.gpa == (data << PAGE_SHIFT) + 0x10
    assert r.refs == 24


# -- EPT violations and the hypervisor --------------------------------------------------------


def test_write_to_a_log_dirty_page_exits_once_and_is_logged() -> None:
    """Xen's log-dirty: EPT entry read/execute only; the guest's write exits, Xen marks
    the page dirty and restores write access, the write is retried and lands."""
    backend, kernel, pid = hap_guest()
    kernel.map_range(pid, VA, 1, populate=True)
    kernel.touch(VA, AccessKind.WRITE, 1)
    _, data = leaf_gfns(kernel, pid, VA)
    backend.ept_set_rights(data, R | X)
    kernel.touch(VA)  # reads are still allowed
    assert backend.counters.exits[ExitReason.EPT_VIOLATION] == 0
    kernel.touch(VA, AccessKind.WRITE, 2)
    assert backend.counters.exits[ExitReason.EPT_VIOLATION] == 1
    assert backend.dirty_log == {data}
    (exit_,) = backend.exits
    assert isinstance(exit_, EptViolation)
    q = exit_.qualification
    assert (q.write, q.readable, q.writable, q.executable, q.gla_valid, q.final) == (True, True, False, True, True, True)
    assert exit_.gla == VA and exit_.gfn == data
    kernel.touch(VA, AccessKind.WRITE, 3)  # write access restored: no second exit
    assert backend.counters.exits[ExitReason.EPT_VIOLATION] == 1
    assert backend.read_frame_u64(data, 0) == 3


def test_accessed_flag_update_is_an_ept_data_write() -> None:
    """SDM 29.3.3.2: the guest walk setting A in a PTE whose table is read-only in EPT
    is an EPT violation for a write to a paging-structure entry (not the final access).
    The guest writes its entries with A clear, so the walk has an A flag to set."""
    backend, kernel, pid = hap_guest(flavour=PteFlavour.AD_CLEAR)
    kernel.map_range(pid, VA, 1, populate=True)
    table, _ = leaf_gfns(kernel, pid, VA)
    backend.ept_set_rights(table, R)
    kernel.touch(VA)
    (exit_,) = backend.exits
    assert isinstance(exit_, EptViolation)
    q = exit_.qualification
    assert (q.read, q.write, q.gla_valid, q.final) == (False, True, True, False)
    assert exit_.gpa >> PAGE_SHIFT == table and exit_.gla == VA
    assert backend.dirty_log == {table}
    assert backend.read_pte(table, table_index(VA, Level.L1)) & PteFlag.A


def test_not_present_page_table_gfn_exits_during_the_walk() -> None:
    backend, kernel, pid = hap_guest()
    kernel.map_range(pid, VA, 1, populate=True)
    table, _ = leaf_gfns(kernel, pid, VA)
    backend.ept_set_rights(table, 0)
    kernel.touch(VA)
    (exit_,) = backend.exits
    assert isinstance(exit_, EptViolation)
    q = exit_.qualification
    assert (q.read, q.readable, q.writable, q.executable, q.final) == (True, False, False, False, False)
    assert backend.dirty_log == set()  # a read: nothing to log


def test_ept_update_invalidates_combined_translations() -> None:
    """After a hypervisor EPT update, INVEPT: the next write must see the new rights."""
    backend, kernel, pid = hap_guest()
    kernel.map_range(pid, VA, 1, populate=True)
    kernel.touch(VA, AccessKind.WRITE, 1)  # a dirty, writable combined entry
    assert any(e.vpid == backend.vpid for e in backend.machine.tlb.entries())
    _, data = leaf_gfns(kernel, pid, VA)
    backend.ept_set_rights(data, R | X)
    assert backend.counters[Event.INVEPT] == 1
    assert not any(e.vpid == backend.vpid for e in backend.machine.tlb.entries())
    kernel.touch(VA, AccessKind.WRITE, 2)
    assert backend.counters.exits[ExitReason.EPT_VIOLATION] == 1


def test_a_combined_entry_keeps_the_ept_rights_it_was_filled_with() -> None:
    """A read under read-only EPT caches a combined entry whose guest side is writable
    and dirty; a write must still not use it (the cached EPT rights refuse it) but
    walk, and exit."""
    backend, kernel, pid = hap_guest()
    kernel.map_range(pid, VA, 1, populate=True)
    kernel.touch(VA, AccessKind.WRITE, 1)  # guest D = 1
    _, data = leaf_gfns(kernel, pid, VA)
    backend.ept_set_rights(data, R | X)
    kernel.touch(VA)  # refills: guest rights RW + dirty, EPT rights R-X
    (entry,) = [e for e in backend.machine.tlb.entries() if e.vpid == backend.vpid]
    assert entry.dirty and entry.rights.writable
    kernel.touch(VA, AccessKind.WRITE, 2)
    assert backend.counters.exits[ExitReason.EPT_VIOLATION] == 1


def test_without_invept_a_stale_combined_translation_bypasses_ept() -> None:
    """The broken hypervisor: it narrows the EPT entry but skips INVEPT; the cached
    combined translation still allows the write, and no exit happens. (What the
    INVEPT in :meth:`HapBackend.ept_update` is for.)"""
    backend, kernel, pid = hap_guest()
    kernel.map_range(pid, VA, 1, populate=True)
    kernel.touch(VA, AccessKind.WRITE, 1)
    _, data = leaf_gfns(kernel, pid, VA)
    backend.ept.write_leaf(data, make_leaf(backend.domain.p2m[data], R | X))  # no INVEPT
    kernel.touch(VA, AccessKind.WRITE, 2)
    assert backend.counters[Event.VM_EXIT] == 0 and backend.read_frame_u64(data, 0) == 2


def test_update_of_a_not_present_entry_needs_no_invept() -> None:
    """Xen ept_set_entry: no sync when the old entry was not present."""
    backend, kernel, pid = hap_guest()
    backend.ept_set_rights(GFN(5), 0)
    assert backend.counters[Event.INVEPT] == 1
    backend.ept_set_rights(GFN(5), R | W | X)
    assert backend.counters[Event.INVEPT] == 1


def test_remap_moves_the_guest_frame() -> None:
    backend, kernel, pid = hap_guest()
    kernel.map_range(pid, VA, 1, populate=True)
    kernel.touch(VA, AccessKind.WRITE, 0x1111)
    _, data = leaf_gfns(kernel, pid, VA)
    spare = backend.domain.p2m[GFN(GUEST_FRAMES - 1)]  # a frame of the domain's it never used
    backend.machine.mem.write_u64(spare << PAGE_SHIFT, 0x2222)
    backend.ept_remap(data, spare)
    kernel.touch(VA)
    assert kernel.observations[-1].value == 0x2222
    assert backend.domain.p2m[data] == spare and backend.machine.m2p[spare] == data
    assert hap_isolated(backend) == []


def test_remap_refuses_a_frame_the_domain_does_not_own() -> None:
    backend, _, _ = hap_guest()
    with pytest.raises(RefmodelError, match="not owned by domain 1"):
        backend.ept_remap(GFN(3), MFN(5))  # a Xen frame
    with pytest.raises(RefmodelError, match="misconfiguration: .*without read"):
        backend.ept_set_rights(GFN(3), W)


def test_removed_gfn_crashes_the_domain_on_access() -> None:
    backend, kernel, pid = hap_guest()
    kernel.map_range(pid, VA, 1, populate=True)
    _, data = leaf_gfns(kernel, pid, VA)
    backend.ept_remove(data)
    with pytest.raises(RefmodelError, match="not in its P2M; Xen crashes the domain"):
        kernel.touch(VA)
    assert backend.counters.exits[ExitReason.EPT_VIOLATION] == 1


def test_misconfiguration_is_a_distinct_exit() -> None:
    backend, kernel, pid = hap_guest()
    kernel.map_range(pid, VA, 1, populate=True)
    _, data = leaf_gfns(kernel, pid, VA)
    backend.ept.write_leaf(data, make_leaf(backend.domain.p2m[data], R | W | X) | (1 << 45))
    with pytest.raises(RefmodelError, match="EPT misconfiguration"):
        kernel.touch(VA)
    assert backend.counters.exits[ExitReason.EPT_MISCONFIG] == 1
    assert backend.counters.exits[ExitReason.EPT_VIOLATION] == 0
    assert isinstance(backend.exits[0], EptMisconfiguration)


def test_untagged_exit_flushes_the_whole_tlb() -> None:
    backend, kernel, pid = hap_guest(tagged=False)
    assert backend.vpid == 0
    kernel.map_range(pid, VA, 4, populate=True)
    for i in range(4):
        kernel.touch(VA + i * PAGE_SIZE, AccessKind.WRITE, i)
    _, data = leaf_gfns(kernel, pid, VA)
    backend.ept.write_leaf(data, make_leaf(backend.domain.p2m[data], R | X))  # narrowed, no INVEPT yet
    backend.machine.tlb.invalidate_page(VA, 0, 0)  # only this page is re-walked
    flushes = backend.counters[Event.TLB_FLUSH_GLOBAL]
    kernel.touch(VA, AccessKind.WRITE, 9)
    assert backend.counters[Event.TLB_FLUSH_GLOBAL] == flushes + 1
    before = backend.counters.copy()
    kernel.touch(VA + PAGE_SIZE)  # its entry went with the flush
    assert backend.counters.since(before)[Event.TLB_MISS] == 1


# -- VPID tags ----------------------------------------------------------------------------------


def two_domains(tagged: bool) -> tuple[tuple[HapBackend, GuestKernel], tuple[HapBackend, GuestKernel]]:
    machine = new_machine()
    a, ka, pa = hap_guest(machine, 1, tagged, frames=256)
    b, kb, pb = hap_guest(machine, 2, tagged, frames=256)
    for kernel, pid, value in ((ka, pa, 0xAAAA), (kb, pb, 0xBBBB)):
        kernel.map_range(pid, VA, 8, populate=True)
        for i in range(8):
            kernel.touch(VA + i * PAGE_SIZE, AccessKind.WRITE, value + i)
    return (a, ka), (b, kb)


def test_vpid_tagged_entries_of_two_domains_never_hit_each_other() -> None:
    (a, ka), (b, kb) = two_domains(tagged=True)
    assert a.machine is b.machine and a.vpid != b.vpid
    vpids = {e.vpid for e in a.machine.tlb.entries()}
    assert vpids == {a.vpid, b.vpid}
    before = a.counters.copy()
    for i in range(8):
        ka.touch(VA + i * PAGE_SIZE)
        kb.touch(VA + i * PAGE_SIZE)
    c = a.counters.since(before)
    assert c[Event.TLB_HIT] == 16 and c[Event.TLB_MISS] == 0  # both working sets survived
    assert [o.value for o in ka.observations[-8:]] == [0xAAAA + i for i in range(8)]
    assert [o.value for o in kb.observations[-8:]] == [0xBBBB + i for i in range(8)]
    a.flush_tlb()
    a.invlpg(VA)
    assert {e.vpid for e in a.machine.tlb.entries()} == {b.vpid}  # A's flushes spare B
    assert hap_isolated(a) == [] and hap_isolated(b) == []


def test_untagged_guests_share_vpid_0_and_need_a_flush_between_them() -> None:
    """Without VPIDs both domains' translations carry tag 0000H: unless the world
    switch flushes (refmodel.hv.sched does), B's vCPU uses A's entries."""
    machine = new_machine()
    a, ka, pa = hap_guest(machine, 1, tagged=False, frames=64)
    b, kb, pb = hap_guest(machine, 2, tagged=False, frames=64)
    assert a.vpid == b.vpid == 0
    ka.map_range(pa, VA, 1, populate=True)
    kb.map_range(pb, VA, 1, populate=True)
    ka.touch(VA, AccessKind.WRITE, 0xAAAA)  # A's entry for VA is in the TLB under tag 0
    assert hap_isolated(b)  # B would reach A's frame through it
    kb.touch(VA)
    assert kb.observations[-1].value == 0xAAAA  # ... and does: the leak
    machine.tlb.flush_everything()  # what a world switch without VPIDs must do
    kb.touch(VA)
    assert kb.observations[-1].value == 0 and hap_isolated(b) == []


# -- the isolation predicate -----------------------------------------------------------------------


def test_hap_isolated_reports_planted_violations() -> None:
    machine = new_machine()
    a, ka, pa = hap_guest(machine, 1, frames=64)
    b, _, _ = hap_guest(machine, 2, frames=64)
    assert hap_isolated(a) == []
    a.ept.write_leaf(GFN(70), make_leaf(MFN(7), R | W | X))  # a Xen frame
    a.ept.write_leaf(GFN(71), make_leaf(b.domain.p2m[GFN(0)], R))  # B's frame
    problems = hap_isolated(a)
    assert len(problems) == 2
    assert "mfn 0x7, owned by Xen" in problems[0] and "owned by domain 2" in problems[1]

    c, _, _ = hap_guest(machine, 3, frames=64)
    c.machine.tlb.fill(TlbEntry(c.vpid, 0, VA >> 12, PageSize.SIZE_4K, 0x9000, Rights(), False, True))
    assert any("TLB entry" in p and "owned by Xen" in p for p in hap_isolated(c))

    d, _, _ = hap_guest(machine, 4, frames=64)
    l4e = d.ept.entry_addr(0, Level.L4)
    assert l4e is not None
    machine.mem.write_u64(l4e, make_table_entry(d.domain.p2m[GFN(1)]))  # EPT table in a guest frame
    assert any("EPT table" in p and "domain 4" in p for p in hap_isolated(d))


def test_backend_refuses_a_domain_of_another_machine() -> None:
    other = new_machine().create_domain(1, 4)
    with pytest.raises(RefmodelError, match="does not belong"):
        HapBackend(new_machine(), other)
