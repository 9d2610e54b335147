"""The 4-level page walk, by example (Intel SDM Vol. 3A, chapter 4).

Each test is a short story: build a mapping, change one thing, make one access, and
check what the SDM says must happen — the physical address, or the #PF with its
error code and CR2, and the Accessed/Dirty flags left in memory. Read top to bottom
they are a guided tour of 4.5 (the walk and its entry formats), 4.6 (access rights),
4.7 (page-fault exceptions) and 4.8 (accessed and dirty flags).

Error-code bits are spelled as in SDM Figure 4-12: P (protection violation rather
than not-present), W (write), U (user-mode access), RSVD (reserved bit), I
(instruction fetch).
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from refmodel.account.events import Event
from refmodel.arch.access import Access, AccessKind
from refmodel.arch.control import Cr0, Cr4, Efer, Rflags
from refmodel.arch.fault import FaultCause
from refmodel.arch.physmem import PhysicalMemory
from refmodel.arch.pte import Level, PageSize, PteFlag
from refmodel.arch.walk import PagingContext, Translation, walk

from pt_helpers import (
    CR0_DEFAULT,
    CR4_DEFAULT,
    EFER_DEFAULT,
    I,
    LEVEL_IDS,
    LEVELS,
    NO_BITS,
    PA,
    RFLAGS_DEFAULT,
    RSVD,
    SUPER_RW,
    USER_RW,
    VA,
    U,
    W,
    P,
    as_fault,
    as_gp,
    as_translation,
    fetch,
    machine,
    read,
    write,
)

#: A 2 MiB page and a 1 GiB page, away from VA's tables.
VA_2M = 0x0000_5A5A_5A40_0000
PA_2M = 0x0000_0001_4020_0000
VA_1G = 0x0000_6AC0_C000_0000
PA_1G = 0x0000_0003_C000_0000

NXE_OFF = int(Efer.LME | Efer.LMA)
CR0_WP_OFF = CR0_DEFAULT & ~int(Cr0.WP)

#: (page size, a mapped VA, its PA) for each page size of 4-level paging.
PAGES = [
    (PageSize.SIZE_4K, VA, PA),
    (PageSize.SIZE_2M, VA_2M, PA_2M),
    (PageSize.SIZE_1G, VA_1G, PA_1G),
]
PAGE_IDS = ["4KiB", "2MiB", "1GiB"]

#: Every (page size, level) pair where an entry takes part in the translation.
SIZE_LEVELS = [(size, va, lvl) for size, va, _ in PAGES for lvl in LEVELS if lvl >= size.leaf_level]
SIZE_LEVEL_IDS = [f"{size.name}-{lvl.entry_name}" for size, _, lvl in SIZE_LEVELS]


# =====================================================================================
# 4.5: translations for each page size
# =====================================================================================


def test_4k_page_translates_to_frame_plus_offset() -> None:
    """SDM 4.5, Figure 4-8: a PTE maps a 4 KiB page; bits 11:0 of the linear address
    are the offset into it, and the walk reads one entry per level (four in all)."""
    m = machine()
    m.map(VA, PA)
    t = as_translation(m.access(VA + 0x123, read()))
    assert t.pa == PA + 0x123
    assert t.size is PageSize.SIZE_4K
    assert t.leaf_addr == m.addr(VA, Level.L1)
    assert t.entry_addrs == tuple(m.addr(VA, lvl) for lvl in LEVELS)


def test_2m_page_translates_to_base_plus_21_bit_offset() -> None:
    """SDM 4.5, Figure 4-9: a PDE with PS = 1 maps a 2 MiB page; bits 20:0 of the
    linear address are the offset, and the walk stops after three entries."""
    m = machine()
    m.map(VA_2M, PA_2M, size=PageSize.SIZE_2M)
    t = as_translation(m.access(VA_2M + 0x1A_BCDE, read()))
    assert t.pa == PA_2M + 0x1A_BCDE
    assert t.size is PageSize.SIZE_2M
    assert len(t.entry_addrs) == 3
    assert t.leaf_addr == m.addr(VA_2M, Level.L2)


def test_1g_page_translates_to_base_plus_30_bit_offset() -> None:
    """SDM 4.5, Figure 4-10: a PDPTE with PS = 1 maps a 1 GiB page; bits 29:0 of the
    linear address are the offset, and the walk reads only two entries."""
    m = machine()
    m.map(VA_1G, PA_1G, size=PageSize.SIZE_1G)
    t = as_translation(m.access(VA_1G + 0x2BCD_EF01, read()))
    assert t.pa == PA_1G + 0x2BCD_EF01
    assert t.size is PageSize.SIZE_1G
    assert len(t.entry_addrs) == 2


def test_kernel_half_address_translates() -> None:
    """SDM 3.3.7.1 / 4.5: a canonical upper-half address (bits 63:47 all ones) is
    walked with bits 47:12 as indices like any other."""
    m = machine()
    kva = 0xFFFF_8880_0123_4000
    m.map(kva, PA, SUPER_RW)
    assert m.pa_of(kva + 8) == PA + 8


def test_pat_bit_12_of_a_large_page_is_not_reserved_and_not_address() -> None:
    """SDM Tables 4-17 and 4-18: bit 12 of a 1 GiB PDPTE or 2 MiB PDE is its PAT
    bit — not reserved, and not part of the page's base address."""
    m = machine()
    m.map(VA_2M, PA_2M, PteFlag.PAT_LARGE | USER_RW, size=PageSize.SIZE_2M)
    m.map(VA_1G, PA_1G, PteFlag.PAT_LARGE | USER_RW, size=PageSize.SIZE_1G)
    assert m.pa_of(VA_2M + 0x10) == PA_2M + 0x10
    assert m.pa_of(VA_1G + 0x10) == PA_1G + 0x10


