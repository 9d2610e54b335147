"""Regression tests for the places where the PV model disagreed with Xen 4.17
(issue 11): each test names the Xen source it checks (xen/arch/x86/...)."""

from dataclasses import replace

import pytest

from refmodel.account.events import Event
from refmodel.arch.control import Cr4
from refmodel.arch.pte import Level, PteFlag
from refmodel.arch.walk import Translation
from refmodel.hv.machine import DOMID_SELF
from refmodel.arch.types import PAGE_SHIFT
from refmodel.hv.pv import Errno, MmuCmd, MmuextCmd, MmuextOp, MmuUpdate, PvStat, PvVcpu, neg
from refmodel.hv.pv.hypercall import mmu_update, mmuext_op, update_va_mapping_otherdomain
from refmodel.hv.pv.adjust import adjust_guest_l1e
from refmodel.hv.pv.pteflags import PTE_ADDR_BITS
from test_pv_support import DATA, L1, L2, L3, L4, TABLE, USER_RO, USER_RW, PvWorld, audit



@pytest.fixture
def world() -> PvWorld:
    w = PvWorld()
    w.build_tree()
    return w


def cached(world: PvWorld, va: int) -> bool:
    return world.machine.tlb.lookup(va, world.vcpu.vpid, 0) is not None


def global_write(world: PvWorld, va: int, gfn: int) -> None:
    """Map ``gfn`` RW and global at ``va``, write it (a global writable TLB entry)."""
    assert world.vcpu.mmu.state.cr4 & Cr4.PGE
    assert world.map_page(va, gfn, USER_RW | int(PteFlag.G)) == 0
    assert isinstance(world.vcpu.mmu.store(va, 0), Translation)
    entry = world.machine.tlb.lookup(va, world.vcpu.vpid, 0)
    assert entry is not None and entry.global_page


# -- 1. Xen's flushes drop global entries too ----------------------------------------------------------
def test_pv_vcpu_runs_with_cr4_pge() -> None:
    """``pv_make_cr4`` (pv/domain.c 182-209): without PCIDs and without XPTI, and
    with ``opt_global_pages`` (on unless Xen runs virtualized on AMD, 168-176), a
    PV vCPU runs with CR4.PGE set."""
    world = PvWorld()
    assert isinstance(world.vcpu, PvVcpu)
    assert world.vcpu.mmu.state.cr4 & Cr4.PGE
    assert not world.vcpu.mmu.state.cr4 & Cr4.PCIDE


def test_type_change_flush_drops_a_stale_global_writable_mapping(world: PvWorld) -> None:
    """``_get_page_type``'s type-change flush is ``flush_tlb_mask`` = ``FLUSH_TLB``,
    which ``do_tlb_flush`` (flushtlb.c 87-112) performs by toggling CR4.PGE or with
    ``invpcid_flush_all``: global entries go too. Otherwise a stale global RW entry
    would let the guest write its new page table."""
    global_write(world, 0x1000, DATA)
    assert world.map_page(0x1000, DATA, 0) == 0  # unmapped; the guest does not flush
    flushes = world.ft.stats[PvStat.TYPE_CHANGE_FLUSH]
    assert world.pin(DATA, Level.L1) == 0
    assert world.ft.stats[PvStat.TYPE_CHANGE_FLUSH] == flushes + 1
    assert not cached(world, 0x1000)
    assert not audit(world.ft, [world.vcpu])


def test_tlb_flush_local_drops_global_entries(world: PvWorld) -> None:
    """MMUEXT_TLB_FLUSH_LOCAL is ``flush_tlb_local()`` = ``flush_local(FLUSH_TLB)``
    (asm/flushtlb.h 152-153) -> ``do_tlb_flush`` (flushtlb.c 98-104)."""
    global_write(world, 0x1000, DATA)
    flushes = world.machine.counters[Event.TLB_FLUSH_GLOBAL]
    assert world.ext(MmuextCmd.TLB_FLUSH_LOCAL) == 0
    assert not cached(world, 0x1000)
    assert world.machine.counters[Event.TLB_FLUSH_GLOBAL] == flushes + 1


