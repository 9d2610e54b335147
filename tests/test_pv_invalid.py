"""Every request Xen refuses, with Xen's error code, and what a refusal leaves
behind: nothing (frame types, counts and memory unchanged), or — for a batch — the
requests before the failing one, counted in ``done``.

Line numbers cite xen/arch/x86/mm.c (xen-project/xen, commit c447b730) unless
another file is named.
"""

import pytest

from refmodel.arch.pte import Level, PteFlag
from refmodel.arch.types import MFN, PAGE_SHIFT
from refmodel.hv.machine import DOMID_SELF
from refmodel.hv.pv import (
    BatchResult,
    Errno,
    Hypercall,
    MmuextCmd,
    MmuextOp,
    MmuUpdate,
    MulticallEntry,
    PageState,
    PageType,
    neg,
)
from refmodel.hv.pv.hypercall import mmu_update, mmuext_op, multicall
from test_pv_support import DATA, L1, L2, L3, L4, TABLE, USER_RO, USER_RW, PvWorld

EINVAL, EBUSY, EPERM, ENOSYS, ESRCH = (neg(e) for e in (Errno.EINVAL, Errno.EBUSY, Errno.EPERM, Errno.ENOSYS, Errno.ESRCH))


@pytest.fixture
def world() -> PvWorld:
    w = PvWorld()
    w.build_tree()
    return w


def refused(world: PvWorld, rc: int, expected: int) -> None:
    assert rc == expected, f"got {rc}, Xen returns {expected}"


# -- whose frame ------------------------------------------------------------------------------
def test_l1_entry_for_a_foreign_frame_is_ebusy(world: PvWorld) -> None:
    """get_page_from_l1e: real_pg_owner != pg_owner and pg_owner == l1e_owner ->
    ``goto could_not_pin`` (975-983) -> -EBUSY (1037). Read-only does not help."""
    before = world.snapshot()
    foreign = world.entry(0, USER_RO, dom=world.other)
    refused(world, world.update(L1, 0, foreign), EBUSY)
    assert world.snapshot() == before


def test_foreign_frame_as_a_table_or_entry_holder_is_einval(world: PvWorld) -> None:
    """An L2..L4 target the domain does not own: get_page_and_type_from_mfn returns
    -EINVAL (1064-1066). An entry inside a foreign frame: "Could not get page for
    normal update" with rc = -EINVAL (4104-4121). Pinning one: -EINVAL."""
    before = world.snapshot()
    refused(world, world.update(L2, 1, world.entry(0, TABLE, dom=world.other)), EINVAL)
    other_entry = (world.mfn(0, world.other) << PAGE_SHIFT) + 8
    refused(world, mmu_update(world.vcpu, [MmuUpdate.pt_update(other_entry, 0)]).rc, EINVAL)
    refused(world, world.ext(MmuextCmd.PIN_L1_TABLE, world.mfn(0, world.other)), EINVAL)
    assert world.snapshot() == before


def test_hypervisor_frames_are_never_the_guests(world: PvWorld) -> None:
    """A DOMID_XEN frame: as a mapping's target, could_not_pin -> -EBUSY (983,
    1037); as the frame holding an entry, -EINVAL (4121); as a table, -EINVAL (1066)."""
    xen_frame = 5
    assert world.machine.is_hypervisor_frame(xen_frame)
    before = world.snapshot()
    refused(world, world.update(L1, 0, (xen_frame << PAGE_SHIFT) | USER_RO), EBUSY)
    refused(world, mmu_update(world.vcpu, [MmuUpdate.pt_update(xen_frame << PAGE_SHIFT, 0)]).rc, EINVAL)
    refused(world, world.update(L2, 1, (xen_frame << PAGE_SHIFT) | TABLE), EINVAL)
    assert world.snapshot() == before


def test_a_frame_that_is_not_ram_is_an_mmio_attempt(world: PvWorld) -> None:
    """!mfn_valid: "non-privileged attempt to map MMIO space" -> -EPERM (889-891)."""
    before = world.snapshot()
    refused(world, world.update(L1, 0, (world.machine.nr_frames << PAGE_SHIFT) | USER_RO), EPERM)
    assert world.snapshot() == before


