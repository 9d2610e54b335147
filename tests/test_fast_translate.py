"""Differential tests: the batch walk (refmodel.fast) against N sequential slow-path
walks (refmodel.arch.walk), on Hypothesis-generated page tables.

The generator draws a handful of table frames whose entries (at a few slots, so
that addresses share tables) point at each other freely — cycles and aliasing
included, so one entry can be a PML4E for one walk and a PDE for another — with
random flag bits, reserved bits (above MAXPHYADDR, misaligned large-page bases,
PS in a PML4E, XD with NXE = 0), ignored bits, 2 MiB and 1 GiB pages; random
CR0.WP, EFER.NXE, CR4.SMEP/SMAP/PGE, RFLAGS.AC, 1 GiB-page support, MAXPHYADDR;
and per-address kind, CPL and implicit flag, with non-canonical addresses mixed in.
"""

import random
from dataclasses import dataclass, replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refmodel.arch.access import Access, AccessKind
from refmodel.arch.builder import PageTableBuilder
from refmodel.arch.control import Cr0, Cr4, Efer, Rflags
from refmodel.arch.fault import FaultCause, GeneralProtection, PageFault
from refmodel.arch.physmem import PhysicalMemory
from refmodel.arch.pte import Level, PageSize, PteFlag
from refmodel.arch.walk import PagingContext, Translation, WalkResult, is_canonical, walk
from refmodel.fast import FrameSnapshot, kind_codes, paging_structure_frames, translate, translate_batch
from refmodel.fast.translate import KINDS, BatchResult

#: Table frames (1 GiB- and 2 MiB-aligned ones too, so that a table frame can
#: also be a valid large-page base) and frames entries may point at without
#: being tables (PAT bit set; never written).
TABLE_FRAMES = (0x1, 0x2, 0x3, 0x200, 0x40000)
OTHER_FRAMES = (0x201, 0x40001, 0x5, 0x0)
SLOTS = (0, 1, 2, 511)  #: table slots that hold entries, and that addresses index


@dataclass(frozen=True)
class Case:
    mem: PhysicalMemory
    ctx: PagingContext
    vas: list[int]
    kinds: list[AccessKind]
    cpls: list[int]
    implicit: list[bool]

    def accesses(self) -> list[Access]:
        return [Access(k, c, i) for k, c, i in zip(self.kinds, self.cpls, self.implicit)]


@st.composite
def entries(draw: st.DrawFn, maxphyaddr: int) -> int:
    """Mostly a usable entry (present, pointing at a table frame, random rights,
    sometimes PS or XD); sometimes not present, or with one reserved bit."""
    # (Hypothesis favours 0 and small values: 0 is the "usable" choice throughout.)
    shape = draw(st.integers(0, 9))
    frame = draw(st.sampled_from(OTHER_FRAMES if draw(st.integers(0, 6)) == 5 else TABLE_FRAMES))
    other = int(PteFlag.RW | PteFlag.US | PteFlag.PWT | PteFlag.PCD | PteFlag.A | PteFlag.D | PteFlag.G) | 0xE00
    flags = draw(st.integers(0, 0xFFF)) & other
    if shape != 3:
        flags |= int(PteFlag.P)
    for bit in (PteFlag.RW, PteFlag.US):  # mostly set, so that rights come from all levels
        if draw(st.integers(0, 3)) != 2:
            flags |= int(bit)
    if draw(st.integers(0, 6)) == 2:
        flags |= int(PteFlag.PS)
    value = (frame << 12) | flags
    if draw(st.integers(0, 6)) == 2:
        value |= int(PteFlag.XD)
    if shape == 4 and maxphyaddr < 52:  # a reserved address bit (51:MAXPHYADDR)
        value |= 1 << draw(st.integers(maxphyaddr, 51))
    if shape == 5:  # bits 13..29: reserved in large-page entries only
        value |= 1 << draw(st.integers(13, 29))
    value |= draw(st.integers(0, (1 << 11) - 1)) << 52  # ignored bits 62:52
    return value