def test_new_baseptr_drops_global_entries(world: PvWorld) -> None:
    """``write_ptbase`` -> ``switch_cr3_cr4`` (flushtlb.c 146-151): with CR4.PGE
    staying set Xen first writes CR4 with PGE clear, a flush of everything."""
    global_write(world, 0x1000, DATA)
    assert world.ext(MmuextCmd.NEW_BASEPTR, world.mfn(L4)) == 0  # a reload of the same base
    assert not cached(world, 0x1000)
    assert world.vcpu.mmu.state.cr4 & Cr4.PGE


def test_flushes_without_pge_flush_the_non_global_entries(world: PvWorld) -> None:
    """With CR4.PGE clear (XPTI or global-pages=0) no entry is global: the same
    flushes drop everything the vCPU cached."""
    world.vcpu.mmu.state = replace(world.vcpu.mmu.state, cr4=world.vcpu.mmu.state.cr4 & ~Cr4.PGE)
    assert world.map_page(0x1000, DATA, USER_RW | int(PteFlag.G)) == 0
    assert isinstance(world.vcpu.mmu.store(0x1000, 0), Translation)
    entry = world.machine.tlb.lookup(0x1000, world.vcpu.vpid, 0)
    assert entry is not None and not entry.global_page
    assert world.ext(MmuextCmd.NEW_BASEPTR, world.mfn(L4)) == 0
    assert not cached(world, 0x1000)


# -- 2. domid_t arguments are 16 bits ----------------------------------------------------------------
def test_mmuext_op_foreigndom_is_truncated_to_domid_t() -> None:
    """``do_mmuext_op(..., unsigned int foreigndom)`` passes it to
    ``get_pg_owner(domid_t domid)`` (mm.c 3444, 3485; common/page_alloc.c 2665):
    only the low 16 bits name the data owner."""
    world = PvWorld(privileged=True)
    op = [MmuextOp(MmuextCmd.CLEAR_PAGE, world.mfn(0, world.other))]
    assert mmuext_op(world.vcpu, op, foreigndom=0x1_0000 | world.other.domid).rc == 0
    assert mmuext_op(world.vcpu, op, foreigndom=0x5_0000 | DOMID_SELF).rc == neg(Errno.EINVAL)  # a frame of dom 2, not self


def test_update_va_mapping_otherdomain_domid_is_domid_t(world: PvWorld) -> None:
    """``do_update_va_mapping_otherdomain(..., domid_t domid)`` (mm.c 4576-4582):
    the hypercall argument is truncated to 16 bits."""
    entry = world.entry(DATA, USER_RW)
    assert update_va_mapping_otherdomain(world.vcpu, 0x1000, entry, 0, 0x3_0000 | DOMID_SELF) == 0
    assert world.read(L1, 1) == adjust_guest_l1e(entry)
    assert update_va_mapping_otherdomain(world.vcpu, 0x2000, entry, 0, 0x1_0009) == neg(Errno.ESRCH)  # domain 9


# -- 4. MMUEXT_SET_LDT's nr_ents is 32 bits ----------------------------------------------------------
def test_set_ldt_reads_a_32_bit_entry_count(world: PvWorld) -> None:
    """``unsigned int ents = op.arg2.nr_ents`` (mm.c 3826; public/xen.h struct
    mmuext_op: ``unsigned int nr_ents`` in the arg2 union): the upper 32 bits of the
    64-bit slot are not part of it."""
    assert world.ext(MmuextCmd.SET_LDT, 0x10000, (1 << 32) | 16) == 0
    assert (world.vcpu.ldt_base, world.vcpu.ldt_ents) == (0x10000, 16)
    assert world.ext(MmuextCmd.SET_LDT, 0x10001, 1 << 32) == 0  # no entries: the pointer is not checked
    assert (world.vcpu.ldt_base, world.vcpu.ldt_ents) == (0, 0)
    assert world.ext(MmuextCmd.SET_LDT, 0x10000, (1 << 40) | 8193) == neg(Errno.EINVAL)


# -- 3. frames that are not RAM: I/O memory permission, INVALID_MFN ----------------------------------
INVALID_MFN_ENTRY = PTE_ADDR_BITS | int(PteFlag.P)  #: address bits all ones (``PADDR_MASK >> PAGE_SHIFT``)


def mmio_entry(world: PvWorld, mfn: int, flags: int) -> int:
    assert not world.machine.frame_exists(mfn)
    return (mfn << PAGE_SHIFT) | flags