# -- page tables stay read-only -----------------------------------------------------------------
def test_writable_mapping_of_a_page_table_is_ebusy(world: PvWorld) -> None:
    """An RW mapping needs a writable type reference, impossible while the frame is
    a page table: "Could not get page type PGT_writable_page" -> could_not_pin
    (1003-1006) -> -EBUSY. A read-only mapping of it is fine and takes no type ref."""
    before = world.snapshot()
    for table in (L4, L3, L2, L1):
        refused(world, world.map_page(0x1000, table, USER_RW), EBUSY)
    assert world.snapshot() == before
    l1_state = world.state(L1)
    assert world.map_page(0x1000, L1, USER_RO) == 0
    assert world.state(L1) == l1_state


def test_a_writably_mapped_frame_cannot_become_a_page_table(world: PvWorld) -> None:
    """The same rule the other way: a frame with a writable type reference in use
    cannot take a page-table type (``_get_page_type``, "Bad type", 2951-2955)."""
    assert world.map_page(0x1000, DATA, USER_RW) == 0
    before = world.snapshot()
    refused(world, world.pin(DATA, Level.L1), EINVAL)
    refused(world, world.update(L2, 1, world.entry(DATA, TABLE)), EINVAL)
    assert world.snapshot() == before


# -- flags -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "level, flags",
    [
        (Level.L2, TABLE | int(PteFlag.PS)),  # a 2 MiB superpage: "Bad L2 flags" (1123-1127, 2283-2287)
        (Level.L2, TABLE | int(PteFlag.G)),  # G only in L1 entries (L1_DISALLOW_MASK, 164)
        (Level.L3, TABLE | int(PteFlag.PS)),  # a 1 GiB superpage
        (Level.L4, TABLE | int(PteFlag.PWT)),  # cache attributes (base_disallow_mask, 282-284)
        (Level.L1, USER_RW | int(PteFlag.PCD)),  # cache bits without I/O privilege (173-177, 2167-2171)
        (Level.L1, USER_RW | int(PteFlag.PS)),  # the PAT bit of a PTE, likewise
    ],
)
def test_disallowed_flags_are_einval(world: PvWorld, level: Level, flags: int) -> None:
    table = {Level.L4: L4, Level.L3: L3, Level.L2: L2, Level.L1: L1}[level]
    before = world.snapshot()
    refused(world, world.update(table, 5, world.entry(DATA, flags)), EINVAL)
    assert world.snapshot() == before


def test_allowed_l1_flags_and_cache_bits_with_io_privilege() -> None:
    """G, NX and the AVAIL bits are a guest's to use in an L1 entry; cache bits
    are allowed to a domain with cache-flush permission (``l1_disallow_mask``)."""
    world = PvWorld(privileged=True)
    world.build_tree()
    avail = 0x7 << 9 | 0x7FF << 52
    assert world.map_page(0x1000, DATA, USER_RW | int(PteFlag.G | PteFlag.XD) | avail) == 0
    assert world.map_page(0x2000, DATA + 1, USER_RW | int(PteFlag.PCD | PteFlag.PWT)) == 0


# -- levels and linear page tables -------------------------------------------------------------------
def test_an_entry_pointing_at_a_table_of_the_wrong_level_is_einval(world: PvWorld) -> None:
    """An L2 entry wants an L1 table; the frame is an L3 in use: "Bad type" -EINVAL
    (2951-2955), and the linear fallback needs the same level. Pinning an L1 in use
    as an L2, or linking an L1 from an L4 slot: -EINVAL."""
    before = world.snapshot()
    refused(world, world.update(L2, 1, world.entry(L3, TABLE)), EINVAL)
    refused(world, world.pin(L1, Level.L2), EINVAL)
    refused(world, world.update(L4, 1, world.entry(L1, TABLE)), EINVAL)
    assert world.snapshot() == before