@st.composite
def cases(draw: st.DrawFn, max_n: int = 48) -> Case:
    maxphyaddr = draw(st.sampled_from((36, 40, 46, 52)))
    mem = PhysicalMemory(maxphyaddr)
    for frame in TABLE_FRAMES:
        mem.load_frame(frame, bytes(4096))
        for slot in SLOTS:
            if draw(st.integers(0, 9)) != 3:
                mem.write_u64((frame << 12) + 8 * slot, draw(entries(maxphyaddr)))
    root = draw(st.sampled_from(TABLE_FRAMES))
    ctx = PagingContext(
        cr0=int(Cr0.PE | Cr0.PG) | (int(Cr0.WP) if draw(st.booleans()) else 0),
        cr3=(root << 12) | draw(st.integers(0, 0xFFF)),
        cr4=int(Cr4.PAE) | draw(st.sampled_from((0, int(Cr4.SMEP), int(Cr4.SMAP), int(Cr4.SMEP | Cr4.SMAP))))
        | (int(Cr4.PGE) if draw(st.booleans()) else 0),
        efer=int(Efer.LME | Efer.LMA) | (int(Efer.NXE) if draw(st.booleans()) else 0),
        rflags=int(Rflags.FIXED1) | (int(Rflags.AC) if draw(st.booleans()) else 0),
        maxphyaddr=maxphyaddr,
        page1gb=draw(st.booleans()),
    )
    n = draw(st.integers(0, max_n))
    vas: list[int] = []
    for _ in range(n):
        shape = draw(st.integers(0, 9))
        if shape == 7:  # anything, mostly non-canonical
            vas.append(draw(st.integers(0, (1 << 64) - 1)))
            continue
        idx = [draw(st.sampled_from(SLOTS)) for _ in range(4)]
        va = (idx[0] << 39) | (idx[1] << 30) | (idx[2] << 21) | (idx[3] << 12)
        va |= draw(st.integers(0, 0xFFF))
        if va >> 47:
            va |= ((1 << 17) - 1) << 47  # sign-extend: canonical
        if shape == 8:
            va ^= 1 << draw(st.integers(47, 63))  # break canonicality
        vas.append(va)
    kinds = [draw(st.sampled_from(KINDS)) for _ in range(n)]
    cpls = [draw(st.sampled_from((0, 3, 0, 3, 1, 2))) for _ in range(n)]
    implicit = [draw(st.integers(0, 5)) == 0 for _ in range(n)]
    return Case(mem, ctx, vas, kinds, cpls, implicit)


def slow_walks(mem: PhysicalMemory, ctx: PagingContext, vas: list[int], accesses: list[Access]) -> list[WalkResult | None]:
    """The reference: canonical check (None: #GP), then walk, one address after another."""
    return [walk(mem, ctx, va, a) if is_canonical(va) else None for va, a in zip(vas, accesses)]


def fast_walks(case: Case, mem: PhysicalMemory, snapshot_all: bool = False) -> BatchResult:
    args = (
        np.array(case.vas, dtype=np.uint64), kind_codes(case.kinds),
        np.array(case.cpls, dtype=np.uint8), np.array(case.implicit, dtype=np.bool_),
    )
    if not snapshot_all:
        return translate(mem, case.ctx, *args)
    snap = FrameSnapshot.take(mem)
    result = translate_batch(snap, case.ctx, *args)
    snap.write_back(mem)
    return result


def assert_same_memory(a: PhysicalMemory, b: PhysicalMemory) -> None:
    frames = set(a.populated_frames()) | set(b.populated_frames())
    for f in sorted(frames):
        assert a.frame_bytes(f) == b.frame_bytes(f), f"frame {f:#x} differs"


def assert_matches(fast: BatchResult, slow: list[WalkResult | None]) -> None:
    assert len(fast) == len(slow)
    for i, ref in enumerate(slow):
        got = fast.outcome(i)
        if ref is None:
            assert isinstance(got, GeneralProtection), i
            assert int(fast.refs[i]) == 0
            continue
        assert got == ref.outcome, (i, got, ref.outcome)
        assert int(fast.refs[i]) == ref.refs, i
        assert fast.entry_addr_list(i) == ref.entry_addrs, i


@given(cases(), st.booleans())
@settings(max_examples=250)
def test_fast_equals_sequential_slow(case: Case, snapshot_all: bool) -> None:
    m_slow, m_fast = case.mem.copy(), case.mem.copy()
    slow = slow_walks(m_slow, case.ctx, case.vas, case.accesses())
    fast = fast_walks(case, m_fast, snapshot_all)
    assert_matches(fast, slow)
    assert_same_memory(m_slow, m_fast)
    # CR2 and the error codes as arrays, too
    faults = [(i, r.outcome) for i, r in enumerate(slow) if r is not None and isinstance(r.outcome, PageFault)]
    assert fast.final_cr2(0x1234) == (faults[-1][1].cr2 if faults else 0x1234)
    for i, pf in faults:
        assert int(fast.cr2[i]) == pf.cr2 and int(fast.error_code[i]) == int(pf.error_code)


