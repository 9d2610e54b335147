"""Differential tests: the batch 2-D translation (refmodel.fast.ept) against N
sequential slow-path 2-D walks (Mmu's canonical check, then
refmodel.hv.hap.nested.nested_walk), on Hypothesis-generated guest tables and EPT.

The generator builds, in machine memory:

- an EPT: PML4 -> PDPT -> PD -> PT for guest frames 0..15 (4 KiB leaves), and at PD
  slot 1 either a 2 MiB leaf or a second PT for guest frames 512..527. Every entry is
  drawn: mostly a usable one (RWX tables, leaves with random rights: R, RX,
  execute-only, RW ...), sometimes not present, write-without-read, a reserved bit, a
  reserved memory type, or PS (a large leaf, or reserved without the capability);
  random EPT capabilities;
- sometimes an *alias*: guest frame 7 maps the machine frame of one guest table with
  other rights (the case where walk order matters), and guest frame 8 maps an EPT
  table (EPT tables visible to the guest);
- guest tables at guest frames 1..4 and 513 whose entries (a few slots, so walks
  share tables) point at each other freely, with random flags, reserved bits, large
  pages, as in tests/test_fast_translate.py;
- random CR0.WP, EFER.NXE, CR4.SMEP/SMAP/PGE, RFLAGS.AC, 1 GiB-page support, and per
  address kind, CPL, implicit flag, non-canonical addresses mixed in.
"""

import random
from dataclasses import dataclass, replace

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from refmodel.arch.access import Access, AccessKind
from refmodel.arch.builder import PageTableBuilder
from refmodel.arch.control import Cr0, Cr4, Efer, Rflags
from refmodel.arch.fault import GeneralProtection, PageFault
from refmodel.arch.physmem import PhysicalMemory
from refmodel.arch.pte import Level, PageSize, PteFlag
from refmodel.arch.types import GFN, MFN, PAGE_SHIFT
from refmodel.arch.walk import PagingContext, is_canonical
from refmodel.cli import main
from refmodel.errors import RefmodelError
from refmodel.fast import FrameSnapshot, kind_codes
from refmodel.fast.bench import addresses, build_nested_space, run_nested_bench, run_nested_fast, run_nested_slow
from refmodel.fast.ept import (
    STATUS_EPT_MISCONFIG,
    STATUS_EPT_VIOLATION,
    STATUS_OK,
    NestedBatchResult,
    ept_walk_batch,
    nested_structure_frames,
    translate_nested,
    translate_nested_batch,
)
from refmodel.fast.translate import KINDS
from refmodel.hv.hap import Ept, EptCapabilities, EptFlag, Eptp, EptTranslation, EptViolation, ept_walk
from refmodel.hv.hap.ept import EptAccess, EptMemType, make_leaf, make_table_entry
from refmodel.hv.hap.nested import NestedWalkResult, nested_walk
from refmodel.hv.machine import Machine

R, W, X = int(EptFlag.R), int(EptFlag.W), int(EptFlag.X)
RWX = R | W | X
#: machine frames: the EPT tables, and where guest frame g lives (4 KiB leaves)
EPT_PML4, EPT_PDPT, EPT_PD, EPT_PT, EPT_PT2 = 0x10, 0x11, 0x12, 0x13, 0x14
LOW_BASE, HIGH_BASE, LARGE_BASE = 0x100, 0x180, 0x400  #: gfn 0.. / gfn 512.. (PT2) / gfn 512.. (2 MiB leaf)
GUEST_TABLES = (1, 2, 3, 4, 513)
ALIAS_GFN, EPT_ALIAS_GFN = 7, 8
OTHER_TARGETS = (5, 6, 0x200, 0x40000)  #: guest frames that hold no table
SLOTS = (0, 1, 2, 511)


@dataclass(frozen=True)
class Case:
    mem: PhysicalMemory
    eptp: Eptp
    caps: EptCapabilities
    ctx: PagingContext
    vas: list[int]
    kinds: list[AccessKind]
    cpls: list[int]
    implicit: list[bool]

    def accesses(self) -> list[Access]:
        return [Access(k, c, i) for k, c, i in zip(self.kinds, self.cpls, self.implicit)]


