"""Page types at work: validation of whole trees, cascading de-validation, the
fast path for safe-bit changes, the flush on a type change, and the hypercalls'
TLB side effects."""

import pytest

from refmodel.account.events import Event
from refmodel.arch.access import AccessKind
from refmodel.arch.mmu import LoadResult
from refmodel.arch.pte import Level, PteFlag
from refmodel.arch.types import GFN, PAGE_SHIFT
from refmodel.arch.walk import Translation
from refmodel.errors import RefmodelError
from refmodel.guest.kernel import GuestKernel
from refmodel.hv.machine import Machine
from refmodel.hv.pv import (
    Errno,
    MmuCmd,
    MmuextCmd,
    MmuUpdate,
    PageState,
    PageType,
    PvBackend,
    PvHypercallFailed,
    PvStat,
    Uvmf,
    neg,
)
from refmodel.hv.pv.hypercall import mmu_update, update_va_mapping
from test_pv_support import DATA, L1, L2, L3, L4, TABLE, USER_RO, USER_RW, PvWorld, audit


@pytest.fixture
def world() -> PvWorld:
    w = PvWorld()
    w.build_tree()
    return w


def load(world: PvWorld, va: int) -> int:
    out = world.vcpu.mmu.load(va)
    assert isinstance(out, LoadResult), out
    return out.value


def cached(world: PvWorld, va: int) -> bool:
    return world.machine.tlb.lookup(va, world.vcpu.vpid, 0) is not None


# -- validation -----------------------------------------------------------------------------------
def test_pinning_an_l4_validates_the_whole_tree() -> None:
    """A tree written into plain frames becomes typed only when pinned: each level
    holds one type reference on the level below, each RW leaf one writable
    reference on its page (``promote_lN_table``)."""
    world = PvWorld()
    mem = world.machine.mem
    mem.write_u64(world.maddr(L4, 0), world.entry(L3, TABLE))
    mem.write_u64(world.maddr(L3, 0), world.entry(L2, TABLE))
    mem.write_u64(world.maddr(L2, 0), world.entry(L1, TABLE))
    mem.write_u64(world.maddr(L1, 1), world.entry(DATA, USER_RW))
    mem.write_u64(world.maddr(L1, 2), world.entry(DATA + 1, USER_RO))
    mem.write_u64(world.maddr(L4, 260), world.entry(L3, TABLE))  # in Xen's slots: never looked at
    assert world.pin(L4, Level.L4) == 0
    assert world.state(L4) == PageState(PageType.L4, 1, True, True)
    for table, type_ in ((L3, PageType.L3), (L2, PageType.L2), (L1, PageType.L1)):
        assert world.state(table) == PageState(type_, 1, True, False)
    assert world.state(DATA) == PageState(PageType.WRITABLE, 1, True, False)
    assert world.state(DATA + 1).count == 0  # read-only mappings take no type reference
    assert world.read(L4, 260) == 0  # Xen's slots replaced (init_xen_l4_slots)
    assert world.ft.stats[PvStat.TABLE_VALIDATED] == 4
    assert not audit(world.ft, [world.vcpu])


def test_unpinning_the_last_reference_devalidates_the_tree(world: PvWorld) -> None:
    assert world.map_page(0x1000, DATA, USER_RW) == 0
    assert world.pin(40, Level.L4) == 0
    assert world.ext(MmuextCmd.NEW_BASEPTR, world.mfn(40)) == 0
    assert world.state(L4) == PageState(PageType.L4, 1, True, True)  # only the pin holds it
    demoted = world.ft.stats[PvStat.TABLE_DEVALIDATED]
    assert world.ext(MmuextCmd.UNPIN_TABLE, world.mfn(L4)) == 0
    assert world.ft.stats[PvStat.TABLE_DEVALIDATED] - demoted == 4
    assert world.state(L1) == PageState(PageType.L1, 0, False, False)
    assert world.state(DATA).count == 0
    # A page table no longer in use is a frame like any other: it may be mapped RW.
    assert world.pin(L1, Level.L1) == 0 and world.ext(MmuextCmd.UNPIN_TABLE, world.mfn(L1)) == 0
    assert not audit(world.ft, [world.vcpu])


def test_relinking_a_table_keeps_its_count(world: PvWorld) -> None:
    """Moving the L1 from slot 0 to slot 1 of the L2: the new entry's reference is
    taken before the old one is dropped, so the L1 never de-validates."""
    assert world.update(L2, 1, world.entry(L1, TABLE)) == 0
    assert world.state(L1).count == 2
    demoted = world.ft.stats[PvStat.TABLE_DEVALIDATED]
    assert world.update(L2, 0, 0) == 0
    assert world.state(L1) == PageState(PageType.L1, 1, True, False)
    assert world.ft.stats[PvStat.TABLE_DEVALIDATED] == demoted