def test_validation_failure_deep_in_a_tree_undoes_everything(world: PvWorld) -> None:
    """Pinning an L3 whose L2 links an L1 that maps a page table writably: the L1
    fails (-EBUSY), so the L2 and L3 fail with it and no reference taken on the way
    survives (``validate_page``: "type_info = 0")."""
    l3, l2, l1 = 20, 21, 22
    world.machine.mem.write_u64(world.maddr(l3, 0), world.entry(l2, TABLE))
    world.machine.mem.write_u64(world.maddr(l2, 0), world.entry(l1, TABLE))
    world.machine.mem.write_u64(world.maddr(l1, 0), world.entry(DATA, USER_RW))
    world.machine.mem.write_u64(world.maddr(l1, 1), world.entry(L1, USER_RW))
    before = world.snapshot()
    refused(world, world.pin(l3, Level.L3), EBUSY)
    # promote_l1_table stores each validated entry rewritten (adjust_guest_l1e) and
    # leaves it so when a later slot fails; only the references are given back.
    assert world.read(l1, 0) == world.stored(DATA, USER_RW) != world.entry(DATA, USER_RW)
    world.machine.mem.write_u64(world.maddr(l1, 0), world.entry(DATA, USER_RW))
    assert world.snapshot() == before
    assert world.state(DATA).count == 0  # DATA's writable reference was given back


def test_linear_page_tables_xen_refuses(world: PvWorld) -> None:
    """``get_l4_linear_pagetable`` (667-739): a writable linear entry — "Attempt to
    create linear p.t. with write perms" (682-686) — and a cross-level one (the
    target must be ``PGT_l4_page_table|PGT_validated``, 723-727) are refused, so the
    -EINVAL from the type check stands (1179)."""
    before = world.snapshot()
    refused(world, world.update(L4, 510, world.entry(L4, TABLE)), EINVAL)  # writable self-map
    refused(world, world.update(L4, 510, world.entry(L2, USER_RO)), EINVAL)  # read-only, but an L2
    assert world.snapshot() == before


def test_linear_page_tables_xen_allows(world: PvWorld) -> None:
    """A read-only self-map (no reference: 690) and a read-only entry to another
    validated L4 of the domain (one type reference, linear counts 1 / -1). One level
    deep only: a table holding linear entries is not a linear target (709-718)."""
    l4_state = world.state(L4)
    assert world.update(L4, 510, world.entry(L4, USER_RO)) == 0
    assert world.state(L4) == l4_state

    other = 30
    assert world.pin(other, Level.L4) == 0
    assert world.update(L4, 509, world.entry(other, USER_RO)) == 0
    assert world.state(other) == PageState(PageType.L4, 2, True, True, linear_pt_count=-1)
    assert world.state(L4).linear_pt_count == 1

    third = 31
    assert world.pin(third, Level.L4) == 0
    before = world.snapshot()
    refused(world, world.update(third, 1, world.entry(L4, USER_RO)), EINVAL)  # L4 holds linear entries
    refused(world, world.update(other, 1, world.entry(third, USER_RO)), EINVAL)  # other is a linear target
    assert world.snapshot() == before

    assert world.update(L4, 509, 0) == 0  # the linear entry goes: counts come back
    assert world.state(other) == PageState(PageType.L4, 1, True, True)
    assert world.state(L4).linear_pt_count == 0


def test_xen_l4_slots_are_not_the_guests(world: PvWorld) -> None:
    """``is_guest_l4_slot`` (asm/x86_64/page.h 82-86): slots 256..271 belong to Xen;
    mod_l4_entry refuses them with -EINVAL (2396-2401)."""
    before = world.snapshot()
    for slot in (256, 263, 271):
        refused(world, world.update(L4, slot, world.entry(20, TABLE)), EINVAL)
    assert world.snapshot() == before
    assert world.update(L4, 272, world.entry(20, TABLE)) == 0


# -- pinning and base pointers ------------------------------------------------------------------------
def test_pin_and_unpin_errors(world: PvWorld) -> None:
    """"already pinned" -> -EINVAL (3594-3600), the reference taken for it given back;
    "not pinned" -> -EINVAL (3648-3654)."""
    before = world.snapshot()
    refused(world, world.pin(L4, Level.L4), EINVAL)
    refused(world, world.ext(MmuextCmd.UNPIN_TABLE, world.mfn(L3)), EINVAL)
    refused(world, world.ext(MmuextCmd.UNPIN_TABLE, world.mfn(DATA)), EINVAL)
    assert world.snapshot() == before