class Choices:
    """Many small choices decoded from one drawn integer (one Hypothesis draw per
    entry keeps generation fast; 0 decodes to the first, "usual" choice throughout)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def pick(self, n: int) -> int:
        self.value, choice = divmod(self.value, n)
        return choice


CHOICE_BITS = st.integers(0, (1 << 64) - 1)


def ept_leaf(c: Choices, mfn: int, maxphyaddr: int, noise: int) -> int:
    """RWX and WB (Xen's RAM), or (one in ``noise``, never if 0) narrower rights,
    absent or misconfigured; random ignore-PAT and other memory types."""
    perturbed = noise > 0 and c.pick(noise) == 0
    memtype = (EptMemType.WB, EptMemType.WB, EptMemType.UC, EptMemType.WT)[c.pick(4)]
    entry = make_leaf(mfn, RWX, memtype, ignore_pat=c.pick(2) == 0)
    if not perturbed:
        return entry
    shape = c.pick(4)
    if shape == 0:  # narrower rights, none, or write without read
        return (entry & ~RWX) | (R | X, R, X, R | W, 0, W, W | X)[c.pick(7)]
    if shape == 1:
        return (entry & ~0x38) | ((2, 3, 7)[c.pick(3)] << 3)  # reserved memory type
    if shape == 2 and maxphyaddr < 52:
        return entry | 1 << (maxphyaddr + c.pick(52 - maxphyaddr))  # reserved address bit
    return entry | int(EptFlag.PS)  # ignored in an EPT PTE


def ept_table_entry(c: Choices, mfn: int, maxphyaddr: int, noise: int) -> int:
    """RWX (as Xen builds them), or (rarely, never if ``noise`` is 0) narrower,
    absent or misconfigured."""
    entry = make_table_entry(mfn)
    if not noise:
        return entry
    shape = c.pick(10 * noise)
    if shape == 39:
        entry = (entry & ~RWX) | (R | X, R, X, 0, W)[c.pick(5)]
    elif shape == 38:
        entry |= 1 << (3 + c.pick(5))  # bits 7:3 are reserved in a non-leaf
    elif shape == 37 and maxphyaddr < 52:
        entry |= 1 << (maxphyaddr + c.pick(52 - maxphyaddr))
    return entry


def guest_entry(c: Choices, maxphyaddr: int) -> int:
    """Mostly a present table entry with R/W and U/S; random other flags, sometimes PS,
    XD, not present, a reserved bit; random ignored bits 62:52."""
    shape = c.pick(24)
    where = c.pick(16)
    if where < 12:
        gfn = GUEST_TABLES[c.pick(len(GUEST_TABLES))]
    else:
        pool = OTHER_TARGETS if where < 14 else (ALIAS_GFN, ALIAS_GFN, EPT_ALIAS_GFN)
        gfn = pool[c.pick(len(pool))]
    other = int(PteFlag.RW | PteFlag.US | PteFlag.PWT | PteFlag.PCD | PteFlag.A | PteFlag.D | PteFlag.G) | 0xE00
    flags = c.pick(1 << 12) & other
    if shape != 3:
        flags |= int(PteFlag.P)
    for bit in (PteFlag.RW, PteFlag.US):
        if c.pick(4) != 2:
            flags |= int(bit)
    if c.pick(10) == 2:
        flags |= int(PteFlag.PS)
    value = (gfn << PAGE_SHIFT) | flags
    if c.pick(7) == 2:
        value |= int(PteFlag.XD)
    if shape == 4 and maxphyaddr < 52:
        value |= 1 << (maxphyaddr + c.pick(52 - maxphyaddr))
    if shape == 5:
        value |= 1 << (13 + c.pick(17))
    return value | (c.pick(1 << 11) << 52)


def machine_frame(gfn: int, large: bool) -> int:
    """Where the generator puts guest frame ``gfn`` (if EPT maps it at all)."""
    if gfn < 512:
        return LOW_BASE + gfn
    return (LARGE_BASE if large else HIGH_BASE) + (gfn - 512)


@st.composite
def cases(draw: st.DrawFn, max_n: int = 40) -> Case:
    def c() -> Choices:
        return Choices(draw(CHOICE_BITS))

    maxphyaddr = draw(st.sampled_from((39, 40, 46)))
    noise = draw(st.sampled_from((0, 4, 8, 16)))  #: one EPT leaf in ``noise`` is odd (0: none)
    guest_maxphyaddr = draw(st.sampled_from((36, 40, 46, 48)))
    mem = PhysicalMemory(maxphyaddr)
    caps = EptCapabilities(execute_only=draw(st.booleans()), page_2m=draw(st.integers(0, 4)) != 0,
                           page_1g=draw(st.booleans()))
    for frame in (EPT_PML4, EPT_PDPT, EPT_PD, EPT_PT, EPT_PT2):
        mem.load_frame(frame, bytes(4096))
    put = mem.write_u64
    put(EPT_PML4 << 12, ept_table_entry(c(), EPT_PDPT, maxphyaddr, noise))
    if draw(st.integers(0, 19)) == 19:  # a 1 GiB EPT leaf instead of the PDPT's table
        put(EPT_PDPT << 12, make_leaf(0x40000, RWX) | int(EptFlag.PS))
    else:
        put(EPT_PDPT << 12, ept_table_entry(c(), EPT_PD, maxphyaddr, noise))
    put(EPT_PD << 12, ept_table_entry(c(), EPT_PT, maxphyaddr, noise))
    large = draw(st.booleans())
    if large:  # guest frames 512..1023 as one 2 MiB EPT page
        put((EPT_PD << 12) + 8, ept_leaf(c(), LARGE_BASE, maxphyaddr, noise) | int(EptFlag.PS))
    else:
        put((EPT_PD << 12) + 8, ept_table_entry(c(), EPT_PT2, maxphyaddr, noise))
        for gfn in (0x200, 513):
            put((EPT_PT2 << 12) + 8 * (gfn - 512), ept_leaf(c(), machine_frame(gfn, False), maxphyaddr, noise))
    for gfn in range(1, 7):
        put((EPT_PT << 12) + 8 * gfn, ept_leaf(c(), machine_frame(gfn, large), maxphyaddr, noise))
    if draw(st.integers(0, 3)) == 3:  # one guest table's frame, seen again at gfn 7 with other rights
        twin = machine_frame(draw(st.sampled_from(GUEST_TABLES)), large)
        put((EPT_PT << 12) + 8 * ALIAS_GFN, make_leaf(twin, draw(st.sampled_from((R | X, R, RWX)))))
    if draw(st.integers(0, 5)) == 5:  # an EPT table, visible to the guest
        put((EPT_PT << 12) + 8 * EPT_ALIAS_GFN, make_leaf(draw(st.sampled_from((EPT_PT, EPT_PD))), RWX))
    for gfn in GUEST_TABLES:
        frame = machine_frame(gfn, large)
        mem.load_frame(frame, bytes(4096))
        for slot in SLOTS:
            if draw(st.integers(0, 19)) != 3:
                put((frame << 12) + 8 * slot, guest_entry(c(), guest_maxphyaddr))
    root = draw(st.sampled_from(GUEST_TABLES))
    r = c()
    ctx = PagingContext(
        cr0=int(Cr0.PE | Cr0.PG) | (int(Cr0.WP) if r.pick(2) else 0),
        cr3=(root << 12) | r.pick(0x1000),
        cr4=int(Cr4.PAE) | (0, int(Cr4.SMEP), int(Cr4.SMAP), int(Cr4.SMEP | Cr4.SMAP))[r.pick(4)]
        | (int(Cr4.PGE) if r.pick(2) else 0),
        efer=int(Efer.LME | Efer.LMA) | (int(Efer.NXE) if r.pick(2) else 0),
        rflags=int(Rflags.FIXED1) | (int(Rflags.AC) if r.pick(2) else 0),
        maxphyaddr=guest_maxphyaddr,
        page1gb=r.pick(2) == 0,
    )
    n = draw(st.integers(0, max_n))
    vas: list[int] = []
    kinds: list[AccessKind] = []
    cpls: list[int] = []
    implicit: list[bool] = []
    for _ in range(n):
        a = c()
        shape = a.pick(15)
        if shape == 7:  # anything, mostly non-canonical
            vas.append(a.value & ((1 << 64) - 1))
        else:
            idx = [SLOTS[a.pick(4)] for _ in range(4)]
            va = (idx[0] << 39) | (idx[1] << 30) | (idx[2] << 21) | (idx[3] << 12) | a.pick(0x1000)
            if va >> 47:
                va |= ((1 << 17) - 1) << 47
            if shape == 8:
                va ^= 1 << (47 + a.pick(17))
            vas.append(va)
        kinds.append(KINDS[a.pick(3)])
        cpls.append((0, 3, 0, 3, 1, 2)[a.pick(6)])
        implicit.append(a.pick(6) == 5)
    return Case(mem, Eptp(MFN(EPT_PML4)), caps, ctx, vas, kinds, cpls, implicit)


# -- the reference and the comparison ------------------------------------------------------


def slow_walks(case: Case, mem: PhysicalMemory, vas: list[int] | None = None,
               accesses: list[Access] | None = None) -> list[NestedWalkResult | None]:
    """The reference: canonical check (None: #GP), then the 2-D walk, one address
    after another."""
    vas = case.vas if vas is None else vas
    accesses = case.accesses() if accesses is None else accesses
    return [nested_walk(mem, case.eptp, case.ctx, va, a, case.caps) if is_canonical(va) else None
            for va, a in zip(vas, accesses)]


def fast_walks(case: Case, mem: PhysicalMemory, snapshot_all: bool = False) -> NestedBatchResult:
    args = (
        np.array(case.vas, dtype=np.uint64), kind_codes(case.kinds),
        np.array(case.cpls, dtype=np.uint8), np.array(case.implicit, dtype=np.bool_),
    )
    if not snapshot_all:
        return translate_nested(mem, case.eptp, case.ctx, *args, caps=case.caps)
    snap = FrameSnapshot.take(mem)
    result = translate_nested_batch(snap, case.eptp, case.ctx, *args, caps=case.caps)
    snap.write_back(mem)
    return result


def assert_same_memory(a: PhysicalMemory, b: PhysicalMemory) -> None:
    for f in sorted(set(a.populated_frames()) | set(b.populated_frames())):
        assert a.frame_bytes(f) == b.frame_bytes(f), f"frame {f:#x} differs"


def assert_matches(fast: NestedBatchResult, slow: list[NestedWalkResult | None]) -> None:
    assert len(fast) == len(slow)
    for i, ref in enumerate(slow):
        got = fast.outcome(i)
        if ref is None:
            assert isinstance(got, GeneralProtection), i
            assert int(fast.guest_refs[i]) == int(fast.ept_refs[i]) == 0
            continue
        assert got == ref.outcome, (i, got, ref.outcome)
        assert (int(fast.guest_refs[i]), int(fast.ept_refs[i])) == (ref.guest_refs, ref.ept_refs), i
        if isinstance(ref.outcome, PageFault):
            assert int(fast.cr2[i]) == ref.outcome.cr2 and int(fast.error_code[i]) == int(ref.outcome.error_code)


def label(fast: NestedBatchResult) -> None:
    event("sequential (order-dependent)" if fast.sequential else "vectorized")
    if bool(((fast.status == STATUS_EPT_VIOLATION) & ~fast.exit_final & (fast.exit_kind == 1)).any()):
        event("some A/D update refused by EPT")
    for name, st_ in (("ok", STATUS_OK), ("EPT violation", STATUS_EPT_VIOLATION), ("misconfig", STATUS_EPT_MISCONFIG)):
        if bool((fast.status == st_).any()):
            event(f"some {name}")


@given(cases(), st.booleans())
@settings(max_examples=300, deadline=None)
def test_fast_equals_sequential_slow(case: Case, snapshot_all: bool) -> None:
    m_slow, m_fast = case.mem.copy(), case.mem.copy()
    slow = slow_walks(case, m_slow)
    fast = fast_walks(case, m_fast, snapshot_all)
    label(fast)
    assert_matches(fast, slow)
    assert_same_memory(m_slow, m_fast)


@given(cases(max_n=32), st.randoms(use_true_random=False))
@settings(max_examples=100, deadline=None)
def test_fast_permuted_batch(case: Case, rnd: random.Random) -> None:
    """The fast path on a permuted batch equals the slow path in that order."""
    order = list(range(len(case.vas)))
    rnd.shuffle(order)
    perm = Case(case.mem, case.eptp, case.caps, case.ctx, [case.vas[i] for i in order],
                [case.kinds[i] for i in order], [case.cpls[i] for i in order], [case.implicit[i] for i in order])
    m_slow, m_fast = case.mem.copy(), case.mem.copy()
    assert_matches(fast_walks(perm, m_fast), slow_walks(perm, m_slow))
    assert_same_memory(m_slow, m_fast)


@given(cases(max_n=0), st.lists(st.integers(0, (1 << 40) - 1), max_size=40), st.lists(st.sampled_from((0, 1, 2)), min_size=40, max_size=40))
@settings(max_examples=150, deadline=None)
def test_ept_walk_batch_equals_ept_walk(case: Case, gpas: list[int], kinds: list[int]) -> None:
    """The one-dimensional part: guest-physical addresses (mostly in the generated
    EPT's range) through EPT, against refmodel.hv.hap.ept.ept_walk."""
    gpas = [g & ((1 << 22) - 1) if g & 1 else g for g in gpas]  # mostly gfn 0..1023
    snap = FrameSnapshot.take(case.mem)
    h = ept_walk_batch(snap, case.eptp, np.array(gpas, dtype=np.uint64), np.array(kinds[: len(gpas)], dtype=np.uint8), case.caps)
    for i, gpa in enumerate(gpas):
        ref = ept_walk(case.mem, case.eptp, gpa, EptAccess(KINDS[kinds[i]]), case.caps)
        assert int(h.refs[i]) == ref.refs
        o = ref.outcome
        if isinstance(o, EptTranslation):
            assert int(h.status[i]) == 0 and (int(h.mpa[i]), int(h.size[i])) == (o.mpa, o.size.value)
        elif isinstance(o, EptViolation):
            q = o.qualification
            assert int(h.status[i]) == STATUS_EPT_VIOLATION, (i, o)
            assert int(h.rights[i]) == (R if q.readable else 0) | (W if q.writable else 0) | (X if q.executable else 0)
        else:
            assert int(h.status[i]) == STATUS_EPT_MISCONFIG, (i, o)
            assert (int(h.level[i]), int(h.entry[i])) == (int(o.level), o.entry)


# -- hand-written cases: a domain whose EPT Xen built from its P2M ------------------------------


@dataclass
class HapSpace:
    machine: Machine
    ept: Ept
    ctx: PagingContext
    table_gfns: list[int]

    def slow(self, vas: list[int], kinds: list[AccessKind], mem: PhysicalMemory) -> list[NestedWalkResult | None]:
        case = Case(mem, self.ept.eptp, EptCapabilities(), self.ctx, vas, kinds, [0] * len(vas), [False] * len(vas))
        return slow_walks(case, mem)

    def fast(self, vas: list[int], kinds: list[AccessKind], mem: PhysicalMemory) -> NestedBatchResult:
        return translate_nested(mem, self.ept.eptp, self.ctx, np.array(vas, dtype=np.uint64), kinds)

    def both(self, vas: list[int], kinds: list[AccessKind]) -> NestedBatchResult:
        """Fast and slow on copies of the machine memory: equal outcomes, references
        and memory; the fast result, and the fast memory installed in the machine."""
        m_slow, m_fast = self.machine.mem.copy(), self.machine.mem.copy()
        slow = self.slow(vas, kinds, m_slow)
        fast = self.fast(vas, kinds, m_fast)
        assert_matches(fast, slow)
        assert_same_memory(m_slow, m_fast)
        self.install(m_fast)
        return fast

    def install(self, mem: PhysicalMemory) -> None:
        """Make the machine's memory (which the EPT editor holds) equal to ``mem``."""
        for f in mem.populated_frames():
            self.machine.mem.load_frame(f, mem.frame_bytes(f))


def hap_space(maps: list[tuple[int, int, int]], large: bool = False) -> HapSpace:
    """A domain of 64 guest frames on EPT built from its P2M (``Ept.from_p2m``, as
    HapBackend builds it) and guest page tables, in guest frames 32.., mapping each
    ``(va, gfn, flags)``. With ``large`` the domain has 1024 frames in two aligned
    2 MiB runs, which EPT maps with two 2 MiB leaves."""
    machine = Machine(nr_frames=2048, hypervisor_frames=64)
    dom = machine.create_domain(1, 1024 if large else 64, contiguous=large)
    ept = Ept.from_p2m(machine, dom, PageSize.SIZE_1G if large else PageSize.SIZE_4K)
    guest_physical = PhysicalMemory(machine.mem.maxphyaddr)
    b = PageTableBuilder(guest_physical, iter(range(32, 64)))
    for va, gfn, flags in maps:
        b.map(va, gfn << PAGE_SHIFT, flags)
    for gfn in guest_physical.populated_frames():
        machine.mem.load_frame(dom.p2m[GFN(gfn)], guest_physical.frame_bytes(gfn))
    return HapSpace(machine, ept, PagingContext(cr3=b.cr3, maxphyaddr=machine.mem.maxphyaddr), list(b.tables))


USER_RW = int(PteFlag.RW | PteFlag.US)
#: four pages under four different PML4 slots: no guest table is shared below the PML4
SPREAD = [(i << 39) | (i << 30) | (i << 21) | (i << 12) for i in (1, 2, 3, 4)]


def test_cold_two_dimensional_walk_is_24_references_and_sets_guest_a_d() -> None:
    space = hap_space([(va, 10 + i, USER_RW) for i, va in enumerate(SPREAD)])
    kinds = [AccessKind.WRITE, AccessKind.READ, AccessKind.READ, AccessKind.FETCH]
    fast = space.both([va + 8 for va in SPREAD], kinds)
    assert not fast.sequential
    assert fast.ok.all()
    assert fast.guest_refs.tolist() == [4] * 4 and fast.ept_refs.tolist() == [20] * 4
    assert fast.refs.tolist() == [24] * 4  # (4 + 1) * (4 + 1) - 1
    dom = space.machine.domain(1)
    assert [int(m) >> PAGE_SHIFT for m in fast.mpa.tolist()] == [dom.p2m[GFN(10 + i)] for i in range(4)]
    assert fast.dirty.tolist() == [True, False, False, False]
    # a second batch: the same references (no TLB), nothing left to set
    before = space.machine.mem.copy()
    again = space.both([va + 8 for va in SPREAD], [AccessKind.READ] * 4)
    assert again.refs.tolist() == [24] * 4 and again.dirty.tolist() == [True, False, False, False]
    assert_same_memory(before, space.machine.mem)


def test_large_ept_pages_built_from_a_contiguous_p2m_take_19_references() -> None:
    """The fast path on the EPT HapBackend builds by default: 2 MiB EPT leaves, a
    4 KiB guest page, 4 + 4 x 3 + 3 = 19 references; also across the two leaves and
    after one of them is split by a 4 KiB change."""
    pages = [(va, 10 + 600 * (i % 2) + i, USER_RW) for i, va in enumerate(SPREAD)]
    space = hap_space(pages, large=True)
    assert {m.size for m in space.ept.mappings()} == {PageSize.SIZE_2M}
    kinds = [AccessKind.WRITE, AccessKind.READ, AccessKind.READ, AccessKind.FETCH]
    fast = space.both([va + 8 for va in SPREAD], kinds)
    assert not fast.sequential and fast.ok.all()
    assert fast.refs.tolist() == [19] * 4 and fast.ept_refs.tolist() == [15] * 4
    dom = space.machine.domain(1)
    assert [int(m) >> PAGE_SHIFT for m in fast.mpa.tolist()] == [dom.p2m[GFN(g)] for _, g, _ in pages]
    assert fast.size.tolist() == [PageSize.SIZE_4K.value] * 4  # combined: the smaller of the two
    # split the first leaf (a guest page-table frame goes read-only, as for log-dirty)
    space.ept.write_leaf(space.table_gfns[0], make_leaf(dom.p2m[GFN(space.table_gfns[0])], EptFlag.R | EptFlag.X))
    again = space.both([va + 8 for va in SPREAD], [AccessKind.READ] * 4)
    assert again.status.tolist() == [STATUS_OK] * 4
    # every guest table now sits on 4 KiB EPT pages (4 x 4 + 4), the final page on
    # 4 KiB (split run) or 2 MiB (the other run) ones
    assert again.refs.tolist() == [24, 23, 24, 23]


def test_read_only_ept_for_page_tables_refuses_the_a_d_update() -> None:
    """Xen's log-dirty mode makes the guest's page-table frames read-only in EPT: a
    walk that must set a clear A/D flag there exits (a data write during the walk,
    qualification: write, not final, GLA valid); one that needs no update does not.
    Every walk sees the same rights, so the batch stays vectorized."""
    space = hap_space([(va, 10 + i, USER_RW) for i, va in enumerate(SPREAD)])
    space.both(SPREAD[:2], [AccessKind.READ] * 2)  # A set along two paths
    dom = space.machine.domain(1)
    for gfn in space.table_gfns:
        space.ept.write_leaf(gfn, make_leaf(dom.p2m[GFN(gfn)], R | X))
    kinds = [AccessKind.READ, AccessKind.WRITE, AccessKind.READ]
    fast = space.both([SPREAD[0], SPREAD[1], SPREAD[2]], kinds)
    assert not fast.sequential
    assert fast.status.tolist() == [STATUS_OK, STATUS_EPT_VIOLATION, STATUS_EPT_VIOLATION]
    v1, v2 = fast.outcome(1), fast.outcome(2)
    assert isinstance(v1, EptViolation) and isinstance(v2, EptViolation)
    assert v1.qualification.write and not v1.qualification.final and v1.gla == SPREAD[1]
    assert v1.gpa == fast.entry_addrs[1, 3]  # the PTE: D was clear
    assert v2.gpa == fast.entry_addrs[2, 0]  # the PML4E: A was clear
    assert (v1.qualification.readable, v1.qualification.writable) == (True, False)


def test_a_table_seen_through_two_guest_frames_with_different_rights_is_order_dependent() -> None:
    """Guest frame 60 maps the machine frame of the PDPT of SPREAD[0] again,
    read-only in EPT, and PML4 slot 5 points at it: both walks below read the same
    PDPTE, one through a writable EPT entry. In one order the first walk sets A and
    the second needs no write; in the other the read-only walk must set A and exits.
    The batch detects it and runs sequentially, in both orders."""
    space = hap_space([(va, 10 + i, USER_RW) for i, va in enumerate(SPREAD)])
    dom = space.machine.domain(1)
    pml4_gfn = space.ctx.cr3 >> PAGE_SHIFT
    pdpt_entry = space.machine.mem.read_u64((dom.p2m[GFN(pml4_gfn)] << PAGE_SHIFT) + 8 * 1)
    pdpt_gfn = (pdpt_entry >> PAGE_SHIFT) & ((1 << 28) - 1)
    space.ept.write_leaf(60, make_leaf(dom.p2m[GFN(pdpt_gfn)], R | X))
    space.machine.mem.write_u64((dom.p2m[GFN(pml4_gfn)] << PAGE_SHIFT) + 8 * 5, (60 << PAGE_SHIFT) | int(PteFlag.P | PteFlag.RW | PteFlag.US))
    through_alias = (5 << 39) | (SPREAD[0] & ((1 << 39) - 1))
    outcomes = []
    for order in ([SPREAD[0], through_alias], [through_alias, SPREAD[0]]):
        saved = space.machine.mem.copy()
        fast = space.both(order, [AccessKind.READ] * 2)
        assert fast.sequential
        outcomes.append(fast.status.tolist())
        space.install(saved)
    assert outcomes == [[STATUS_OK, STATUS_OK], [STATUS_EPT_VIOLATION, STATUS_OK]]


def test_guest_a_d_update_landing_in_an_ept_table_is_order_dependent() -> None:
    """A (deliberately broken) EPT maps guest frame 61 onto its own PD; a guest PDE
    pointing at frame 61 makes a walk use EPT PDE 0 as a guest PTE and set its A flag
    — bit 5, reserved in an EPT entry that references a table — so every later walk
    through that EPT PDE is an EPT misconfiguration (that walk's own final access
    included): another walk's outcome depends on the order, and the batch runs
    sequentially."""
    space = hap_space([(va, 10 + i, USER_RW) for i, va in enumerate(SPREAD)])
    ept_pd = (space.ept.entry_addr(0, Level.L2) or 0) >> PAGE_SHIFT
    space.ept.write_leaf(61, make_leaf(ept_pd, RWX))
    dom = space.machine.domain(1)
    pd_gfn = space.table_gfns[2]  # the PD of SPREAD[0] (tables are made in walk order)
    space.machine.mem.write_u64((dom.p2m[GFN(pd_gfn)] << PAGE_SHIFT) + 8 * 7, (61 << PAGE_SHIFT) | int(PteFlag.P | PteFlag.RW))
    va = (SPREAD[0] & ~((1 << 30) - 1)) | (7 << 21)  # PTE slot 0 of "table" 61: EPT PDE 0
    outcomes = []
    for order in ([va, SPREAD[1]], [SPREAD[1], va]):
        saved = space.machine.mem.copy()
        fast = space.both(order, [AccessKind.READ] * 2)
        assert fast.sequential
        outcomes.append(fast.status.tolist())
        space.install(saved)
    assert outcomes == [[STATUS_EPT_MISCONFIG, STATUS_EPT_MISCONFIG], [STATUS_OK, STATUS_EPT_MISCONFIG]]


def test_rejects_bad_shapes_and_handles_empty_batches() -> None:
    space = hap_space([(SPREAD[0], 10, USER_RW)])
    mem, eptp, ctx = space.machine.mem, space.ept.eptp, space.ctx
    with pytest.raises(RefmodelError):
        translate_nested(mem, eptp, ctx, np.zeros((2, 2), dtype=np.uint64))
    with pytest.raises(RefmodelError):
        translate_nested(mem, eptp, ctx, np.zeros(3, dtype=np.uint64), np.zeros(2, dtype=np.uint8))
    with pytest.raises(RefmodelError):
        translate_nested(mem, eptp, ctx, np.zeros(1, dtype=np.uint64), 5)
    with pytest.raises(RefmodelError):
        translate_nested(mem, eptp, replace(ctx, maxphyaddr=52), np.zeros(1, dtype=np.uint64))
    with pytest.raises(RefmodelError):
        ept_walk_batch(FrameSnapshot.take(mem), eptp, np.array([1 << 48], dtype=np.uint64))
    r = translate_nested(mem, eptp, ctx, np.zeros(0, dtype=np.uint64))
    assert len(r) == 0 and not r.sequential


def test_structure_frames_are_the_ept_and_guest_tables() -> None:
    space = hap_space([(va, 10 + i, USER_RW) for i, va in enumerate(SPREAD)])
    dom = space.machine.domain(1)
    frames = set(nested_structure_frames(space.machine.mem, space.ept.eptp, space.ctx))
    assert {int(t) for t in space.ept.tables()} <= frames
    assert {int(dom.p2m[GFN(g)]) for g in space.table_gfns} <= frames
    assert not {int(dom.p2m[GFN(10 + i)]) for i in range(4)} & frames  # data pages are never read


# -- the --ept bench runs and cross-checks its engines (tiny N; no timing is asserted) ----------


def test_nested_bench_engines_agree_and_count_references() -> None:
    space = build_nested_space()
    vas = addresses(64, seed=4)
    fast_pa, fast_refs = run_nested_fast(space, vas)
    slow_pa, slow_refs = run_nested_slow(space, [int(v) for v in vas.tolist()])
    assert [int(p) for p in fast_pa.tolist()] == slow_pa and fast_refs == slow_refs
    assert 14 * 64 <= fast_refs <= 24 * 64  # 1 GiB .. 4 KiB guest pages on 4 KiB EPT leaves
    lines: list[str] = []
    rows = run_nested_bench([30, 60], slow_max_n=30, repeat=1, seed=2, out=lines.append)
    assert [r.slow_extrapolated for r in rows] == [False, True]
    assert "extrapolated" in "\n".join(lines)
    assert main(["bench", "--sizes", "20", "--repeat", "1", "--no-unicorn", "--ept"]) == 0
