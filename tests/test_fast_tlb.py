"""Differential tests: refmodel.fast.tlb.BatchTlb against sequential
refmodel.arch.tlb.Tlb use — batches of lookups and batches of fills, small
geometries (so sets fill and evict), few tags and pages (so keys collide), global
entries of other PCIDs (so several entries can match one lookup)."""

from dataclasses import dataclass

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from refmodel.arch.access import Access, AccessKind
from refmodel.arch.builder import PageTableBuilder
from refmodel.arch.control import Cr0, Cr4, Efer, Rflags
from refmodel.arch.mmu import entry_from_translation, usable
from refmodel.arch.physmem import PhysicalMemory
from refmodel.arch.pte import PageSize, PteFlag
from refmodel.arch.tlb import Tlb, TlbEntry
from refmodel.arch.walk import PagingContext, Rights, Translation
from refmodel.fast import BatchTlb, TlbFills, kind_codes, translate
from refmodel.fast.translate import KINDS

GEOMETRIES = ((4, 4), (8, 2), (16, 4), (64, 4), (6, 1))


@st.composite
def tlb_entries(draw: st.DrawFn) -> TlbEntry:
    size = draw(st.sampled_from(list(PageSize)))
    return TlbEntry(
        vpid=draw(st.integers(0, 1)),
        pcid=draw(st.integers(0, 2)),
        vpn=draw(st.integers(0, 9)),
        size=size,
        frame=draw(st.integers(0, 1 << 10)) << size.shift,
        rights=Rights(draw(st.booleans()), draw(st.booleans()), draw(st.booleans())),
        global_page=draw(st.booleans()),
        dirty=draw(st.booleans()),
    )


@st.composite
def lookup_vas(draw: st.DrawFn) -> int:
    shift = draw(st.sampled_from((12, 21, 30)))
    return (draw(st.integers(0, 9)) << shift) | draw(st.integers(0, (1 << shift) - 1))


@dataclass(frozen=True)
class Lookups:
    vas: list[int]
    vpid: int
    pcid: int


Op = Lookups | list[TlbEntry]
ops = st.one_of(
    st.builds(Lookups, st.lists(lookup_vas(), max_size=40), st.integers(0, 1), st.integers(0, 2)),
    st.lists(tlb_entries(), max_size=40),
)


def assert_same(fast: BatchTlb, slow: Tlb) -> None:
    assert fast.entries() == slow.entries()


@given(st.sampled_from(GEOMETRIES), st.lists(tlb_entries(), max_size=30), st.lists(ops, max_size=8))
@settings(max_examples=200)
def test_batches_equal_sequential_tlb(geometry: tuple[int, int], initial: list[TlbEntry], batches: list[Op]) -> None:
    capacity, ways = geometry
    slow = Tlb(capacity, ways)
    for e in initial:
        slow.fill(e)
    fast = BatchTlb.from_tlb(slow)
    assert_same(fast, slow)
    for op in batches:
        if isinstance(op, Lookups):
            got = fast.lookup_batch(np.array(op.vas, dtype=np.uint64), op.vpid, op.pcid)
            for i, va in enumerate(op.vas):
                want = slow.lookup(va, op.vpid, op.pcid)
                assert got.entry(i) == want, (i, va)
                if want is not None:
                    assert int(got.pa[i]) == want.translate(va)
        else:
            fast.fill_batch(TlbFills.from_entries(op))
            for e in op:
                slow.fill(e)
        assert_same(fast, slow)
    assert fast.to_tlb().entries() == slow.entries()


def test_lookup_with_two_matching_entries_takes_the_least_recently_used() -> None:
    """A global entry of PCID 1 and a non-global one of PCID 0 both match a PCID-0
    lookup; Tlb.lookup returns the older and refreshes it, so consecutive lookups
    alternate — a batch has to reproduce that."""
    slow = Tlb(4, 4)
    r = Rights()
    slow.fill(TlbEntry(0, 1, 5, PageSize.SIZE_4K, 0x1000, r, True, False))
    slow.fill(TlbEntry(0, 0, 5, PageSize.SIZE_4K, 0x2000, r, False, False))
    fast = BatchTlb.from_tlb(slow)
    vas = [0x5000, 0x5008, 0x5010, 0x5018]
    got = fast.lookup_batch(np.array(vas, dtype=np.uint64), 0, 0)
    want = [slow.lookup(va, 0, 0) for va in vas]
    assert [got.entry(i) for i in range(4)] == want
    assert [e.frame for e in want if e] == [0x1000, 0x2000, 0x1000, 0x2000]
    assert fast.entries() == slow.entries()


def test_fills_from_translations_and_usable_match_the_mmu() -> None:
    mem = PhysicalMemory(46)
    b = PageTableBuilder(mem, iter(range(0x100, 0x200)))
    b.map(0x1000, 0x50_0000, PteFlag.US)
    b.map(0x2000, 0x51_0000, PteFlag.RW | PteFlag.US | PteFlag.D)
    b.map(0x4020_0000, 0x8020_0000, PteFlag.RW | PteFlag.G, PageSize.SIZE_2M)
    b.map(0x80_0000_0000, 0x1_0000_0000, PteFlag.US | PteFlag.XD, PageSize.SIZE_1G)
    ctx = PagingContext(
        cr0=int(Cr0.PE | Cr0.PG | Cr0.WP), cr3=b.cr3, cr4=int(Cr4.PAE | Cr4.PGE | Cr4.SMEP | Cr4.SMAP),
        efer=int(Efer.LME | Efer.LMA | Efer.NXE), rflags=int(Rflags.FIXED1),
    )
    vas = [0x1008, 0x2010, 0x4020_1000, 0x80_0000_2000, 0x9000]
    res = translate(mem, ctx, np.array(vas, dtype=np.uint64), AccessKind.READ, 0)
    fills = TlbFills.from_translations(res, vpid=1, pcid=0)
    want = [entry_from_translation(t, 1, 0) for i in range(len(vas)) if isinstance(t := res.outcome(i), Translation)]
    assert [fills.entry(i) for i in range(len(fills))] == want
    tlb = BatchTlb(64, 4)
    tlb.fill_batch(fills)
    for kind in KINDS:
        for cpl in (0, 3):
            for implicit in (False, True):
                got = tlb.lookup_batch(np.array(vas, dtype=np.uint64), 1, 0)
                ok = got.usable(ctx, kind_codes([kind] * len(vas)), cpl, implicit)
                for i in range(len(vas)):
                    e = got.entry(i)
                    expect = e is not None and usable(e, Access(kind, cpl, implicit), ctx)
                    assert bool(ok[i]) == expect, (kind, cpl, implicit, hex(vas[i]))