def test_invalid_mfn_entry_is_einval(world: PvWorld) -> None:
    """``get_page_from_l1e`` (mm.c 897-906): a frame the data owner may not access
    is -EPERM, except INVALID_MFN (``mfn == PADDR_MASK >> PAGE_SHIFT``) -> -EINVAL."""
    assert world.update(L1, 1, INVALID_MFN_ENTRY) == neg(Errno.EINVAL)
    assert world.update(L1, 1, mmio_entry(world, 0x100000, USER_RW)) == neg(Errno.EPERM)
    assert world.read(L1, 1) == 0


def test_iomem_permitted_frame_is_mapped_without_a_type_reference(world: PvWorld) -> None:
    """A frame that is not RAM, inside the data owner's ``iomem_caps``
    (``iomem_access_permitted``, mm.c 897): accepted, no type reference taken; with
    ``opt_mmio_relax`` off a write-back mapping is made uncachable — the flip
    PWT|PCD that ``mod_l1_entry`` applies (mm.c 923-938, 962-972, 2221-2225)."""
    mmio = 0x100000
    world.dom.iomem_caps = ((mmio, mmio + 15),)
    assert world.update(L1, 1, mmio_entry(world, mmio + 3, USER_RW)) == 0
    assert world.read(L1, 1) == adjust_guest_l1e(mmio_entry(world, mmio + 3, USER_RW | int(PteFlag.PWT | PteFlag.PCD)))
    assert world.ft.state(mmio + 3).count == 0
    wt = USER_RW | int(PteFlag.PWT)  # write-through -> PCD added (UC)
    assert world.update(L1, 2, mmio_entry(world, mmio + 4, wt)) == 0
    assert world.read(L1, 2) == adjust_guest_l1e(mmio_entry(world, mmio + 4, wt | int(PteFlag.PCD)))
    uc = USER_RW | int(PteFlag.PWT | PteFlag.PCD)  # already uncachable: no flip
    assert world.update(L1, 3, mmio_entry(world, mmio + 5, uc)) == 0
    assert world.read(L1, 3) == adjust_guest_l1e(mmio_entry(world, mmio + 5, uc))
    assert world.update(L1, 4, mmio_entry(world, mmio + 16, USER_RW)) == neg(Errno.EPERM)  # outside the range
    assert world.update(L1, 4, INVALID_MFN_ENTRY) == neg(Errno.EINVAL)
    assert world.update(L1, 1, 0) == 0  # unmapping drops no reference
    assert not audit(world.ft, [world.vcpu])


def test_iomem_of_the_data_owner_needs_the_page_table_owner_permitted_too() -> None:
    """mm.c 909-921: with a foreign data owner, the page-table owner must also be
    permitted the frame."""
    world = PvWorld(privileged=True)
    world.build_tree()
    mmio = 0x100000
    world.other.iomem_caps = ((mmio, mmio),)
    req = [MmuUpdate.pt_update(world.maddr(L1, 1), mmio_entry(world, mmio, USER_RO))]
    assert mmu_update(world.vcpu, req, foreigndom=world.other.domid).rc == neg(Errno.EPERM)
    world.dom.iomem_caps = ((0, mmio),)
    assert mmu_update(world.vcpu, req, foreigndom=world.other.domid).rc == 0
    assert mmu_update(world.vcpu, [MmuUpdate.pt_update(world.maddr(L1, 2), INVALID_MFN_ENTRY)]).rc == neg(Errno.EINVAL)


def test_iomem_mapping_in_a_validated_l1_is_flipped() -> None:
    """``promote_l1_table`` (mm.c 1350-1359) applies the same flip to the entries of
    a table it validates."""
    world = PvWorld()
    mmio = 0x100000
    world.dom.iomem_caps = ((mmio, mmio),)
    world.machine.mem.write_u64(world.maddr(L1, 1), mmio_entry(world, mmio, USER_RO))
    assert world.pin(L1, Level.L1) == 0
    assert world.read(L1, 1) == adjust_guest_l1e(mmio_entry(world, mmio, USER_RO | int(PteFlag.PWT | PteFlag.PCD)))


# -- 5. the old target of an L2..L4 entry is put after the batch's flush --------------------------------
L1B = 5  #: a second L1 table (a free guest frame below DATA)