@given(cases(max_n=32), st.randoms(use_true_random=False))
@settings(max_examples=120)
def test_walk_order_does_not_matter_except_reported_dirty(case: Case, rnd: random.Random) -> None:
    """The claim of refmodel.fast.translate's docstring, on the slow path itself:
    any permutation of the walks gives the same outcomes (up to the D flag a
    translation reports) and the same final memory, A/D bits included."""
    order = list(range(len(case.vas)))
    rnd.shuffle(order)
    accesses = case.accesses()
    m1, m2 = case.mem.copy(), case.mem.copy()
    straight = slow_walks(m1, case.ctx, case.vas, accesses)
    permuted = slow_walks(m2, case.ctx, [case.vas[i] for i in order], [accesses[i] for i in order])
    assert_same_memory(m1, m2)
    for pos, i in enumerate(order):
        a, b = straight[i], permuted[pos]
        if a is None or b is None:
            assert a is None and b is None
            continue
        oa, ob = a.outcome, b.outcome
        if isinstance(oa, Translation) and isinstance(ob, Translation):
            oa, ob = replace(oa, dirty=False), replace(ob, dirty=False)
        assert oa == ob
        assert a.entry_addrs == b.entry_addrs


@given(cases(max_n=32), st.randoms(use_true_random=False))
@settings(max_examples=80)
def test_fast_permuted_batch(case: Case, rnd: random.Random) -> None:
    """The fast path on a permuted batch equals the slow path in that order."""
    order = list(range(len(case.vas)))
    rnd.shuffle(order)
    perm = Case(
        case.mem, case.ctx, [case.vas[i] for i in order], [case.kinds[i] for i in order],
        [case.cpls[i] for i in order], [case.implicit[i] for i in order],
    )
    m_slow, m_fast = case.mem.copy(), case.mem.copy()
    assert_matches(fast_walks(perm, m_fast), slow_walks(m_slow, perm.ctx, perm.vas, perm.accesses()))
    assert_same_memory(m_slow, m_fast)


# -- hand-written cases --------------------------------------------------------------


def small_space() -> tuple[PhysicalMemory, PagingContext, PageTableBuilder]:
    mem = PhysicalMemory(46)
    b = PageTableBuilder(mem, iter(range(0x100, 0x200)))
    b.map(0x1000, 0x50_0000, PteFlag.US)  # read-only user page
    b.map(0x2000, 0x51_0000, PteFlag.RW | PteFlag.US)
    b.map(0x3000, 0x52_0000, PteFlag.RW)  # supervisor page
    b.map(0x4020_0000, 0x8020_0000, PteFlag.RW | PteFlag.US | PteFlag.G, PageSize.SIZE_2M)
    b.map(0x80_0000_0000, 0x1_0000_0000, PteFlag.RW | PteFlag.XD, PageSize.SIZE_1G)
    return mem, PagingContext(cr3=b.cr3, cr4=int(Cr4.PAE | Cr4.PGE)), b


def test_reads_after_a_write_report_dirty_reads_before_do_not() -> None:
    mem, ctx, _ = small_space()
    vas = np.array([0x2008, 0x2010, 0x2018, 0x2FF8], dtype=np.uint64)
    kinds = np.array([0, 1, 0, 0], dtype=np.uint8)
    r = translate(mem, ctx, vas, kinds, 3)
    assert r.ok.all()
    assert r.dirty.tolist() == [False, True, True, True]
    assert r.pa.tolist() == [0x51_0008, 0x51_0010, 0x51_0018, 0x51_0FF8]


def test_sizes_globals_and_faults() -> None:
    mem, ctx, _ = small_space()
    vas = [0x1004, 0x4020_1234, 0x80_0000_5678, 0x3000, 0x1000, 0x9000, 1 << 63]
    kinds = [AccessKind.READ, AccessKind.WRITE, AccessKind.READ, AccessKind.READ, AccessKind.WRITE, AccessKind.READ, AccessKind.READ]
    r = translate(mem, ctx, np.array(vas, dtype=np.uint64), kinds, 3)
    assert r.vector.tolist() == [0, 0, 14, 14, 14, 14, 13]
    assert r.size.tolist()[:2] == [PageSize.SIZE_4K, PageSize.SIZE_2M]
    assert r.pa.tolist()[:2] == [0x50_0004, 0x8020_1234]
    assert r.global_page.tolist()[:2] == [False, True]
    assert [r.outcome(i).cause for i in (2, 3, 4, 5)] == [  # type: ignore[union-attr]
        FaultCause.USER_SUPERVISOR, FaultCause.USER_SUPERVISOR, FaultCause.WRITE_PROTECT, FaultCause.NOT_PRESENT,
    ]
    assert r.error_code.tolist()[2:6] == [0b101, 0b101, 0b111, 0b100]
    assert r.final_cr2() == 0x9000