def test_pat_bit_7_of_a_pte_is_not_page_size() -> None:
    """SDM Table 4-20: bit 7 of a PTE is PAT, not PS — the PTE still maps 4 KiB."""
    m = machine()
    m.map(VA, PA, USER_RW | PteFlag.PS)
    t = as_translation(m.access(VA + 1, read()))
    assert (t.pa, t.size) == (PA + 1, PageSize.SIZE_4K)


def test_ignored_bits_do_not_affect_the_walk() -> None:
    """SDM Tables 4-15..4-20: bits 11:9 and 62:52 of every entry are ignored (bits
    62:59 are protection keys only with CR4.PKE = 1)."""
    m = machine()
    m.map(VA, PA)
    for lvl in LEVELS:
        m.set_bits(VA, lvl, (0x7 << 9) | (0x7FF << 52))
    assert m.pa_of(VA + 0x42) == PA + 0x42


@given(
    page=st.sampled_from(PAGES),
    vpn=st.integers(min_value=1, max_value=(1 << 47) - 1),
    frame=st.integers(min_value=1, max_value=(1 << 46) - 1),
    data=st.data(),
)
def test_any_address_in_a_mapped_page_is_base_plus_offset(
    page: tuple[PageSize, int, int], vpn: int, frame: int, data: st.DataObject
) -> None:
    """SDM 4.5: for every page size, every byte of a mapped page translates to the
    page's base address plus the linear address's offset within the page."""
    size = page[0]
    va_base = (vpn << 12) & ((1 << 47) - 1) & ~(size.value - 1)
    pa_base = (frame << 12) & ((1 << 46) - 1) & ~(size.value - 1)
    offset = data.draw(st.integers(min_value=0, max_value=size.value - 1))
    m = machine()
    m.map(va_base, pa_base, USER_RW, size)
    t = as_translation(m.access(va_base + offset, read(cpl=3)))
    assert t.pa == pa_base + offset
    assert t.page_base == pa_base
    assert t.size is size


# =====================================================================================
# 4.7: not-present entries
# =====================================================================================


@pytest.mark.parametrize("level", LEVELS, ids=LEVEL_IDS)
def test_not_present_at_each_level(level: Level) -> None:
    """SDM 4.7: a walk that meets an entry with P = 0 at any level raises #PF with
    error-code P = 0; CR2 receives the linear address (and it is saved in the vCPU
    state, where a handler would read it)."""
    m = machine()
    m.map(VA, PA)
    m.clear_bits(VA, level, PteFlag.P)
    f = m.fault(VA + 0x7F8, read())
    assert f.error_code == NO_BITS
    assert f.cause is FaultCause.NOT_PRESENT
    assert f.cr2 == VA + 0x7F8
    assert m.mmu.state.cr2 == VA + 0x7F8


@pytest.mark.parametrize("level", LEVELS, ids=LEVEL_IDS)
def test_not_present_error_code_still_reports_write_and_user(level: Level) -> None:
    """SDM 4.7: W/R and U/S describe the access even when the cause is a
    not-present entry: a CPL 3 write gets error code W|U (P = 0)."""
    m = machine()
    m.map(VA, PA)
    m.clear_bits(VA, level, PteFlag.P)
    assert m.fault(VA, write(cpl=3)).error_code == W | U


def test_not_present_entry_with_garbage_is_still_just_not_present() -> None:
    """SDM 4.7: reserved bits are checked only in present entries, so an entry with
    P = 0 and every other bit set gives P = 0, RSVD = 0."""
    m = machine()
    m.map(VA, PA)
    m.set_entry(VA, Level.L1, ((1 << 64) - 1) & ~int(PteFlag.P))
    assert m.fault(VA, read()).error_code == NO_BITS


def test_empty_address_space_faults_at_the_pml4e() -> None:
    """SDM 4.5: the walk stops at the first not-present entry — here the PML4E, after
    a single memory reference."""
    m = machine()
    m.fault(VA, read())
    assert m.count(Event.WALK_REF) == 1