def test_old_upper_target_is_put_after_the_flush(world: PvWorld) -> None:
    """``mod_l2_entry`` puts the old target with ``PTF_defer`` (mm.c 2309):
    ``put_pt_page`` only records it in ``old_guest_table`` (1256-1261); the next
    loop iteration of ``do_mmu_update`` sees it and stops with -ERESTART
    (4050-4054), the invocation ends with its ``flush_linear_pt`` flush (4306-4330)
    and the continuation begins with ``put_old_guest_table`` (3997, 3166-3194). So
    the old L1's last type reference goes *after* the flush: its
    ``tlbflush_timestamp`` is newer than the flush, and making it writable later
    flushes again (``_get_page_type``'s ``tlbflush_filter``)."""
    assert world.update(L2, 0, world.entry(L1B, TABLE)) == 0
    assert world.state(L1).count == 0
    flushes = world.ft.stats[PvStat.TYPE_CHANGE_FLUSH]
    assert world.update(L1B, 1, world.entry(L1, USER_RW)) == 0  # the old L1 becomes writable
    assert world.ft.stats[PvStat.TYPE_CHANGE_FLUSH] == flushes + 1


def test_each_deferred_put_ends_an_invocation_with_its_flush(world: PvWorld) -> None:
    """Each L2..L4 change that defers a put splits the batch (mm.c 4050-4054, 4267-4281):
    two such changes in one mmu_update are two flushes; a change that replaces a
    non-present entry defers nothing."""
    assert world.update(L2, 1, world.entry(L1B, TABLE)) == 0  # links: nothing to put
    flushes = world.machine.counters[Event.TLB_FLUSH_GLOBAL]
    result = world.updates([(L2, 0, 0), (L2, 1, 0)])  # both unlink a table: two deferred puts
    assert (result.rc, result.done) == (0, 2)
    assert world.machine.counters[Event.TLB_FLUSH_GLOBAL] == flushes + 2
    assert world.vcpu.old_guest_table is None
    assert world.state(L1).count == 0 and world.state(L1B).count == 0
    flushes = world.machine.counters[Event.TLB_FLUSH_GLOBAL]
    result = world.updates([(L2, 0, world.entry(L1, TABLE)), (L2, 1, world.entry(L1B, TABLE))])
    assert world.machine.counters[Event.TLB_FLUSH_GLOBAL] == flushes + 1
    assert not audit(world.ft, [world.vcpu])


# -- 6. Xen rewrites the entries it stores (xen/arch/x86/pv/mm.h adjust_guest_lNe) -------------------
KERNEL_RW = int(PteFlag.P | PteFlag.RW)  #: a guest-kernel mapping: U clear
GUEST_KERNEL = 1 << 52  #: ``_PAGE_GUEST_KERNEL`` (asm/x86_64/page.h 142)


def test_upper_entries_gain_u_and_the_l4_gains_a(world: PvWorld) -> None:
    """``adjust_guest_l4e`` adds A and U, ``adjust_guest_l2e``/``_l3e`` U (mm.c 2281,
    2343, 2405); a not-present entry is stored as written."""
    assert world.read(L4, 0) == world.entry(L3, TABLE | int(PteFlag.A))
    kernel_table = int(PteFlag.P | PteFlag.RW)
    assert world.update(L3, 0, world.entry(L2, kernel_table)) == 0
    assert world.read(L3, 0) == world.entry(L2, kernel_table | int(PteFlag.US))
    assert world.update(L2, 0, world.entry(L1, kernel_table)) == 0
    assert world.read(L2, 0) == world.entry(L1, kernel_table | int(PteFlag.US))
    assert world.update(L2, 1, 0x7FE) == 0  # not present: untouched
    assert world.read(L2, 1) == 0x7FE