# -- the fast path (mod_l1_entry, FASTPATH_FLAG_WHITELIST) ---------------------------------------------
@pytest.mark.parametrize(
    "change",
    [int(PteFlag.A), int(PteFlag.D), int(PteFlag.US), int(PteFlag.G), int(PteFlag.XD), 0x7 << 9, 0x7FF << 52],
    ids=["A", "D", "US", "G", "NX", "AVAIL", "AVAIL_HIGH"],
)
def test_safe_bit_changes_skip_revalidation(world: PvWorld, change: int) -> None:
    assert world.map_page(0x1000, DATA, USER_RW) == 0
    checked, fast = world.ft.stats[PvStat.L1E_CHECKED], world.ft.stats[PvStat.FAST_PATH]
    assert world.map_page(0x1000, DATA, USER_RW ^ change) == 0
    assert world.ft.stats[PvStat.L1E_CHECKED] == checked  # no get_page_from_l1e
    assert world.ft.stats[PvStat.FAST_PATH] == fast + 1
    assert world.state(DATA).count == 1


def test_rw_change_revalidates(world: PvWorld) -> None:
    assert world.map_page(0x1000, DATA, USER_RW) == 0
    checked, fast = world.ft.stats[PvStat.L1E_CHECKED], world.ft.stats[PvStat.FAST_PATH]
    assert world.map_page(0x1000, DATA, USER_RO) == 0
    assert world.ft.stats[PvStat.L1E_CHECKED] == checked + 1
    assert world.ft.stats[PvStat.FAST_PATH] == fast
    assert world.state(DATA).count == 0  # the old RW mapping's reference was dropped
    assert world.map_page(0x1000, DATA, USER_RW) == 0
    assert world.ft.stats[PvStat.L1E_CHECKED] == checked + 2
    assert world.state(DATA).count == 1


def test_new_frame_revalidates_even_with_the_same_flags(world: PvWorld) -> None:
    assert world.map_page(0x1000, DATA, USER_RW) == 0
    checked = world.ft.stats[PvStat.L1E_CHECKED]
    assert world.map_page(0x1000, DATA + 1, USER_RW) == 0
    assert world.ft.stats[PvStat.L1E_CHECKED] == checked + 1
    assert (world.state(DATA).count, world.state(DATA + 1).count) == (0, 1)


def test_upper_level_fast_path_excludes_rw(world: PvWorld) -> None:
    """FASTPATH_PDE_FLAG_WHITELIST (CONFIG_PV_LINEAR_PT=y): A changes fast, RW does not."""
    fast = world.ft.stats[PvStat.FAST_PATH]
    assert world.update(L2, 0, world.entry(L1, TABLE | int(PteFlag.A))) == 0
    assert world.ft.stats[PvStat.FAST_PATH] == fast + 1
    assert world.update(L2, 0, world.entry(L1, USER_RO)) == 0
    assert world.ft.stats[PvStat.FAST_PATH] == fast + 1
    assert world.state(L1) == PageState(PageType.L1, 1, True, False)


# -- TLB effects ------------------------------------------------------------------------------------------
def test_type_change_flushes_a_stale_writable_mapping(world: PvWorld) -> None:
    """A page mapped RW and used, unmapped without a flush, then made an L1: its
    writable TLB entry would let the guest write a page table, so Xen flushes
    (``_get_page_type``: "vital that no other CPUs are left with writeable mappings")."""
    assert world.map_page(0x1000, DATA, USER_RW) == 0
    assert isinstance(world.vcpu.mmu.store(0x1000, 0), Translation) and cached(world, 0x1000)
    assert world.map_page(0x1000, DATA, 0) == 0  # unmapped; the guest does not flush
    assert cached(world, 0x1000)
    flushes = world.ft.stats[PvStat.TYPE_CHANGE_FLUSH]
    assert world.pin(DATA, Level.L1) == 0
    assert world.ft.stats[PvStat.TYPE_CHANGE_FLUSH] == flushes + 1
    assert not cached(world, 0x1000)
    assert not audit(world.ft, [world.vcpu])