def test_the_base_in_use_keeps_its_type(world: PvWorld) -> None:
    """Unpinning the current base is allowed (Xen does not check): CR3's own
    reference (``arch.guest_table``) keeps it an L4, so retyping it fails — as an L3
    pin (-EINVAL) or a writable mapping (-EBUSY). Switching away drops that last
    reference and the whole tree de-validates, cascading to the data pages."""
    assert world.map_page(0x1000, DATA, USER_RW) == 0
    assert world.ext(MmuextCmd.UNPIN_TABLE, world.mfn(L4)) == 0
    assert world.state(L4) == PageState(PageType.L4, 1, True, False)
    before = world.snapshot()
    refused(world, world.pin(L4, Level.L3), EINVAL)
    refused(world, world.map_page(0x2000, L4, USER_RW), EBUSY)
    assert world.snapshot() == before

    assert world.pin(40, Level.L4) == 0
    assert world.ext(MmuextCmd.NEW_BASEPTR, world.mfn(40)) == 0
    for table, level in ((L4, PageType.L4), (L3, PageType.L3), (L2, PageType.L2), (L1, PageType.L1)):
        assert world.state(table) == PageState(level, 0, False, False)
    assert world.state(DATA) == PageState(PageType.WRITABLE, 0, True, False)


def test_new_baseptr_errors(world: PvWorld) -> None:
    """new_guest_cr3: a frame not the domain's -> -EINVAL (get_page_and_type_from_mfn,
    1066); a frame of another type in use -> -EINVAL ("Bad type"). Naming a data
    owner other than the caller: -EPERM (3679-3682) — after XSM, which already
    refuses a non-privileged caller (xsm/dummy.h 84-100)."""
    before = world.snapshot()
    refused(world, world.ext(MmuextCmd.NEW_BASEPTR, world.mfn(0, world.other)), EINVAL)
    refused(world, world.ext(MmuextCmd.NEW_BASEPTR, world.mfn(L1)), EINVAL)
    op = MmuextOp(MmuextCmd.NEW_BASEPTR, world.mfn(L4))
    assert mmuext_op(world.vcpu, [op], foreigndom=2) == BatchResult(EPERM, 0)
    assert world.snapshot() == before
    dom0 = PvWorld(privileged=True)
    dom0.build_tree()
    assert mmuext_op(dom0.vcpu, [op], foreigndom=2) == BatchResult(EPERM, 0)


def test_unknown_and_self_named_data_owners_are_esrch(world: PvWorld) -> None:
    """``get_pg_owner`` (common/page_alloc.c 2930-2958): naming oneself by number
    ("Cannot specify itself as foreign domain") or an unknown domain -> -ESRCH."""
    req = [MmuUpdate.pt_update(world.maddr(L1, 0), 0)]
    assert mmu_update(world.vcpu, req, foreigndom=1) == BatchResult(ESRCH, 0)
    assert mmu_update(world.vcpu, req, foreigndom=77) == BatchResult(ESRCH, 0)
    assert mmu_update(world.vcpu, req, foreigndom=DOMID_SELF) == BatchResult(0, 1)


def test_unreadable_vcpu_bitmap_is_einval(world: PvWorld) -> None:
    """MMUEXT_TLB_FLUSH_MULTI: vcpumask_to_pcpumask fails -> -EINVAL (3774-3780)."""
    refused(world, world.ext(MmuextCmd.TLB_FLUSH_MULTI, 0, 0x5000), EINVAL)  # VA 0x5000 not mapped
    assert world.map_page(0x5000, DATA, USER_RW) == 0
    assert world.ext(MmuextCmd.TLB_FLUSH_MULTI, 0, 0x5000) == 0


# -- unknown commands and batches --------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", [4, 5, 6, 7])
def test_mmu_update_commands_4_to_7_are_enosys(world: PvWorld, cmd: int) -> None:
    """``cmd = req.ptr & (sizeof(l1_pgentry_t)-1)``; the default case is -ENOSYS (4256-4257)."""
    before = world.snapshot()
    result = mmu_update(world.vcpu, [MmuUpdate(world.maddr(L1, 0) | cmd, world.entry(DATA, USER_RW))])
    assert result == BatchResult(ENOSYS, 0)
    assert world.snapshot() == before