def test_kernel_mappings_gain_u_and_guest_kernel_user_mappings_gain_g(world: PvWorld) -> None:
    """``adjust_guest_l1e`` (mm.c 2201): no U -> U | _PAGE_GUEST_KERNEL; then no
    _PAGE_GUEST_KERNEL -> G | U. A kernel mapping with G keeps it (a warning only)."""
    assert world.map_page(0x1000, DATA, KERNEL_RW) == 0
    assert world.read(L1, 1) == world.entry(DATA, KERNEL_RW | int(PteFlag.US) | GUEST_KERNEL)
    assert world.map_page(0x2000, DATA + 1, USER_RO) == 0
    assert world.read(L1, 2) == world.entry(DATA + 1, USER_RO | int(PteFlag.G))
    assert world.map_page(0x3000, DATA + 2, KERNEL_RW | int(PteFlag.G)) == 0
    assert world.read(L1, 3) == world.entry(DATA + 2, KERNEL_RW | int(PteFlag.G | PteFlag.US) | GUEST_KERNEL)
    assert update_va_mapping_otherdomain(world.vcpu, 0x4000, world.entry(DATA + 3, KERNEL_RW), 0, DOMID_SELF) == 0
    assert world.read(L1, 4) == world.entry(DATA + 3, KERNEL_RW | int(PteFlag.US) | GUEST_KERNEL)


def test_a_ring_3_guest_kernel_reaches_its_kernel_mappings(world: PvWorld) -> None:
    """Why Xen adds U: a 64-bit PV kernel runs in ring 3, so a mapping it made
    without U must still let a user-mode access through."""
    assert world.map_page(0x1000, DATA, KERNEL_RW) == 0
    mmu = world.vcpu.mmu
    mmu.state = replace(mmu.state, cpl=3)
    assert isinstance(mmu.store(0x1000, 7), Translation)


def test_the_fast_path_compares_the_rewritten_entry(world: PvWorld) -> None:
    """Xen rewrites the new entry *before* ``l1e_has_changed``: writing the same
    mapping again without the bits Xen added is a fast-path update."""
    assert world.map_page(0x1000, DATA, KERNEL_RW) == 0
    fast = world.ft.stats[PvStat.FAST_PATH]
    assert world.map_page(0x1000, DATA, KERNEL_RW) == 0
    assert world.ft.stats[PvStat.FAST_PATH] == fast + 1
    assert world.read(L1, 1) == world.entry(DATA, KERNEL_RW | int(PteFlag.US) | GUEST_KERNEL)


def test_validation_rewrites_the_entries_of_a_new_table(world: PvWorld) -> None:
    """``promote_l1_table`` stores ``adjust_guest_l1e`` of each entry it validates
    (mm.c 1359), ``promote_l4_table`` ``adjust_guest_l4e`` (1824)."""
    l1, l4 = 20, 21
    world.machine.mem.write_u64(world.maddr(l1, 0), world.entry(DATA, KERNEL_RW))
    world.machine.mem.write_u64(world.maddr(l1, 1), world.entry(DATA + 1, USER_RW))
    assert world.pin(l1, Level.L1) == 0
    assert world.read(l1, 0) == world.entry(DATA, KERNEL_RW | int(PteFlag.US) | GUEST_KERNEL)
    assert world.read(l1, 1) == world.entry(DATA + 1, USER_RW | int(PteFlag.G))
    world.machine.mem.write_u64(world.maddr(l4, 0), world.entry(L3, int(PteFlag.P)))
    assert world.pin(l4, Level.L4) == 0
    assert world.read(l4, 0) == world.entry(L3, int(PteFlag.P | PteFlag.US | PteFlag.A))


# -- 7. PRESERVE_AD keeps A/D in page-table entries only (found by the differential, seed 123) ---------
@pytest.mark.parametrize("in_use", [False, True], ids=["untyped", "writable-in-use"])
def test_preserve_ad_into_a_frame_that_is_no_page_table_is_a_plain_write(world: PvWorld, in_use: bool) -> None:
    """``do_mmu_update`` writes a frame that is no page table with
    ``paging_write_guest_entry`` (xen/arch/x86/mm.c 4190, 4201): the value as given,
    whatever the command; only ``update_intpte`` (page-table entries) keeps A/D."""
    page = DATA + 4
    if in_use:
        assert world.map_page(0x1000, page, USER_RW) == 0  # a writable type reference
    ad = int(PteFlag.A | PteFlag.D)
    assert world.update(page, 3, 0x1234 | ad) == 0
    assert world.update(page, 3, 0x5600, MmuCmd.PT_UPDATE_PRESERVE_AD) == 0
    assert world.read(page, 3) == 0x5600