# =====================================================================================
# 4.5 / 4.7: reserved bits
# =====================================================================================


@pytest.mark.parametrize(("size", "va", "level"), SIZE_LEVELS, ids=SIZE_LEVEL_IDS)
def test_bit_above_maxphyaddr_is_reserved_at_every_level(size: PageSize, va: int, level: Level) -> None:
    """SDM Tables 4-14..4-20: bits 51:MAXPHYADDR of every entry are reserved. A walk
    that meets one raises #PF with P = 1 and RSVD = 1 (SDM 4.7)."""
    m = machine(maxphyaddr=40)
    m.map(va, PA_1G, USER_RW, size)
    m.set_bits(va, level, 1 << 40)
    f = m.fault(va, read())
    assert f.error_code == P | RSVD
    assert f.cause is FaultCause.RESERVED_BIT


@given(
    level=st.sampled_from(LEVELS),
    maxphyaddr=st.integers(min_value=36, max_value=51),
    data=st.data(),
)
def test_any_bit_between_maxphyaddr_and_51_is_reserved(level: Level, maxphyaddr: int, data: st.DataObject) -> None:
    """SDM 4.5: every bit from MAXPHYADDR up to 51 is reserved, whatever MAXPHYADDR
    the processor reports (CPUID.80000008H:EAX[7:0])."""
    bit = data.draw(st.integers(min_value=maxphyaddr, max_value=51))
    m = machine(maxphyaddr=maxphyaddr)
    m.map(VA, PA)
    m.set_bits(VA, level, 1 << bit)
    assert m.fault(VA, read()).error_code == P | RSVD


def test_bits_below_maxphyaddr_are_address_bits() -> None:
    """SDM 4.5: bit MAXPHYADDR-1 is the top address bit, not reserved."""
    m = machine(maxphyaddr=40)
    m.map(VA, 1 << 39)
    assert m.pa_of(VA) == 1 << 39


def test_ps_in_a_pml4e_is_reserved() -> None:
    """SDM Table 4-14: bit 7 of a PML4E is reserved (must be 0) — there are no
    512 GiB pages with 4-level paging."""
    m = machine()
    m.map(VA, PA)
    m.set_bits(VA, Level.L4, PteFlag.PS)
    assert m.fault(VA, read()).error_code == P | RSVD


def test_ps_in_a_pdpte_is_reserved_without_1g_page_support() -> None:
    """SDM 4.1.4, Table 4-16: a PDPTE may map a 1 GiB page only if
    CPUID.80000001H:EDX.Page1GB[bit 26] = 1; otherwise PS is reserved."""
    m = machine(page1gb=False)
    m.map(VA_1G, PA_1G, size=PageSize.SIZE_1G)
    assert m.fault(VA_1G, read()).error_code == P | RSVD


@pytest.mark.parametrize(("size", "va", "level"), SIZE_LEVELS, ids=SIZE_LEVEL_IDS)
def test_xd_is_reserved_when_nxe_is_off(size: PageSize, va: int, level: Level) -> None:
    """SDM 4.6 and Tables 4-14..4-20: with IA32_EFER.NXE = 0 bit 63 (XD) is reserved
    at every level — a read through it faults with RSVD, not just a fetch."""
    m = machine(efer=NXE_OFF)
    m.map(va, PA_1G, USER_RW, size)
    m.set_bits(va, level, PteFlag.XD)
    assert m.fault(va, read()).error_code == P | RSVD


@pytest.mark.parametrize("bit", range(13, 21))
def test_2m_pde_bits_20_to_13_are_reserved(bit: int) -> None:
    """SDM Table 4-18: in a PDE that maps a 2 MiB page, bits 20:13 are reserved (the
    page base must be 2 MiB aligned; bit 12 is PAT)."""
    m = machine()
    m.map(VA_2M, PA_2M, size=PageSize.SIZE_2M)
    m.set_bits(VA_2M, Level.L2, 1 << bit)
    assert m.fault(VA_2M, read()).error_code == P | RSVD


@pytest.mark.parametrize("bit", range(13, 30))
def test_1g_pdpte_bits_29_to_13_are_reserved(bit: int) -> None:
    """SDM Table 4-16: in a PDPTE that maps a 1 GiB page, bits 29:13 are reserved."""
    m = machine()
    m.map(VA_1G, PA_1G, size=PageSize.SIZE_1G)
    m.set_bits(VA_1G, Level.L3, 1 << bit)
    assert m.fault(VA_1G, read()).error_code == P | RSVD


@pytest.mark.parametrize("bit", range(12, 21))
def test_low_bits_of_a_non_leaf_pde_are_address_bits(bit: int) -> None:
    """SDM Table 4-19: a PDE with PS = 0 references a page table; its bits 20:12
    are address bits, so the large-page alignment rule does not apply."""
    m = machine()
    m.map(VA, PA)
    table = m.entry(VA, Level.L2) & ~0xFFF
    # Move the page table to a frame whose address has ``bit`` set; copy it there.
    new_table = (table | (1 << bit)) + (1 << 32)
    m.mem.load_frame(new_table >> 12, m.mem.frame_bytes(table >> 12))
    m.set_entry(VA, Level.L2, new_table | (m.entry(VA, Level.L2) & 0xFFF))
    assert m.pa_of(VA) == PA