@pytest.mark.parametrize("cmd", [14, 21, 1000])
def test_unknown_mmuext_commands_are_enosys(world: PvWorld, cmd: int) -> None:
    """do_mmuext_op's default case (3938-3940); [UN]MARK_SUPER are -EOPNOTSUPP (3934-3936)."""
    refused(world, mmuext_op(world.vcpu, [MmuextOp(cmd)]).rc, ENOSYS)
    refused(world, world.ext(MmuextCmd.MARK_SUPER), neg(Errno.EOPNOTSUPP))


def test_a_batch_stops_at_its_first_error(world: PvWorld) -> None:
    """do_mmu_update: "if ( unlikely(rc) ) break;" — the failing request is not done,
    ``*pdone`` counts the ones before it, the rest are never looked at."""
    foreign = world.entry(0, USER_RO, dom=world.other)
    result = world.updates(
        [
            (L1, 1, world.entry(DATA, USER_RW)),
            (L1, 2, world.entry(DATA + 1, USER_RO)),
            (L1, 3, foreign),
            (L1, 4, world.entry(DATA + 2, USER_RW)),
        ]
    )
    assert result == BatchResult(EBUSY, 2)
    assert world.read(L1, 1) == world.stored(DATA, USER_RW)
    assert world.read(L1, 2) == world.stored(DATA + 1, USER_RO)
    assert world.read(L1, 3) == 0 and world.read(L1, 4) == 0
    assert world.state(DATA + 2).count == 0


def test_mmuext_batch_stops_at_its_first_error(world: PvWorld) -> None:
    ops = [
        MmuextOp(MmuextCmd.PIN_L4_TABLE, world.mfn(40)),
        MmuextOp(MmuextCmd.UNPIN_TABLE, world.mfn(41)),  # not pinned
        MmuextOp(MmuextCmd.PIN_L4_TABLE, world.mfn(42)),
    ]
    assert mmuext_op(world.vcpu, ops) == BatchResult(EINVAL, 1)
    assert world.state(40).pinned and not world.state(42).pinned


def test_a_multicall_goes_on_after_a_failing_entry(world: PvWorld) -> None:
    """do_multicall stores each result and continues (common/multicall.c 54-101); a
    nested multicall finds the vCPU in one: "Multicall reentry is disallowed" ->
    -EINVAL (45-49); an unknown hypercall -> -ENOSYS."""
    bad = (MmuUpdate.pt_update(world.maddr(L1, 1), world.entry(L2, USER_RW)),)  # RW map of a table
    good = (MmuUpdate.pt_update(world.maddr(L1, 2), world.entry(DATA, USER_RW)),)
    inner = (MulticallEntry(Hypercall.MMU_UPDATE, args=(good, 1, 0, DOMID_SELF)),)
    out = multicall(
        world.vcpu,
        [
            MulticallEntry(Hypercall.MMU_UPDATE, args=(bad, 1, 0, DOMID_SELF)),
            MulticallEntry(Hypercall.MULTICALL, args=(inner, 1)),
            MulticallEntry(99),
            MulticallEntry(Hypercall.MMU_UPDATE, args=(good, 1, 0, DOMID_SELF)),
            MulticallEntry(Hypercall.UPDATE_VA_MAPPING, args=(0x3000, world.entry(DATA + 1, USER_RO), 0)),
        ],
    )
    assert out.rc == 0
    assert [e.result for e in out.entries] == [EBUSY, EINVAL, ENOSYS, 0, 0]
    assert world.read(L1, 1) == 0
    assert world.read(L1, 2) == world.stored(DATA, USER_RW)
    assert world.read(L1, 3) == world.stored(DATA + 1, USER_RO)
    assert not world.vcpu.in_multicall


