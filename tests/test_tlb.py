"""The TLB: what it caches, when a cached translation is used although memory has
changed, and exactly what each invalidating operation removes (Intel SDM Vol. 3A
4.10; INVPCID in Vol. 2A; VPIDs in Vol. 3C 28.1).

The SDM lets a processor cache less and invalidate more than it must; these tests pin
the model's own deterministic choices (cache every successful translation, drop
exactly what the SDM says an operation invalidates, LRU within a set), each of which
is one of the behaviours the SDM permits.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from refmodel.account.events import Counters, Event
from refmodel.arch.control import CR3_NOFLUSH, Cr4
from refmodel.arch.pte import Level, PageSize, PteFlag
from refmodel.arch.tlb import Tlb, TlbEntry
from refmodel.arch.walk import Rights

from pt_helpers import (
    CR4_DEFAULT,
    PA,
    SUPER_RW,
    USER_RW,
    VA,
    Machine,
    P,
    U,
    W,
    machine,
    read,
    write,
)

PGE = CR4_DEFAULT | int(Cr4.PGE)
PCIDE = CR4_DEFAULT | int(Cr4.PCIDE)
PCIDE_PGE = PCIDE | int(Cr4.PGE)

PA2 = PA + 0x10_0000_0000  # "the new frame" after a PTE is changed


def cached(m: Machine, va: int) -> list[TlbEntry]:
    """The TLB entries (any tag) whose page contains ``va``."""
    return [e for e in m.tlb.entries() if e.vpn == va >> e.size.shift]


def repoint(m: Machine, va: int, pa: int) -> None:
    """Change the PTE for ``va`` in memory to map ``pa`` instead (no invalidation)."""
    m.set_entry(va, Level.L1, (m.entry(va, Level.L1) & 0xFFF) | pa)


# =====================================================================================
# 4.10.2: filling and hitting
# =====================================================================================


def test_miss_then_hit_counters() -> None:
    """SDM 4.10.2: the first access walks (a TLB miss, four paging-structure reads);
    the processor caches the translation, and the next access to the page — at any
    offset — hits without reading memory."""
    m = machine()
    m.map(VA, PA)
    m.access(VA, read())
    assert (m.count(Event.TLB_MISS), m.count(Event.TLB_HIT), m.count(Event.WALK_REF)) == (1, 0, 4)
    assert m.pa_of(VA + 0xFF8) == PA + 0xFF8
    assert (m.count(Event.TLB_MISS), m.count(Event.TLB_HIT), m.count(Event.WALK_REF)) == (1, 1, 4)


@pytest.mark.parametrize(("size", "refs"), [(PageSize.SIZE_2M, 3), (PageSize.SIZE_1G, 2)], ids=["2MiB", "1GiB"])
def test_large_page_is_one_tlb_entry(size: PageSize, refs: int) -> None:
    """SDM 4.10.2.3: a large page is cached as one entry covering the whole page;
    its walk is shorter (three or two references)."""
    m = machine()
    va = 0x0000_4000_0000_0000
    m.map(va, 0x4000_0000, USER_RW, size)
    m.access(va, read())
    assert m.pa_of(va + size.value - 8) == 0x4000_0000 + size.value - 8
    assert (m.count(Event.WALK_REF), m.count(Event.TLB_HIT)) == (refs, 1)
    assert [e.size for e in m.tlb.entries()] == [size]


def test_faulting_walk_caches_nothing() -> None:
    """SDM 4.10.2.1: a processor does not cache a translation for a page-fault; the
    next access walks (and faults) again."""
    m = machine()
    m.access(VA, read())
    m.access(VA, read())
    assert m.tlb.entries() == []
    assert m.count(Event.WALK_REF) == 2


def test_a_tlb_hit_still_enforces_the_cached_rights() -> None:
    """SDM 4.6, 4.10.2.2: a TLB entry caches the combined access rights and the
    processor enforces them on every access served from it. A supervisor page cached
    by a kernel read still refuses CPL 3 (P|U); a read-only page cached with D = 1
    still refuses a supervisor write with CR0.WP = 1 (P|W)."""
    m = machine()
    m.map(VA, PA, SUPER_RW)
    m.map(VA + 0x1000, PA + 0x1000, PteFlag.D)
    m.access(VA, read())
    m.access(VA + 0x1000, read())
    assert m.fault(VA, read(cpl=3)).error_code == P | U
    assert m.fault(VA + 0x1000, write()).error_code == P | W


def test_rights_change_on_a_hit_when_smap_is_turned_on() -> None:
    """SDM 4.6.1, 4.10.2.2: SMAP is judged on each access from the cached U/S right:
    a user page cached by a kernel read faults on the next kernel read once CR4.SMAP
    is set (the write to CR4 did not need to flush it)."""
    m = machine()
    m.map(VA, PA, USER_RW)
    m.access(VA, read())
    assert m.mmu.mov_cr4(CR4_DEFAULT | int(Cr4.SMAP)) is None
    assert m.fault(VA, read()).error_code == P


def test_cached_rights_are_rechecked_against_current_registers() -> None:
    """SDM 4.10.2.2: a TLB entry caches the access rights, not a decision: clearing
    CR0.WP after caching a read-only page lets the next supervisor write through."""
    m = machine()
    m.map(VA, PA, PteFlag.US)
    m.access(VA, read())
    assert m.fault(VA, write()).error_code == P | W
    m.set_regs(cr0=m.mmu.state.cr0 & ~(1 << 16))
    assert m.pa_of(VA, write()) == PA


# =====================================================================================
# 4.10.4.3: stale translations, and INVLPG
# =====================================================================================


def test_stale_translation_used_until_invlpg() -> None:
    """SDM 4.10.4.3: after software changes a PTE, the processor may keep using the
    old translation from its TLB until the page is invalidated; INVLPG (4.10.4.1)
    removes it and the next access walks the new PTE."""
    m = machine()
    m.map(VA, PA)
    assert m.pa_of(VA) == PA
    repoint(m, VA, PA2)
    assert m.pa_of(VA) == PA  # stale, as hardware may do
    m.mmu.invlpg(VA + 0x800)
    assert m.pa_of(VA) == PA2


def test_stale_translation_survives_clearing_p_until_invlpg() -> None:
    """SDM 4.10.4.3: clearing P in memory does not stop the cached translation from
    being used; after INVLPG the access faults as not-present."""
    m = machine()
    m.map(VA, PA)
    m.access(VA, read())
    m.clear_bits(VA, Level.L1, PteFlag.P)
    assert m.pa_of(VA) == PA
    m.mmu.invlpg(VA)
    assert m.fault(VA, read()).error_code == 0


def test_invlpg_only_removes_its_page() -> None:
    """SDM 4.10.4.1: INVLPG invalidates the entries for one page number; the
    neighbouring page stays cached."""
    m = machine()
    m.map(VA, PA)
    m.map(VA + 0x1000, PA + 0x1000)
    m.access(VA, read())
    m.access(VA + 0x1000, read())
    m.mmu.invlpg(VA)
    assert cached(m, VA) == [] and len(cached(m, VA + 0x1000)) == 1


def test_invlpg_anywhere_in_a_2m_page_removes_it() -> None:
    """SDM 4.10.4.1 (and INVLPG in Vol. 2A): invalidating any address inside a large
    page removes the entry for the whole page."""
    m = machine()
    va = 0x0000_4000_0020_0000
    m.map(va, 0x4000_0000, USER_RW, PageSize.SIZE_2M)
    m.access(va, read())
    m.mmu.invlpg(va + 0x1F_F000)
    assert m.tlb.entries() == []


def test_invlpg_of_non_canonical_address_is_a_no_op() -> None:
    """INVLPG (SDM Vol. 2A): for a non-canonical address the instruction is a no-op
    (no #GP, nothing invalidated)."""
    m = machine()
    m.map(VA, PA)
    m.access(VA, read())
    m.mmu.invlpg(VA | (1 << 50))
    assert len(m.tlb.entries()) == 1


def test_page_fault_invalidates_the_faulting_page() -> None:
    """SDM 4.10.4.1: a #PF invalidates the TLB entries for the faulting linear
    address (current PCID). Here a write through a clean cached entry re-walks, finds
    the PTE not present and faults; the stale entry is gone, so a later read faults
    too instead of hitting it."""
    m = machine()
    m.map(VA, PA)
    m.map(VA + 0x1000, PA + 0x1000)
    m.access(VA, read())
    m.access(VA + 0x1000, read())
    m.clear_bits(VA, Level.L1, PteFlag.P)
    assert m.fault(VA, write()).error_code == W
    assert cached(m, VA) == []
    assert m.fault(VA, read()).error_code == 0
    assert len(cached(m, VA + 0x1000)) == 1  # other pages are not touched


def test_page_fault_invalidates_a_global_entry_for_the_page() -> None:
    """SDM 4.10.4.1: the #PF invalidation covers the entries that would be used for
    the faulting address in the current PCID — a global entry filled in this
    PCID is one of them, so the fault does not recur... nor is masked by it."""
    m = machine(cr4=PGE)
    m.map(VA, PA, SUPER_RW | PteFlag.G)
    m.access(VA, read())
    m.clear_bits(VA, Level.L1, PteFlag.P)
    assert m.fault(VA, write()).error_code == W
    assert m.fault(VA, read()).error_code == 0


# =====================================================================================
# 4.10.4.1, 4.10.2.4: MOV to CR3, global pages, CR4.PGE
# =====================================================================================


def _global_and_local(cr4: int, cr3_low: int = 0) -> tuple[Machine, int, int]:
    """A machine with a global page G and a non-global page L, both cached."""
    m = machine(cr4=cr4, cr3_low=cr3_low)
    g, loc = VA, VA + 0x1000
    m.map(g, PA, SUPER_RW | PteFlag.G)
    m.map(loc, PA + 0x1000, SUPER_RW)
    m.access(g, read())
    m.access(loc, read())
    return m, g, loc


def test_mov_cr3_flushes_non_global_keeps_global() -> None:
    """SDM 4.10.4.1, 4.10.2.4: MOV to CR3 invalidates the non-global entries (of PCID
    000H without PCIDs); with CR4.PGE = 1 a page with G = 1 stays cached."""
    m, g, loc = _global_and_local(PGE)
    assert m.mmu.mov_cr3(m.mmu.state.cr3) is None
    assert cached(m, loc) == []
    assert [e.global_page for e in cached(m, g)] == [True]
    hits = m.count(Event.TLB_HIT)
    m.access(g, read())
    assert m.count(Event.TLB_HIT) == hits + 1


def test_g_bit_ignored_without_pge() -> None:
    """SDM 4.10.2.4: G is honoured only when CR4.PGE = 1; otherwise MOV to CR3
    removes the G page like any other."""
    m, g, loc = _global_and_local(CR4_DEFAULT)
    m.mmu.mov_cr3(m.mmu.state.cr3)
    assert m.tlb.entries() == []


@pytest.mark.parametrize("start", [PGE, CR4_DEFAULT], ids=["PGE 1->0", "PGE 0->1"])
def test_toggling_pge_flushes_everything(start: int) -> None:
    """SDM 4.10.4.1: MOV to CR4 that changes CR4.PGE invalidates all TLB entries,
    global ones included."""
    m, g, loc = _global_and_local(start)
    assert m.mmu.mov_cr4(start ^ int(Cr4.PGE)) is None
    assert m.tlb.entries() == []


def test_cr4_write_that_keeps_pge_keeps_entries() -> None:
    """SDM 4.10.4.1: a MOV to CR4 that changes neither PGE, PCIDE (1 -> 0), PAE nor
    SMEP (0 -> 1) invalidates nothing — e.g. setting CR4.SMAP."""
    m, g, loc = _global_and_local(PGE)
    m.mmu.mov_cr4(PGE | int(Cr4.SMAP))
    assert len(m.tlb.entries()) == 2


def test_setting_smep_flushes_the_current_pcid() -> None:
    """SDM 4.10.4.1: MOV to CR4 that changes CR4.SMEP from 0 to 1 invalidates all
    TLB entries for the current PCID, global ones too — so no stale translation is
    used after it. (Clearing SMEP invalidates nothing.)"""
    m = machine(cr4=PGE)
    m.map(VA, PA)
    m.map(VA + 0x1000, PA + 0x1000, SUPER_RW | PteFlag.G)
    m.access(VA, read())
    m.access(VA + 0x1000, read())
    repoint(m, VA, PA2)
    repoint(m, VA + 0x1000, PA2 + 0x1000)
    assert m.mmu.mov_cr4(PGE | int(Cr4.SMEP)) is None
    assert m.pa_of(VA) == PA2
    assert m.pa_of(VA + 0x1000) == PA2 + 0x1000
    assert m.mmu.mov_cr4(PGE) is None
    assert len(m.tlb.entries()) == 2


# =====================================================================================
# 4.10.1: PCIDs
# =====================================================================================


def _two_spaces() -> tuple[Machine, int, int]:
    """PCIDE = 1 and two address spaces mapping VA differently: CR3 values A (PCID 1,
    VA -> PA) and B (PCID 2, VA -> PA2), sharing one TLB and one memory."""
    m = machine(cr4=PCIDE_PGE, cr3_low=1)
    m.map(VA, PA, SUPER_RW)
    other = machine(mem=m.mem, table_frames=range(0x300, 0x400))
    other.map(VA, PA2, SUPER_RW)
    return m, m.mmu.state.cr3, other.pt.cr3 | 2


def test_entries_of_different_pcids_coexist() -> None:
    """SDM 4.10.1: TLB entries are tagged with the PCID current when they were
    made; an access uses only entries of the current PCID, so two address spaces keep
    their translations side by side and switching with CR3 bit 63 set (no-flush)
    finds them still cached."""
    m, cr3_a, cr3_b = _two_spaces()
    assert m.pa_of(VA) == PA
    m.mmu.mov_cr3(cr3_b)
    assert m.pa_of(VA) == PA2
    assert sorted(e.pcid for e in m.tlb.entries()) == [1, 2]
    walks = m.count(Event.WALK_REF)
    m.mmu.mov_cr3(cr3_a | CR3_NOFLUSH)
    assert m.pa_of(VA) == PA
    m.mmu.mov_cr3(cr3_b | CR3_NOFLUSH)
    assert m.pa_of(VA) == PA2
    assert m.count(Event.WALK_REF) == walks


def test_mov_cr3_with_bit_63_keeps_even_a_stale_entry() -> None:
    """SDM 4.10.4.1: with CR4.PCIDE = 1 and bit 63 of the source set, MOV to CR3 is
    not required to invalidate anything: a stale translation of the new PCID is
    still used. Bit 63 itself is not stored in CR3."""
    m, cr3_a, _ = _two_spaces()
    m.access(VA, read())
    repoint(m, VA, PA + 0x5000)
    m.mmu.mov_cr3(cr3_a | CR3_NOFLUSH)
    assert m.mmu.state.cr3 == cr3_a
    assert m.pa_of(VA) == PA


def test_mov_cr3_without_bit_63_flushes_that_pcid_only() -> None:
    """SDM 4.10.4.1: with CR4.PCIDE = 1 and bit 63 clear, MOV to CR3 invalidates the
    non-global entries of the PCID in bits 11:0 of the source — the other PCID's
    entries stay."""
    m, cr3_a, cr3_b = _two_spaces()
    m.access(VA, read())
    m.mmu.mov_cr3(cr3_b)
    m.access(VA, read())
    m.mmu.mov_cr3(cr3_a)
    assert [e.pcid for e in m.tlb.entries()] == [2]


def _pcid_population() -> tuple[Machine, int, int]:
    """PCIDE = PGE = 1; in PCID 1 a non-global page L1 and a global page G; in
    PCID 2 a non-global page L2 (= the same VA as L1, another frame)."""
    m, cr3_a, cr3_b = _two_spaces()
    g = VA + 0x1000
    m.map(g, PA + 0x1000, SUPER_RW | PteFlag.G)
    m.access(VA, read())
    m.access(g, read())
    m.mmu.mov_cr3(cr3_b | CR3_NOFLUSH)
    m.access(VA, read())
    return m, VA, g


def _tags(m: Machine) -> set[tuple[int, int, bool]]:
    """(pcid, page number, global) of every cached entry."""
    return {(e.pcid, e.vpn, e.global_page) for e in m.tlb.entries()}


L1_TAG = (1, VA >> 12, False)
L2_TAG = (2, VA >> 12, False)
G_TAG = (1, (VA + 0x1000) >> 12, True)


def test_population_for_invpcid() -> None:
    """The starting point of the INVPCID tests below: three entries, as described."""
    m, _, _ = _pcid_population()
    assert _tags(m) == {L1_TAG, L2_TAG, G_TAG}


@pytest.mark.parametrize(
    ("kind", "pcid", "va", "left"),
    [
        (0, 1, VA, {L2_TAG, G_TAG}),  # one page of PCID 1
        (0, 1, VA + 0x1000, {L1_TAG, L2_TAG, G_TAG}),  # type 0 never removes a global
        (1, 1, 0, {L2_TAG, G_TAG}),  # all non-global of PCID 1
        (1, 2, 0, {L1_TAG, G_TAG}),
        (2, 0, 0, set()),  # everything, globals included
        (3, 0, 0, {G_TAG}),  # everything but globals
    ],
    ids=["type0", "type0-global", "type1-pcid1", "type1-pcid2", "type2", "type3"],
)
def test_invpcid_types(kind: int, pcid: int, va: int, left: set[tuple[int, int, bool]]) -> None:
    """INVPCID (SDM Vol. 2A): type 0 invalidates one linear address of one PCID,
    except global translations; type 1 all non-global mappings of one PCID; type 2 all
    mappings of all PCIDs including globals; type 3 all of all PCIDs except globals."""
    m, _, _ = _pcid_population()
    assert m.mmu.invpcid(kind, pcid, va) is None
    assert _tags(m) == left


def test_invlpg_removes_a_global_entry_of_another_pcid() -> None:
    """SDM 4.10.4.1: INVLPG invalidates the current PCID's entries for the page and
    any global entry for it, whatever PCID it was made under."""
    m, _, g = _pcid_population()  # current PCID is 2; G was cached under PCID 1
    m.mmu.invlpg(g)
    assert _tags(m) == {L1_TAG, L2_TAG}


def test_invlpg_removes_the_current_pcids_entry() -> None:
    """SDM 4.10.4.1: INVLPG removes the page's entry of the current PCID (2); the
    model keeps PCID 1's entry for the same address (the SDM allows either)."""
    m, va, _ = _pcid_population()
    m.mmu.invlpg(va)
    assert _tags(m) == {L1_TAG, G_TAG}


def test_global_entry_is_used_by_every_pcid() -> None:
    """SDM 4.10.2.4: a global TLB entry may be used to translate whatever the current
    PCID: from PCID 2, the page cached globally under PCID 1 hits."""
    m, _, g = _pcid_population()
    hits = m.count(Event.TLB_HIT)
    m.access(g, read())
    assert m.count(Event.TLB_HIT) == hits + 1


def test_clearing_pcide_flushes_everything() -> None:
    """SDM 4.10.4.1: MOV to CR4 that clears CR4.PCIDE invalidates all TLB entries of
    all PCIDs, globals included."""
    m, _, _ = _pcid_population()
    m.mmu.mov_cr3(m.mmu.state.cr3 & ~0xFFF)
    assert m.mmu.mov_cr4(PCIDE_PGE & ~int(Cr4.PCIDE)) is None
    assert m.tlb.entries() == []


def test_setting_pcide_keeps_pcid_0_entries() -> None:
    """SDM 4.10.4.1 lists no invalidation for setting CR4.PCIDE (CR3[11:0] must be 0,
    so the current PCID stays 000H): entries made before remain usable."""
    m = machine()
    m.map(VA, PA)
    m.access(VA, read())
    assert m.mmu.mov_cr4(PCIDE) is None
    hits = m.count(Event.TLB_HIT)
    m.access(VA, read())
    assert m.count(Event.TLB_HIT) == hits + 1


def test_pcid_is_ignored_without_pcide() -> None:
    """SDM 4.10.1: with CR4.PCIDE = 0 the current PCID is 000H whatever CR3[11:0]
    holds (there it is PWT/PCD and ignored bits)."""
    m = machine(cr3_low=0x18)
    m.map(VA, PA)
    m.access(VA, read())
    assert [e.pcid for e in m.tlb.entries()] == [0]


# =====================================================================================
# VPIDs (Vol. 3C 28.1)
# =====================================================================================


def test_entries_of_another_vpid_are_never_hit() -> None:
    """SDM Vol. 3C 28.1: with VPIDs, TLB entries are tagged with the VPID current when
    they were made, and only entries of the current VPID are used — even global ones.
    Invalidations in one VPID leave the other's entries alone."""
    tlb = Tlb(counters=Counters())
    a = machine(tlb=tlb, vpid=1, cr4=PGE)
    a.map(VA, PA, SUPER_RW | PteFlag.G)
    b = machine(tlb=tlb, vpid=2, mem=a.mem, cr4=PGE, table_frames=range(0x300, 0x400))
    b.map(VA, PA2, SUPER_RW | PteFlag.G)
    assert a.pa_of(VA) == PA
    assert b.pa_of(VA) == PA2
    assert a.pa_of(VA) == PA
    assert tlb.counters[Event.TLB_MISS] == 2
    b.mmu.invpcid(2, 0)
    assert a.pa_of(VA) == PA
    assert {e.vpid for e in tlb.entries()} == {1}


# =====================================================================================
# Capacity, associativity, LRU
# =====================================================================================


def _entry(vpn: int, pcid: int = 0, vpid: int = 0) -> TlbEntry:
    return TlbEntry(vpid=vpid, pcid=pcid, vpn=vpn, size=PageSize.SIZE_4K, frame=vpn << 12,
                    rights=Rights(), global_page=False, dirty=False)


def test_lru_eviction_within_a_set() -> None:
    """The model's TLB is set-associative (set = page number mod sets) with
    least-recently-used replacement — one of the policies the SDM allows (4.10.2.3:
    the processor may evict any entry at any time). Filling ways + 1 pages of one set
    evicts the least recently used; a lookup refreshes an entry's age."""
    tlb = Tlb(capacity=8, ways=2)  # 4 sets
    a, b, c, d = 0 * 4, 1 * 4, 2 * 4, 3 * 4  # page numbers that all land in set 0
    tlb.fill(_entry(a))
    tlb.fill(_entry(b))
    assert tlb.lookup(a << 12, 0, 0) is not None  # a is now most recently used
    tlb.fill(_entry(c))  # evicts b
    assert tlb.lookup(b << 12, 0, 0) is None
    assert tlb.lookup(a << 12, 0, 0) is not None
    tlb.fill(_entry(d))  # evicts c (a was just used)
    assert {e.vpn for e in tlb.entries()} == {a, d}


def test_other_sets_are_unaffected_by_eviction() -> None:
    """Pages in other sets keep their entries while one set overflows."""
    tlb = Tlb(capacity=8, ways=2)
    tlb.fill(_entry(1))
    for vpn in (0, 4, 8, 12):
        tlb.fill(_entry(vpn))
    assert {e.vpn for e in tlb.entries()} == {1, 8, 12}


def test_refill_of_same_page_replaces_not_duplicates() -> None:
    """Re-caching a page for the same tag replaces the old entry (no duplicates)."""
    tlb = Tlb(capacity=8, ways=2)
    tlb.fill(_entry(4))
    tlb.fill(_entry(4))
    tlb.fill(_entry(4, pcid=1))
    assert len(tlb.entries()) == 2


def test_lru_through_the_mmu() -> None:
    """Through the MMU: with 2 ways, touching three pages that share a set evicts the
    first, so re-reading it walks again; the others still hit."""
    m = machine(tlb=Tlb(capacity=8, ways=2, counters=Counters()))
    pages = [VA + i * 4 * 0x1000 for i in range(3)]
    for i, va in enumerate(pages):
        m.map(va, PA + i * 0x1000)
        m.access(va, read())
    assert m.count(Event.TLB_MISS) == 3
    m.access(pages[2], read())
    m.access(pages[1], read())
    assert m.count(Event.TLB_MISS) == 3
    m.access(pages[0], read())
    assert m.count(Event.TLB_MISS) == 4


@given(vpns=st.lists(st.integers(min_value=0, max_value=63), max_size=80))
def test_capacity_and_ways_never_exceeded(vpns: list[int]) -> None:
    """Whatever is filled, no set holds more than ``ways`` entries, the TLB no more
    than ``capacity``, and the most recent fill is always cached."""
    tlb = Tlb(capacity=16, ways=4)
    for vpn in vpns:
        tlb.fill(_entry(vpn))
        assert tlb.lookup(vpn << 12, 0, 0) is not None
    entries = tlb.entries()
    assert len(entries) <= 16
    for s in range(4):
        assert sum(1 for e in entries if e.vpn % 4 == s) <= 4


def test_bad_geometry_is_a_caller_error() -> None:
    """Capacity must be a positive multiple of the associativity."""
    from refmodel.errors import RefmodelError

    with pytest.raises(RefmodelError):
        Tlb(capacity=10, ways=4)
    with pytest.raises(RefmodelError):
        Tlb(capacity=0, ways=1)


def test_tlb_entry_translate_keeps_offset() -> None:
    """A cached 2 MiB entry covers its whole page and translates to its frame plus
    the 21-bit offset."""
    base = VA & ~0x1F_FFFF
    e = TlbEntry(vpid=0, pcid=0, vpn=base >> 21, size=PageSize.SIZE_2M, frame=0x4000_0000,
                 rights=Rights(), global_page=False, dirty=True)
    assert e.translate(base + 0x12_3456) == 0x4012_3456
    assert e.matches(base + 0x1F_FFFF, 0, 0) and not e.matches(base + 0x20_0000, 0, 0)