def test_rsvd_fault_reports_the_access_too() -> None:
    """SDM 4.7: a reserved-bit fault still sets W/R, U/S and I/D to describe the
    access: a CPL 3 write through a bad PDPTE gets P|W|U|RSVD."""
    m = machine()
    m.map(VA, PA)
    m.set_bits(VA, Level.L3, 1 << 50)
    assert m.fault(VA, write(cpl=3)).error_code == P | W | U | RSVD
    assert m.fault(VA, fetch()).error_code == P | RSVD | I


def test_reserved_bit_beats_a_not_present_lower_level() -> None:
    """SDM 4.5: the walk stops at the first entry that cannot be used — a reserved
    bit in the PDE is reported even though the PTE below is not present."""
    m = machine()
    m.map(VA, PA)
    m.clear_bits(VA, Level.L1, PteFlag.P)
    m.set_bits(VA, Level.L2, 1 << 51)
    assert m.fault(VA, read()).error_code == P | RSVD


# =====================================================================================
# 4.6: write protection (R/W and CR0.WP)
# =====================================================================================


def test_supervisor_write_to_read_only_page_faults_with_wp() -> None:
    """SDM 4.6.1: with CR0.WP = 1 a supervisor-mode write needs R/W = 1 at every
    level; a write to a read-only page raises #PF with error code P|W."""
    m = machine()
    m.map(VA, PA, PteFlag.US)
    f = m.fault(VA, write())
    assert f.error_code == P | W
    assert f.cause is FaultCause.WRITE_PROTECT
    assert m.mmu.state.cr2 == VA


def test_supervisor_write_to_read_only_page_succeeds_without_wp() -> None:
    """SDM 4.6.1: with CR0.WP = 0 supervisor-mode writes ignore R/W — the write goes
    through and the store reaches memory."""
    m = machine(cr0=CR0_WP_OFF)
    m.map(VA, PA, PteFlag(0))
    assert isinstance(m.mmu.store(VA + 8, 0xDEAD_BEEF), Translation)
    assert m.mem.read_u64(PA + 8) == 0xDEAD_BEEF


@pytest.mark.parametrize("cr0", [CR0_DEFAULT, CR0_WP_OFF], ids=["WP=1", "WP=0"])
def test_user_write_to_read_only_page_always_faults(cr0: int) -> None:
    """SDM 4.6.1: a user-mode write needs R/W = 1 at every level whatever CR0.WP
    says; error code P|W|U."""
    m = machine(cr0=cr0)
    m.map(VA, PA, PteFlag.US)
    assert m.fault(VA, write(cpl=3)).error_code == P | W | U


@pytest.mark.parametrize("level", [Level.L4, Level.L3, Level.L2], ids=LEVEL_IDS[:3])
def test_read_only_upper_level_write_protects_the_page(level: Level) -> None:
    """SDM 4.6.1: rights combine over all levels — R/W = 0 in any one paging-
    structure entry makes the page read-only, even if the PTE says R/W = 1. Reads are
    still allowed."""
    m = machine()
    m.map(VA, PA, USER_RW)
    m.clear_bits(VA, level, PteFlag.RW)
    assert m.fault(VA, write()).error_code == P | W
    assert m.fault(VA, write(cpl=3)).error_code == P | W | U
    assert m.pa_of(VA, read(cpl=3)) == PA


@pytest.mark.parametrize("cpl", [1, 2])
def test_cpl_1_and_2_are_supervisor_mode(cpl: int) -> None:
    """SDM 4.6: accesses at CPL 0, 1 and 2 are supervisor-mode accesses: they may
    read a supervisor page, and their faults have U = 0."""
    m = machine()
    m.map(VA, PA, PteFlag.US)
    assert m.pa_of(VA, read(cpl=cpl)) == PA
    assert m.fault(VA, write(cpl=cpl)).error_code == P | W


# =====================================================================================
# 4.6: user/supervisor
# =====================================================================================


@pytest.mark.parametrize("level", LEVELS, ids=LEVEL_IDS)
def test_supervisor_bit_at_any_one_level_blocks_user_mode(level: Level) -> None:
    """SDM 4.6.1: a linear address is a user-mode address only if U/S = 1 at every
    level. Clearing U/S in any one entry makes it a supervisor-mode address: CPL 3
    reads fault with P|U, CPL 0 reads still succeed."""
    m = machine()
    m.map(VA, PA, USER_RW)
    m.clear_bits(VA, level, PteFlag.US)
    f = m.fault(VA, read(cpl=3))
    assert f.error_code == P | U
    assert f.cause is FaultCause.USER_SUPERVISOR
    assert m.fault(VA, fetch(cpl=3)).error_code == P | U | I
    assert m.pa_of(VA, read(cpl=0)) == PA