def test_a_multicall_of_one_nested_multicall_alone_runs_nothing(world: PvWorld) -> None:
    """The inner multicall's entries never run: its -EINVAL comes before its loop."""
    good = (MmuUpdate.pt_update(world.maddr(L1, 2), world.entry(DATA, USER_RW)),)
    inner = (MulticallEntry(Hypercall.MMU_UPDATE, args=(good, 1, 0, DOMID_SELF)),)
    out = multicall(world.vcpu, [MulticallEntry(Hypercall.MULTICALL, args=(inner, 1))])
    assert [e.result for e in out.entries] == [EINVAL]
    assert world.read(L1, 2) == 0


def test_update_va_mapping_needs_a_validated_l1(world: PvWorld) -> None:
    """``__do_update_va_mapping``: no L1 for ``va`` (map_guest_l1e returns NULL), or a
    Xen address, -> rc = -EINVAL (4488-4492); the flush is skipped on any error."""
    from refmodel.hv.pv.hypercall import update_va_mapping

    before = world.snapshot()
    refused(world, update_va_mapping(world.vcpu, 0x4000_0000, world.entry(DATA, USER_RW), 1), EINVAL)
    refused(world, update_va_mapping(world.vcpu, 0xFFFF_8000_0000_0000, 0, 1), EINVAL)
    refused(world, update_va_mapping(world.vcpu, 0x1000, world.entry(L1, USER_RW), 1), EBUSY)
    assert world.snapshot() == before


def test_mfn_argument_is_a_machine_frame() -> None:
    """The ABI speaks machine frames: pinning by *guest* frame number names some
    other frame — here one the domain does not own."""
    world = PvWorld()
    gfn = 3
    assert world.mfn(gfn) != gfn
    assert world.ext(MmuextCmd.PIN_L4_TABLE, gfn) == EINVAL
    assert MFN(world.mfn(gfn)) in world.machine.frames_of(1)


# -- data owners other than the caller ---------------------------------------------------------------
def test_naming_another_data_owner_needs_privilege(world: PvWorld) -> None:
    """xsm_mmu_update / xsm_update_va_mapping with the dummy policy: only a control
    domain may act for another (xsm/dummy.h 84-100) -> -EPERM, nothing done."""
    from refmodel.hv.pv.hypercall import update_va_mapping_otherdomain

    foreign = world.entry(0, USER_RW, dom=world.other)
    before = world.snapshot()
    assert mmu_update(world.vcpu, [MmuUpdate.pt_update(world.maddr(L1, 1), foreign)], foreigndom=2) == BatchResult(EPERM, 0)
    refused(world, update_va_mapping_otherdomain(world.vcpu, 0x1000, foreign, 0, 2), EPERM)
    refused(world, update_va_mapping_otherdomain(world.vcpu, 0x1000, foreign, 0, 99), ESRCH)
    assert world.snapshot() == before


def test_a_privileged_mapper_maps_the_named_owners_frames() -> None:
    """get_page_from_l1e with pg_owner = the named domain: its frames may be mapped
    (RW takes a writable reference on them); the mapper's own frames may not be
    mapped "on behalf of" a data owner that is not privileged (975-983: -EBUSY)."""
    from refmodel.hv.pv.hypercall import update_va_mapping_otherdomain

    dom0 = PvWorld(privileged=True)
    dom0.build_tree()
    foreign = dom0.entry(3, USER_RW, dom=dom0.other)
    req = [MmuUpdate.pt_update(dom0.maddr(L1, 1), foreign)]
    assert mmu_update(dom0.vcpu, req, foreigndom=2) == BatchResult(0, 1)
    assert dom0.ft.state(dom0.mfn(3, dom0.other)) == PageState(PageType.WRITABLE, 1, True, False)
    assert update_va_mapping_otherdomain(dom0.vcpu, 0x2000, dom0.entry(4, USER_RO, dom=dom0.other), 0, 2) == 0
    own = [MmuUpdate.pt_update(dom0.maddr(L1, 3), dom0.entry(DATA, USER_RO))]
    assert mmu_update(dom0.vcpu, own, foreigndom=2) == BatchResult(EBUSY, 0)
    # Without naming the owner, a foreign frame is refused even to dom0.
    assert dom0.update(L1, 4, foreign) == EBUSY