def test_no_type_change_flush_after_the_guest_flushed(world: PvWorld) -> None:
    assert world.map_page(0x1000, DATA, USER_RW) == 0
    load(world, 0x1000)
    assert world.map_page(0x1000, DATA, 0) == 0
    assert world.ext(MmuextCmd.TLB_FLUSH_LOCAL) == 0
    flushes, full = world.ft.stats[PvStat.TYPE_CHANGE_FLUSH], world.machine.counters[Event.TLB_FLUSH_GLOBAL]
    assert world.pin(DATA, Level.L1) == 0
    assert world.ft.stats[PvStat.TYPE_CHANGE_FLUSH] == flushes
    assert world.machine.counters[Event.TLB_FLUSH_GLOBAL] == full


def test_l1_updates_leave_flushing_to_the_guest(world: PvWorld) -> None:
    assert world.map_page(0x1000, DATA, USER_RW) == 0
    load(world, 0x1000)
    assert world.map_page(0x1000, DATA + 1, USER_RW) == 0
    assert cached(world, 0x1000)  # stale until the guest invalidates
    assert world.ext(MmuextCmd.INVLPG_LOCAL, 0x1000) == 0
    assert not cached(world, 0x1000)


def test_invlpg_of_a_non_canonical_address_is_ignored(world: PvWorld) -> None:
    assert world.map_page(0x1000, DATA, USER_RW) == 0
    load(world, 0x1000)
    assert world.ext(MmuextCmd.INVLPG_LOCAL, 0x0000_8000_0000_1000) == 0
    assert cached(world, 0x1000)


def test_new_baseptr_loads_cr3_with_the_machine_address(world: PvWorld) -> None:
    assert world.vcpu.mmu.state.cr3 == world.mfn(L4) << PAGE_SHIFT
    assert world.map_page(0x1000, DATA, USER_RW) == 0
    load(world, 0x1000)
    assert world.ext(MmuextCmd.NEW_BASEPTR, world.mfn(L4)) == 0  # same base: a reload
    assert not cached(world, 0x1000)
    assert world.state(L4).count == 2  # pin + base, not taken twice


@pytest.mark.parametrize(
    "flags, flushed",
    [(Uvmf.NONE, False), (Uvmf.INVLPG, True), (Uvmf.TLB_FLUSH, True), (Uvmf.INVLPG | Uvmf.ALL, True)],
    ids=["none", "invlpg", "tlb_flush", "invlpg_all"],
)
def test_update_va_mapping_flushes_as_asked(world: PvWorld, flags: int, flushed: bool) -> None:
    assert world.map_page(0x1000, DATA, USER_RW) == 0
    load(world, 0x1000)
    assert update_va_mapping(world.vcpu, 0x1000, world.entry(DATA + 1, USER_RW), flags) == 0
    assert world.read(L1, 1) == world.stored(DATA + 1, USER_RW)
    assert cached(world, 0x1000) is not flushed


def test_update_va_mapping_with_an_unreadable_bitmap_updates_then_fails(world: PvWorld) -> None:
    """The flush's vcpumask cannot be read: -EFAULT, but the entry has changed."""
    assert world.map_page(0x1000, DATA, USER_RW) == 0
    load(world, 0x1000)
    rc = update_va_mapping(world.vcpu, 0x1000, world.entry(DATA + 1, USER_RW), Uvmf.INVLPG | 0x7000)
    assert rc == neg(Errno.EFAULT)
    assert world.read(L1, 1) == world.stored(DATA + 1, USER_RW)
    assert cached(world, 0x1000)


def test_update_va_mapping_bitmap_selects_vcpu_0(world: PvWorld) -> None:
    assert world.map_page(0x5000, DATA + 5, USER_RW) == 0
    for bitmap, flushed in ((0b10, False), (0b01, True)):  # bit 1: no such vCPU
        world.vcpu.mmu.store(0x5000, bitmap)
        assert world.map_page(0x1000, DATA, USER_RW) == 0
        load(world, 0x1000)
        assert update_va_mapping(world.vcpu, 0x1000, world.entry(DATA + 1, USER_RW), Uvmf.INVLPG | 0x5000) == 0
        assert cached(world, 0x1000) is not flushed


# -- other requests ----------------------------------------------------------------------------------------
def test_preserve_ad_keeps_the_hardware_set_bits(world: PvWorld) -> None:
    assert world.map_page(0x1000, DATA, USER_RW) == 0
    world.vcpu.mmu.store(0x1000, 1)
    assert world.read(L1, 1) & int(PteFlag.A | PteFlag.D) == int(PteFlag.A | PteFlag.D)
    assert world.update(L1, 1, world.entry(DATA, USER_RO), MmuCmd.PT_UPDATE_PRESERVE_AD) == 0
    assert world.read(L1, 1) == world.stored(DATA, USER_RO | int(PteFlag.A | PteFlag.D))
    assert world.update(L1, 1, world.entry(DATA, USER_RO), MmuCmd.NORMAL_PT_UPDATE) == 0
    assert world.read(L1, 1) == world.stored(DATA, USER_RO)