def test_user_mode_may_read_write_and_fetch_a_user_page() -> None:
    """SDM 4.6.1: with U/S = 1 and R/W = 1 everywhere and XD = 0, CPL 3 may read,
    write and fetch."""
    m = machine()
    m.map(VA, PA, USER_RW)
    for access in (read(cpl=3), write(cpl=3), fetch(cpl=3)):
        assert m.pa_of(VA, access) == PA


def test_implicit_access_at_cpl3_is_supervisor_mode() -> None:
    """SDM 4.6: an implicit access to a system data structure (e.g. the GDT) is a
    supervisor-mode access regardless of CPL: it may read a supervisor page, and a
    fault it raises reports U = 0."""
    m = machine()
    m.map(VA, PA, PteFlag(0))
    assert m.pa_of(VA, read(cpl=3, implicit=True)) == PA
    assert m.fault(VA, write(cpl=3, implicit=True)).error_code == P | W


# =====================================================================================
# 4.6: execute-disable
# =====================================================================================


@pytest.mark.parametrize("level", LEVELS, ids=LEVEL_IDS)
def test_xd_at_any_level_blocks_fetches_with_nxe(level: Level) -> None:
    """SDM 4.6.1: with IA32_EFER.NXE = 1 instructions may be fetched only if XD = 0
    at every level. XD in any one entry stops CPL 0 and CPL 3 fetches (error code
    P|I, plus U at CPL 3); data reads and writes are unaffected."""
    m = machine()
    m.map(VA, PA, USER_RW)
    m.set_bits(VA, level, PteFlag.XD)
    f = m.fault(VA, fetch())
    assert f.error_code == P | I
    assert f.cause is FaultCause.EXECUTE_DISABLE
    assert m.fault(VA, fetch(cpl=3)).error_code == P | U | I
    assert m.pa_of(VA, read(cpl=3)) == PA
    assert m.pa_of(VA, write(cpl=3)) == PA


def test_fetch_allowed_without_xd() -> None:
    """SDM 4.6.1: XD = 0 everywhere (NXE = 1): supervisor and user fetches proceed."""
    m = machine()
    m.map(VA, PA, SUPER_RW)
    assert m.pa_of(VA + 3, fetch()) == PA + 3


# =====================================================================================
# 4.6: SMEP and SMAP
# =====================================================================================


def test_smep_blocks_supervisor_fetch_from_user_page() -> None:
    """SDM 4.6.1: with CR4.SMEP = 1 supervisor-mode fetches from a user-mode address
    fault (P|I); supervisor pages and CPL 3 fetches are unaffected."""
    m = machine(cr4=CR4_DEFAULT | int(Cr4.SMEP))
    m.map(VA, PA, USER_RW)
    f = m.fault(VA, fetch())
    assert f.error_code == P | I
    assert f.cause is FaultCause.SMEP
    assert m.pa_of(VA, fetch(cpl=3)) == PA
    assert m.pa_of(VA, read()) == PA


def test_smep_does_not_apply_when_any_level_is_supervisor() -> None:
    """SDM 4.6.1: U/S = 0 at the PDPTE makes the page a supervisor-mode address, so
    SMEP does not stop a CPL 0 fetch."""
    m = machine(cr4=CR4_DEFAULT | int(Cr4.SMEP))
    m.map(VA, PA, USER_RW)
    m.clear_bits(VA, Level.L3, PteFlag.US)
    assert m.pa_of(VA, fetch()) == PA


def test_without_smep_supervisor_may_fetch_from_user_page() -> None:
    """SDM 4.6.1: with CR4.SMEP = 0 supervisor fetches from user pages are allowed."""
    m = machine()
    m.map(VA, PA, USER_RW)
    assert m.pa_of(VA, fetch()) == PA


SMAP = CR4_DEFAULT | int(Cr4.SMAP)
AC = RFLAGS_DEFAULT | int(Rflags.AC)


def test_smap_blocks_supervisor_reads_and_writes_of_user_pages() -> None:
    """SDM 4.6.1: with CR4.SMAP = 1 and RFLAGS.AC = 0, supervisor-mode data reads and
    writes of a user-mode address fault (P, and P|W)."""
    m = machine(cr4=SMAP)
    m.map(VA, PA, USER_RW)
    f = m.fault(VA, read())
    assert f.error_code == P
    assert f.cause is FaultCause.SMAP
    assert m.fault(VA, write()).error_code == P | W


def test_smap_lifted_by_rflags_ac_for_explicit_accesses() -> None:
    """SDM 4.6.1: with RFLAGS.AC = 1 (STAC), explicit supervisor reads and writes of
    user pages are allowed again."""
    m = machine(cr4=SMAP, rflags=AC)
    m.map(VA, PA, USER_RW)
    assert m.pa_of(VA, read()) == PA
    assert m.pa_of(VA, write()) == PA