def test_write_back_stores_only_changed_frames() -> None:
    mem, ctx, b = small_space()
    snap = FrameSnapshot.for_walks(mem, ctx)
    assert set(b.tables) == set(paging_structure_frames(mem, ctx))
    translate_batch(snap, ctx, np.array([0x1000, 0x1008], dtype=np.uint64), AccessKind.READ, 3)
    assert snap.write_back(mem) == 4  # PML4, PDPT, PD, PT: one A bit each
    snap2 = FrameSnapshot.for_walks(mem, ctx)
    translate_batch(snap2, ctx, np.array([0x1000], dtype=np.uint64), AccessKind.READ, 3)
    assert snap2.write_back(mem) == 0  # nothing left to set
    translate_batch(snap2, ctx, np.array([0x2000], dtype=np.uint64), AccessKind.WRITE, 3)
    assert snap2.write_back(mem) == 1  # the PT only: A and D of one PTE
    assert mem.read_u64(b.entry_addr(0x2000, Level.L1)) & 0x60 == 0x60


def test_recursive_pml4_slot() -> None:
    """A PML4 entry pointing at the PML4 itself: the same entry is used at every
    level by some walk; a write through the recursive slot sets D in an entry other
    walks use as a non-leaf."""
    mem, ctx, b = small_space()
    root = b.root
    mem.write_u64((root << 12) + 8 * 510, (root << 12) | int(PteFlag.P | PteFlag.RW))
    rec = 0xFFFF_FF00_0000_0000  # slot 510 at L4, then 0 at L3..L1
    vas = [0x1000, rec | (510 << 30) | (510 << 21) | (510 << 12), rec, rec | 0x8, 0x1008]
    case = Case(mem, ctx, vas, [AccessKind.WRITE, AccessKind.WRITE, AccessKind.READ, AccessKind.WRITE, AccessKind.READ], [0] * 5, [False] * 5)
    m_slow, m_fast = mem.copy(), mem.copy()
    slow = slow_walks(m_slow, ctx, case.vas, case.accesses())
    assert_matches(fast_walks(case, m_fast), slow)
    assert_same_memory(m_slow, m_fast)


def test_rejects_bad_shapes() -> None:
    mem, ctx, _ = small_space()
    from refmodel.errors import RefmodelError

    with pytest.raises(RefmodelError):
        translate(mem, ctx, np.zeros((2, 2), dtype=np.uint64))
    with pytest.raises(RefmodelError):
        translate(mem, ctx, np.zeros(3, dtype=np.uint64), np.zeros(2, dtype=np.uint8))
    with pytest.raises(RefmodelError):
        translate(mem, ctx, np.zeros(3, dtype=np.uint64), 7)


def test_empty_batch() -> None:
    mem, ctx, _ = small_space()
    r = translate(mem, ctx, np.zeros(0, dtype=np.uint64))
    assert len(r) == 0 and r.final_cr2(5) == 5


def test_cr0_wp_decides_supervisor_writes_to_read_only_pages() -> None:
    """SDM 4.6.1: with CR0.WP = 0 a supervisor write ignores R/W; with WP = 1 it
    needs R/W = 1 at every level. (A deterministic guard for the planted-bug check.)"""
    mem, ctx, _ = small_space()
    vas = np.array([0x1000, 0x2000], dtype=np.uint64)  # read-only, writable (both U/S = 1)
    for wp in (False, True):
        c = replace(ctx, cr0=int(Cr0.PE | Cr0.PG) | (int(Cr0.WP) if wp else 0))
        m_slow, m_fast = mem.copy(), mem.copy()
        access = Access(AccessKind.WRITE, 0)
        slow = slow_walks(m_slow, c, [0x1000, 0x2000], [access, access])
        fast = translate(m_fast, c, vas, AccessKind.WRITE, 0)
        assert_matches(fast, slow)
        assert_same_memory(m_slow, m_fast)
        assert fast.vector.tolist() == ([14, 0] if wp else [0, 0])