def test_plain_write_to_a_frame_with_no_type_in_use(world: PvWorld) -> None:
    """mmu_update on a frame that is not a page table in use is a checked store."""
    assert world.update(DATA, 3, 0x1234_5678) == 0
    assert world.read(DATA, 3) == 0x1234_5678
    assert world.state(DATA).count == 0


def test_machphys_update_edits_the_m2p(world: PvWorld) -> None:
    mfn = world.mfn(DATA)
    assert mmu_update(world.vcpu, [MmuUpdate((mfn << PAGE_SHIFT) | MmuCmd.MACHPHYS_UPDATE, 0x77)]).rc == 0
    assert world.machine.m2p[mfn] == 0x77
    foreign = world.mfn(0, world.other)
    req = MmuUpdate((foreign << PAGE_SHIFT) | MmuCmd.MACHPHYS_UPDATE, 0x77)
    assert mmu_update(world.vcpu, [req]).rc == neg(Errno.EINVAL)


def test_clear_and_copy_page_need_a_writable_frame(world: PvWorld) -> None:
    world.machine.mem.write_u64(world.maddr(DATA, 0), 42)
    assert world.ext(MmuextCmd.COPY_PAGE, world.mfn(DATA + 1), world.mfn(DATA)) == 0
    assert world.read(DATA + 1, 0) == 42
    assert world.ext(MmuextCmd.CLEAR_PAGE, world.mfn(DATA)) == 0
    assert world.read(DATA, 0) == 0
    assert world.ext(MmuextCmd.CLEAR_PAGE, world.mfn(L1)) == neg(Errno.EINVAL)
    assert world.ext(MmuextCmd.COPY_PAGE, world.mfn(L2), world.mfn(DATA + 1)) == neg(Errno.EINVAL)


def test_set_ldt_and_flush_cache_checks(world: PvWorld) -> None:
    assert world.ext(MmuextCmd.SET_LDT, 0x10_0000, 16) == 0
    assert world.ext(MmuextCmd.SET_LDT, 0x10_0008, 16) == neg(Errno.EINVAL)  # not page aligned
    assert world.ext(MmuextCmd.SET_LDT, 0x10_0000, 8193) == neg(Errno.EINVAL)
    assert world.ext(MmuextCmd.FLUSH_CACHE) == neg(Errno.EACCES)
    dom0 = PvWorld(privileged=True)
    assert dom0.ext(MmuextCmd.FLUSH_CACHE) == 0


# -- the backend ----------------------------------------------------------------------------------------------
def pv_backend(batch_size: int = 32) -> tuple[Machine, PvBackend]:
    machine = Machine(nr_frames=4096, hypervisor_frames=256)
    return machine, PvBackend(machine, machine.create_domain(1, 200), batch_size=batch_size)


def test_backend_refuses_bad_arguments() -> None:
    machine, _ = pv_backend()
    with pytest.raises(RefmodelError, match="batch size"):
        PvBackend(machine, machine.domain(1), batch_size=0)
    other = Machine(nr_frames=4096, hypervisor_frames=256)
    with pytest.raises(RefmodelError, match="does not belong"):
        PvBackend(other, machine.domain(1))


def test_a_refused_kernel_request_is_a_model_bug() -> None:
    _, backend = pv_backend()
    kernel = GuestKernel(backend, 200)
    pid = kernel.create_process()
    root = kernel.processes[pid].root
    with pytest.raises(PvHypercallFailed, match="EBUSY"):
        backend.write_pte(kernel.l1_table(kernel.processes[pid], 0), 0, Level.L1, kernel.entry(root, USER_RW))
    with pytest.raises(RefmodelError, match="write_pte"):
        backend.write_frame_u64(root, 0, 1)


def test_lazy_reads_see_queued_updates_and_cr3_is_the_machine_address() -> None:
    _, backend = pv_backend(32)
    kernel = GuestKernel(backend, 200)
    pid = kernel.create_process()
    proc = kernel.processes[pid]
    assert backend.guest_state.cr3 == backend.pte_frame(proc.root) << PAGE_SHIFT
    l1 = kernel.l1_table(proc, 0x1000)
    value = kernel.entry(GFN(150), USER_RW)
    backend.lazy_begin()
    backend.write_pte(l1, 1, Level.L1, value)
    assert backend.read_pte(l1, 1) == backend.stored_entry(value, Level.L1)  # Xen adds G (adjust_guest_l1e)
    backend.lazy_end()
    assert backend.access(0x1000, AccessKind.READ) == 0