def test_smap_applies_to_implicit_accesses_even_with_ac() -> None:
    """SDM 4.6.1: an implicit supervisor-mode access to a user-mode address faults
    under SMAP whatever RFLAGS.AC says."""
    m = machine(cr4=SMAP, rflags=AC)
    m.map(VA, PA, USER_RW)
    assert m.fault(VA, read(implicit=True)).error_code == P
    assert m.fault(VA, read(cpl=3, implicit=True)).error_code == P


def test_smap_leaves_user_mode_supervisor_pages_and_fetches_alone() -> None:
    """SDM 4.6.1: SMAP restricts only supervisor-mode data accesses to user-mode
    addresses: CPL 3 accesses, supervisor pages and instruction fetches are as before."""
    m = machine(cr4=SMAP)
    m.map(VA, PA, USER_RW)
    m.map(VA + 0x1000, PA + 0x1000, SUPER_RW)
    assert m.pa_of(VA, read(cpl=3)) == PA
    assert m.pa_of(VA + 0x1000, write()) == PA + 0x1000
    assert m.pa_of(VA, fetch()) == PA


def test_smap_with_ac_still_honours_write_protect() -> None:
    """SDM 4.6.1: with SMAP lifted by AC = 1, a supervisor write to a read-only user
    page is judged as without SMAP: it faults when CR0.WP = 1."""
    m = machine(cr4=SMAP, rflags=AC)
    m.map(VA, PA, PteFlag.US)
    assert m.fault(VA, write()).error_code == P | W


# =====================================================================================
# 4.7: the I/D and U/S bits of the error code
# =====================================================================================


@pytest.mark.parametrize(
    ("efer", "cr4", "reports_i"),
    [
        (EFER_DEFAULT, CR4_DEFAULT, True),
        (NXE_OFF, CR4_DEFAULT, False),
        (NXE_OFF, CR4_DEFAULT | int(Cr4.SMEP), True),
        (EFER_DEFAULT, CR4_DEFAULT | int(Cr4.SMEP), True),
    ],
    ids=["NXE", "neither", "SMEP", "NXE+SMEP"],
)
def test_id_bit_only_with_nxe_or_smep(efer: int, cr4: int, reports_i: bool) -> None:
    """SDM 4.7: I/D = 1 only if the access was an instruction fetch and either
    CR4.SMEP = 1 or (CR4.PAE = 1 and IA32_EFER.NXE = 1). A fetch from a not-present
    page shows it; a read never does."""
    m = machine(efer=efer, cr4=cr4)
    assert m.fault(VA, fetch()).error_code == (I if reports_i else NO_BITS)
    assert m.fault(VA, fetch(cpl=3)).error_code == (U | I if reports_i else U)
    assert m.fault(VA, read()).error_code == NO_BITS


@pytest.mark.parametrize("kind", list(AccessKind), ids=[k.value for k in AccessKind])
def test_u_bit_set_for_every_cpl3_fault(kind: AccessKind) -> None:
    """SDM 4.7: U/S = 1 in the error code iff the faulting access was a user-mode
    access (CPL 3, not implicit)."""
    m = machine()
    m.map(VA, PA, PteFlag(0))
    assert m.fault(VA, Access(kind, 3)).error_code & U
    assert not m.fault(VA + 0x1000, Access(kind, 0)).error_code & U


# =====================================================================================
# 3.3.7.1: non-canonical addresses
# =====================================================================================


@pytest.mark.parametrize("va", [1 << 47, 0xFFFF_7FFF_FFFF_F000, 0x8000_0000_0000_0000, 0x00FF_0000_0000_0000])
def test_non_canonical_address_is_gp_not_pf(va: int) -> None:
    """SDM 3.3.7.1 and 6.15: a linear address whose bits 63:47 are not all equal is
    non-canonical; using it raises #GP(0) — no walk, no #PF, CR2 untouched."""
    m = machine()
    m.map(VA, PA)
    gp = as_gp(m.access(va, read()))
    assert gp.error_code == 0
    assert m.mmu.state.cr2 == 0
    assert m.count(Event.WALK_REF) == 0


@given(va=st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_canonical_iff_bits_63_to_47_equal(va: int) -> None:
    """SDM 3.3.7.1: an access never walks a non-canonical address and never answers
    #GP for a canonical one (the empty address space gives #PF instead)."""
    m = machine()
    out = m.access(va, read())
    top = va >> 47
    if top in (0, (1 << 17) - 1):
        assert as_fault(out).cr2 == va
    else:
        as_gp(out)


# =====================================================================================
# 4.8: accessed and dirty flags
# =====================================================================================


def test_read_sets_accessed_at_every_level_but_not_dirty() -> None:
    """SDM 4.8: the processor sets A in every paging-structure entry it uses; a read
    sets no D flag anywhere."""
    m = machine()
    m.map(VA, PA)
    m.access(VA, read())
    for lvl in LEVELS:
        assert m.has(VA, lvl, PteFlag.A), lvl.entry_name
        assert not m.has(VA, lvl, PteFlag.D), lvl.entry_name


def test_write_sets_dirty_on_the_leaf_only() -> None:
    """SDM 4.8: a write sets D in the entry that maps the page (the PTE) and in no
    other; all four entries get A."""
    m = machine()
    m.map(VA, PA)
    m.access(VA, write())
    assert m.has(VA, Level.L1, PteFlag.D)
    for lvl in (Level.L4, Level.L3, Level.L2):
        assert not m.has(VA, lvl, PteFlag.D), lvl.entry_name
    for lvl in LEVELS:
        assert m.has(VA, lvl, PteFlag.A), lvl.entry_name


@pytest.mark.parametrize(("size", "va", "pa"), PAGES[1:], ids=PAGE_IDS[1:])
def test_large_page_leaf_gets_a_and_d(size: PageSize, va: int, pa: int) -> None:
    """SDM 4.8: for a 2 MiB or 1 GiB page the PDE or PDPTE is the leaf: a read sets
    its A, a write its D; the entries above get A only."""
    m = machine()
    m.map(va, pa, USER_RW, size)
    m.access(va, read())
    leaf = size.leaf_level
    assert m.has(va, leaf, PteFlag.A) and not m.has(va, leaf, PteFlag.D)
    m.mmu.invlpg(va)
    m.access(va, write())
    assert m.has(va, leaf, PteFlag.D)
    assert all(not m.has(va, lvl, PteFlag.D) for lvl in LEVELS if lvl > leaf)


@pytest.mark.parametrize("level", LEVELS, ids=LEVEL_IDS)
def test_faulting_walk_sets_a_above_and_leaves_the_faulting_entry_alone(level: Level) -> None:
    """SDM 4.8: entries the walk used before it met a not-present entry get A set;
    the not-present entry itself (and anything below it) is not written."""
    m = machine()
    m.map(VA, PA)
    m.clear_bits(VA, level, PteFlag.P)
    below = {lvl: m.entry(VA, lvl) for lvl in LEVELS if lvl <= level}
    m.fault(VA, write())
    for lvl in LEVELS:
        if lvl > level:
            assert m.has(VA, lvl, PteFlag.A), lvl.entry_name
        else:
            assert m.entry(VA, lvl) == below[lvl], lvl.entry_name


def test_reserved_bit_fault_leaves_the_bad_entry_alone() -> None:
    """SDM 4.8: a PDE with a reserved bit set is not used, so it gets no A flag;
    the PML4E and PDPTE above it were used and do."""
    m = machine()
    m.map(VA, PA)
    m.set_bits(VA, Level.L2, 1 << 51)
    pde = m.entry(VA, Level.L2)
    m.fault(VA, read())
    assert m.entry(VA, Level.L2) == pde
    assert m.has(VA, Level.L4, PteFlag.A) and m.has(VA, Level.L3, PteFlag.A)


@pytest.mark.parametrize(
    ("flags", "access"),
    [(PteFlag.US, write()), (PteFlag.RW, read(cpl=3)), (USER_RW | PteFlag.XD, fetch())],
    ids=["write-protect", "user-supervisor", "execute-disable"],
)
def test_permission_fault_leaves_leaf_a_and_d_clear(flags: PteFlag, access: Access) -> None:
    """SDM 4.8: the processor does not mark a page accessed (or dirty) for an access
    it refused: after a protection #PF the PTE is unchanged; the upper entries were
    used by the walk and have A set."""
    m = machine()
    m.map(VA, PA, flags)
    pte = m.entry(VA, Level.L1)
    assert m.fault(VA, access).error_code & P
    assert m.entry(VA, Level.L1) == pte
    assert all(m.has(VA, lvl, PteFlag.A) for lvl in (Level.L4, Level.L3, Level.L2))


def test_write_through_a_tlb_entry_cached_by_a_read_rewalks_to_set_d() -> None:
    """SDM 4.8: a processor sets D the first time it writes a page; a TLB entry
    cached by a read (D = 0) cannot be used for that write, so the write walks again
    and sets D. A second write then hits the TLB."""
    m = machine()
    m.map(VA, PA)
    m.access(VA, read())
    m.access(VA, read())
    assert m.count(Event.TLB_HIT) == 1
    assert not m.has(VA, Level.L1, PteFlag.D)
    m.access(VA, write())
    assert m.has(VA, Level.L1, PteFlag.D)
    assert m.count(Event.TLB_MISS) == 2
    assert m.count(Event.WALK_REF) == 8
    m.access(VA, write())
    assert m.count(Event.TLB_HIT) == 2


class RecordingMemory:
    """Physical memory that remembers every entry write (to count A/D updates)."""

    def __init__(self, mem: PhysicalMemory) -> None:
        self.mem = mem
        self.writes: list[int] = []

    def read_u64(self, pa: int) -> int:
        return self.mem.read_u64(pa)

    def write_u64(self, pa: int, value: int) -> None:
        self.writes.append(pa)
        self.mem.write_u64(pa, value)


def test_walk_writes_each_entry_at_most_once_and_only_to_change_it() -> None:
    """SDM 4.8: A and D are set only if not already set. The first write walk updates
    each of the four entries once (A|D of the leaf together); a repeat walk, with all
    flags already set, writes nothing."""
    m = machine()
    m.map(VA, PA)
    spy = RecordingMemory(m.mem)
    ctx = m.mmu.ctx
    walk(spy, ctx, VA, write())
    assert sorted(spy.writes) == sorted(m.addr(VA, lvl) for lvl in LEVELS)
    spy.writes.clear()
    walk(spy, ctx, VA, write())
    assert spy.writes == []


# =====================================================================================
# 4.6 + 4.7 + 4.8 together: every combination of rights, against the SDM's prose
# =====================================================================================


def sdm_allows(rw: bool, us: bool, xd: bool, access: Access, ctx: PagingContext) -> bool:
    """SDM 4.6.1 written out as a list of rules, for the property test below.
    ``rw``/``us`` are R/W and U/S ANDed over the levels, ``xd`` is XD ORed."""
    user_mode = access.cpl == 3 and not access.implicit
    kind = access.kind
    if kind is AccessKind.FETCH and ctx.nxe and xd:
        return False  # XD = 1 somewhere: no fetch by anyone
    if user_mode:
        if not us:
            return False  # user mode reaches user-mode addresses only
        return rw or kind is not AccessKind.WRITE  # writes need R/W = 1 whatever CR0.WP
    if kind is AccessKind.FETCH:
        return not (us and ctx.smep)
    if us and ctx.smap and (access.implicit or not ctx.ac):
        return False
    return rw or kind is not AccessKind.WRITE or not ctx.wp


@given(
    rw=st.lists(st.booleans(), min_size=4, max_size=4),
    us=st.lists(st.booleans(), min_size=4, max_size=4),
    xd=st.lists(st.booleans(), min_size=4, max_size=4),
    kind=st.sampled_from(list(AccessKind)),
    cpl=st.sampled_from([0, 3]),
    implicit=st.booleans(),
    wp=st.booleans(),
    nxe=st.booleans(),
    smep=st.booleans(),
    smap=st.booleans(),
    ac=st.booleans(),
)
def test_rights_error_code_and_flags_match_the_sdm(
    rw: list[bool], us: list[bool], xd: list[bool], kind: AccessKind, cpl: int,
    implicit: bool, wp: bool, nxe: bool, smep: bool, smap: bool, ac: bool,
) -> None:
    """SDM 4.6.1, 4.7, 4.8 over every combination: the access succeeds exactly when
    the SDM's rules allow it; a refusal is a #PF with P = 1, W/U/I as SDM 4.7 says
    and the leaf untouched; a success sets the leaf's A (and D for a write). XD
    bits are only set when NXE = 1 (with NXE = 0 they are reserved: tested above)."""
    implicit = implicit and kind is not AccessKind.FETCH
    m = machine(
        cr0=CR0_DEFAULT if wp else CR0_WP_OFF,
        cr4=CR4_DEFAULT | (int(Cr4.SMEP) if smep else 0) | (int(Cr4.SMAP) if smap else 0),
        efer=EFER_DEFAULT if nxe else NXE_OFF,
        rflags=AC if ac else RFLAGS_DEFAULT,
    )
    m.map(VA, PA, PteFlag(0))
    for i, lvl in enumerate(LEVELS):
        entry = m.entry(VA, lvl) & ~int(PteFlag.RW | PteFlag.US | PteFlag.XD)
        entry |= (int(PteFlag.RW) if rw[i] else 0) | (int(PteFlag.US) if us[i] else 0)
        entry |= int(PteFlag.XD) if xd[i] and nxe else 0
        m.set_entry(VA, lvl, entry)
    access = Access(kind, cpl, implicit)
    allowed = sdm_allows(all(rw), all(us), any(xd) and nxe, access, m.mmu.ctx)
    pte_before = m.entry(VA, Level.L1)
    out = m.access(VA + 0x10, access)
    if allowed:
        assert as_translation(out).pa == PA + 0x10
        assert m.has(VA, Level.L1, PteFlag.A)
        assert m.has(VA, Level.L1, PteFlag.D) == (kind is AccessKind.WRITE)
    else:
        expected = P
        if kind is AccessKind.WRITE:
            expected |= W
        if cpl == 3 and not implicit:
            expected |= U
        if kind is AccessKind.FETCH and (smep or nxe):
            expected |= I
        assert as_fault(out).error_code == expected
        assert m.entry(VA, Level.L1) == pte_before
        assert m.mmu.state.cr2 == VA + 0x10
