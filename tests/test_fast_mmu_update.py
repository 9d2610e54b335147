"""Differential tests: the batch ``mmu_update`` (refmodel.fast.mmu_update) against
Xen's sequential ``do_mmu_update`` (refmodel.hv.pv.mmu_update), on two identically
built machines.

Each example builds a PV domain 1 with the standard tree (L4, L3, L2 and the L1 of
guest frame 4, tests/test_pv_support.py), a second L1 (frame 5), an L1 pinned and
unpinned (frame 6: type L1, count 0, stamped after the last flush, so making it
writable needs a TLB flush), eight writable and four read-only mappings, a released
writable frame, and a filled TLB; domain 2 has a vCPU too. Then one request list:

- mostly L1 updates of entries in frames 4 and 5 (a few slots, so entries repeat):
  own data frames RW or RO, page-table frames (RW: -EBUSY), frame 6, foreign
  frames, DOMID_XEN frames, frames that are not RAM (-EPERM, or I/O memory the
  domains may map when the example gives them some; INVALID_MFN: -EINVAL), disallowed flags
  (PAT, PCD, PWT), allowed ones (G, NX, AVAIL), not present, whitelisted changes of
  the entry already there (the fast path), with commands 0, 2 (PRESERVE_AD) and 3;
- L2-L4 updates (linking and unlinking L1s, Xen's L4 slots), plain writes to data
  frames, entries in foreign and Xen frames (-EINVAL), bad commands 4-7 (-ENOSYS),
  M2P updates of own and foreign frames;
- sometimes a count beyond the list (-EFAULT), another data owner (privileged or
  not), an unknown one (-ESRCH).

The comparison covers (rc, done), every frame of memory, every page's type state
(count, validated, pinned, linear count, tlbflush_timestamp), the frame-table
statistics, flush clock and per-domain flush stamps, the M2P, the event counters
and the TLB's entries.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from refmodel.arch.pte import Level, PteFlag
from refmodel.arch.types import PAGE_SHIFT
from refmodel.errors import RefmodelError
from refmodel.fast.mmu_update import FastBatchResult, do_mmu_update_fast, mmu_update_batch
from refmodel.hv.machine import DOMID_SELF
from refmodel.hv.pv import BatchResult, Errno, MmuCmd, MmuextCmd, MmuUpdate, PageType, PvStat, PvVcpu, neg
from refmodel.hv.pv.mmu_update import do_mmu_update
from refmodel.hv.pv.pagetype import INVALID_MFN, PageInfo
from test_pv_support import DATA, L1, L2, L3, L4, TABLE, USER_RO, USER_RW, PvWorld

L1B, L1C = 5, 6  #: a second L1 in use; an L1 pinned and unpinned (stamped)
RELEASED = DATA + 20  #: mapped writable, then unmapped: writable, count 0
SLOTS = (0, 1, 2, 3, 8, 9, 11, 300)
PAT, PCD, PWT, G, XD = (int(f) for f in (PteFlag.PS, PteFlag.PCD, PteFlag.PWT, PteFlag.G, PteFlag.XD))
AVAIL = (0x7 << 9) | (0x7FF << 52)
L1_FLAGS = (USER_RW, USER_RW, USER_RO, USER_RW | G | XD, USER_RO | AVAIL, 0, int(PteFlag.RW),
            USER_RW | PAT, USER_RW | PCD, USER_RO | PWT, USER_RW | int(PteFlag.A | PteFlag.D))
XEN_FRAME = 5  #: a DOMID_XEN frame (the machine's first 256 frames are Xen's)


class Choices:
    """Many small choices from one drawn integer (0 decodes to the first choice)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def pick(self, n: int) -> int:
        self.value, choice = divmod(self.value, n)
        return choice


@dataclass(frozen=True)
class Spec:
    privileged: bool
    other_privileged: bool
    foreigndom: int
    extra_count: int
    mode: int  #: 0: valid L1 updates (long runs); 1: any L1 updates; 2: anything
    requests: tuple[int, ...]  #: one integer per request, decoded by :func:`request`
    iomem: bool  #: both domains may map the I/O memory frames nr_frames..nr_frames+7


def build(spec: Spec) -> PvWorld:
    """The machine of an example, built the same way every time."""
    w = PvWorld(privileged=spec.privileged)
    w.other.privileged = spec.other_privileged
    if spec.iomem:
        w.dom.iomem_caps = w.other.iomem_caps = ((w.machine.nr_frames, w.machine.nr_frames + 7),)
    PvVcpu(w.machine, w.other, vpid=3)
    w.build_tree()
    assert w.update(L2, 1, w.entry(L1B, TABLE)) == 0
    assert w.pin(L1C, Level.L1) == 0 and w.ext(MmuextCmd.UNPIN_TABLE, w.mfn(L1C)) == 0
    premapped: list[tuple[int, int, int]] = [(L1, s, w.entry(DATA + s, USER_RW)) for s in range(8)]
    premapped += [(L1, 8 + i, w.entry(g, USER_RO)) for i, g in enumerate((L4, L3, L2, L1))]
    premapped += [(L1B, 0, w.entry(RELEASED, USER_RW)), (L1B, 0, 0), (L1B, 1, w.entry(DATA + 1, USER_RW))]
    assert w.updates(premapped) == BatchResult(0, len(premapped))
    for slot in range(12):
        assert not isinstance(w.vcpu.mmu.load(slot << PAGE_SHIFT), Exception)
    return w


def request(w: PvWorld, code: int, mode: int) -> MmuUpdate:
    """Decode one request for world ``w`` (module docstring; ``mode`` as in
    :class:`Spec`)."""
    c = Choices(code)
    kind = c.pick(20 if mode == 2 else 14)
    if kind < 14:  # an L1 entry
        table = (L1, L1B)[c.pick(2)]
        slot = c.pick(512) if mode == 0 else SLOTS[c.pick(len(SLOTS))]
        cmd = (MmuCmd.NORMAL_PT_UPDATE, MmuCmd.NORMAL_PT_UPDATE, MmuCmd.PT_UPDATE_PRESERVE_AD,
               MmuCmd.PT_UPDATE_NO_TRANSLATE)[c.pick(4)]
        flags = L1_FLAGS[c.pick(6 if mode == 0 else len(L1_FLAGS))]  # the first six are allowed
        where = c.pick(12)
        if mode == 0 and where in (5, 6, 7):  # a page table, read-only; or a data frame
            where, flags = (5, USER_RO) if where == 5 else (9, flags)
        frame: int
        if where < 5:
            frame = w.mfn(DATA + c.pick(24))
        elif where == 5:
            frame = w.mfn((L4, L3, L2, L1, L1B, L1C, L1C, L1C)[c.pick(8)])
        elif where == 6:
            frame = w.mfn(c.pick(4), w.other)
        elif where == 7:
            frame = (XEN_FRAME, w.machine.nr_frames + 3, w.machine.nr_frames + 9, INVALID_MFN)[c.pick(4)]
        elif where == 8:  # whitelisted changes of what was pre-mapped there (the fast path)
            flips = (int(PteFlag.A), int(PteFlag.D), int(PteFlag.US), XD, 1 << 9, 1 << 60, G)[c.pick(7)]
            return MmuUpdate.pt_update(w.maddr(table, slot), w.read(table, slot) ^ flips,
                                      (MmuCmd.NORMAL_PT_UPDATE, MmuCmd.PT_UPDATE_PRESERVE_AD)[c.pick(2)])
        else:
            frame = w.mfn(DATA + c.pick(8))
        return MmuUpdate.pt_update(w.maddr(table, slot), (frame << PAGE_SHIFT) | flags, cmd)
    if kind < 16:  # an L2..L4 entry: link or unlink an L1, or one of Xen's L4 slots
        level = c.pick(4)
        if level == 3:
            return MmuUpdate.pt_update(w.maddr(L4, 256 + c.pick(16)), w.entry(L3, TABLE))
        target = (L1B, L1C, DATA + 30, L1)[c.pick(4)]
        value = (w.entry(target, TABLE), 0, w.entry(target, USER_RO))[c.pick(3)]
        return MmuUpdate.pt_update(w.maddr((L2, L2, L3)[level], 1 + c.pick(3)), value)
    if kind == 16:  # a plain write into a data frame
        return MmuUpdate.pt_update(w.maddr(DATA + c.pick(24), 8 * c.pick(4)), c.pick(1 << 20))
    if kind == 17:  # an entry in somebody else's frame
        foreign = (w.mfn(c.pick(4), w.other), XEN_FRAME)[c.pick(2)]
        return MmuUpdate.pt_update(foreign << PAGE_SHIFT, USER_RW)
    if kind == 18:
        return MmuUpdate((w.maddr(L1, 3)) | (4 + c.pick(4)), 0)  # commands 4..7
    owner = (w.dom, w.dom, w.other)[c.pick(3)]
    frame = w.mfn((DATA + c.pick(8)) if owner is w.dom else c.pick(4), owner)
    return MmuUpdate((frame << PAGE_SHIFT) | 1, 100 + c.pick(50))  # MMU_MACHPHYS_UPDATE


@st.composite
def specs(draw: st.DrawFn, max_n: int = 180) -> Spec:
    foreigndom = draw(st.sampled_from((DOMID_SELF,) * 24 + (2,) * 6 + (1, 77)))
    extra = draw(st.sampled_from((0,) * 9 + (3,)))
    mode = draw(st.integers(0, 2))
    n = draw(st.integers(0, max_n if mode == 0 else max_n // 3))
    codes = tuple(draw(st.integers(0, (1 << 64) - 1)) for _ in range(n))
    return Spec(draw(st.booleans()), draw(st.booleans()), foreigndom, extra, mode, codes, draw(st.booleans()))


# -- the comparison --------------------------------------------------------------------------


@dataclass(frozen=True)
class State:
    memory: dict[int, bytes]
    pages: dict[int, PageInfo]
    stats: dict[str, int]
    clock: int
    last_flush: dict[int, int]
    m2p: dict[int, int]
    events: dict[str, int]
    tlb: list[str]


def state(w: PvWorld) -> State:
    ft, m = w.ft, w.machine
    return State(
        memory={f: m.mem.frame_bytes(f) for f in m.mem.populated_frames()},
        pages={int(f): p for f, p in ft.pages.items() if p != PageInfo()},
        stats={s.value: n for s, n in ft.stats.items() if n},
        clock=ft.clock,
        last_flush={int(d): t for d, t in ft.last_flush.items()},
        m2p={int(k): int(v) for k, v in m.m2p.items()},
        events=m.counters.as_dict(),
        tlb=sorted(repr(e) for e in m.tlb.entries()),
    )


def assert_same_state(a: State, b: State) -> None:
    assert a.memory.keys() == b.memory.keys()
    for f in a.memory:
        assert a.memory[f] == b.memory[f], f"frame {f:#x} differs"
    for f in sorted(a.pages.keys() | b.pages.keys()):
        assert a.pages.get(f, PageInfo()) == b.pages.get(f, PageInfo()), f"page {f:#x}"
    assert (a.stats, a.clock, a.last_flush) == (b.stats, b.clock, b.last_flush)
    assert a.m2p == b.m2p
    assert a.events == b.events
    assert a.tlb == b.tlb


def run_both(spec: Spec) -> tuple[BatchResult, BatchResult]:
    slow_w, fast_w = build(spec), build(spec)
    reqs = [request(slow_w, code, spec.mode) for code in spec.requests]
    assert reqs == [request(fast_w, code, spec.mode) for code in spec.requests]  # the two builds agree
    count = len(reqs) + spec.extra_count
    slow = do_mmu_update(slow_w.vcpu, reqs, count, spec.foreigndom)
    ptr = np.array([r.ptr for r in reqs], dtype=np.uint64)
    val = np.array([r.val for r in reqs], dtype=np.uint64)
    fast = mmu_update_batch(fast_w.vcpu, ptr, val, count, spec.foreigndom)
    event(f"rc {slow.rc}")
    event("some requests vectorized" if fast.vectorized else "nothing vectorized")
    if fast.sequential:
        event("some requests on the slow path")
    event(f"done {'0' if not slow.done else '1-9' if slow.done < 10 else '10-63' if slow.done < 64 else '>= 64'}")
    assert fast.batch == slow, (fast, slow)
    ran = slow.done + (1 if slow.rc not in (0, neg(Errno.EFAULT), neg(Errno.ESRCH)) else 0)
    assert fast.vectorized + fast.sequential == ran
    assert_same_state(state(slow_w), state(fast_w))
    return slow, fast.batch


@given(specs())
@settings(max_examples=200, deadline=None)
def test_fast_mmu_update_equals_do_mmu_update(spec: Spec) -> None:
    run_both(spec)


# -- hand-written cases ------------------------------------------------------------------------


def plain_spec(mode: int = 0) -> Spec:
    return Spec(False, False, DOMID_SELF, 0, mode, (), False)


def run_reqs(reqs_of: Callable[[PvWorld], list[MmuUpdate]], spec: Spec | None = None) -> tuple[BatchResult, FastBatchResult, PvWorld]:
    """Slow and fast on two builds of ``spec``'s machine: same result and state."""
    spec = spec or plain_spec()
    slow_w, fast_w = build(spec), build(spec)
    slow = do_mmu_update(slow_w.vcpu, reqs_of(slow_w), None, spec.foreigndom)
    reqs = reqs_of(fast_w)
    fast = mmu_update_batch(fast_w.vcpu, np.array([r.ptr for r in reqs], dtype=np.uint64),
                            np.array([r.val for r in reqs], dtype=np.uint64), None, spec.foreigndom)
    assert fast.batch == slow
    assert_same_state(state(slow_w), state(fast_w))
    return slow, fast, fast_w


def l1_map(w: PvWorld, table: int, slot: int, gfn: int, flags: int = USER_RW) -> MmuUpdate:
    return MmuUpdate.pt_update(w.maddr(table, slot), w.entry(gfn, flags))


def test_a_thousand_l1_updates_are_one_array_pass_each_window() -> None:
    """The PV guest's "map me these 1024 pages": every request is decided by the
    array pass, none by the slow path; the type counts of the data frames add up."""
    def reqs(w: PvWorld) -> list[MmuUpdate]:
        return [l1_map(w, (L1, L1B)[i // 512], i % 512, DATA + 30 + i % 16) for i in range(1024)]

    slow, fast, w = run_reqs(reqs)
    assert slow == BatchResult(0, 1024)
    assert (fast.vectorized, fast.sequential) == (1024, 0)
    assert w.state(DATA + 30).count == 64


def test_the_first_error_stops_the_batch_and_only_the_prefix_is_applied() -> None:
    """An RW mapping of the L4 (-EBUSY) as the third request: two done, the fourth
    never runs."""
    def reqs(w: PvWorld) -> list[MmuUpdate]:
        return [l1_map(w, L1, 20, DATA + 30), l1_map(w, L1, 21, DATA + 31), l1_map(w, L1, 22, L4),
                l1_map(w, L1, 23, DATA + 32)]

    slow, fast, w = run_reqs(reqs)
    assert slow == BatchResult(neg(Errno.EBUSY), 2)
    assert (fast.vectorized, fast.sequential) == (3, 0)
    assert w.read(L1, 21) != 0 and w.read(L1, 23) == 0


def test_a_type_change_that_needs_a_flush_runs_on_the_slow_path() -> None:
    """Frame 6 was an L1 until after the last flush: mapping it writable changes its
    type and must flush the TLB first (``_get_page_type``); the batch hands that one
    request to the slow path and carries on with array passes."""
    def reqs(w: PvWorld) -> list[MmuUpdate]:
        return [l1_map(w, L1, 20, DATA + 30), l1_map(w, L1, 21, L1C), l1_map(w, L1, 22, DATA + 31)]

    slow, fast, w = run_reqs(reqs)
    assert slow == BatchResult(0, 3)
    assert (fast.vectorized, fast.sequential) == (2, 1)
    assert w.ft.stats[PvStat.TYPE_CHANGE_FLUSH] == 1


def test_an_entry_written_twice_and_upper_levels_run_on_the_slow_path() -> None:
    def reqs(w: PvWorld) -> list[MmuUpdate]:
        return [l1_map(w, L1, 20, DATA + 30), l1_map(w, L1, 20, DATA + 31, USER_RO),
                MmuUpdate.pt_update(w.maddr(L2, 5), w.entry(L1C, TABLE)), l1_map(w, L1, 21, DATA + 30)]

    slow, fast, w = run_reqs(reqs)
    assert slow == BatchResult(0, 4)
    assert (fast.vectorized, fast.sequential) == (2, 2)
    assert w.state(L1C).type is PageType.L1 and w.state(DATA + 31).count == 0


def test_static_errors_bound_the_batch() -> None:
    """A bad command, an entry in a foreign frame: -ENOSYS / -EINVAL wherever the
    request is, after the requests before it ran (one of them on the slow path)."""
    def reqs(w: PvWorld) -> list[MmuUpdate]:
        return [l1_map(w, L1, 20, DATA + 30), MmuUpdate.pt_update(w.maddr(L2, 6), w.entry(L1C, TABLE)),
                MmuUpdate(w.maddr(L1, 3) | 5, 0), l1_map(w, L1, 21, DATA + 30)]

    slow, fast, _ = run_reqs(reqs)
    assert slow == BatchResult(neg(Errno.ENOSYS), 2)
    assert (fast.vectorized, fast.sequential) == (2, 1)


def test_counts_owners_and_shapes() -> None:
    w = build(plain_spec())
    reqs = [l1_map(w, L1, 20, DATA + 30)]
    assert do_mmu_update_fast(w.vcpu, reqs, 3) == BatchResult(neg(Errno.EFAULT), 1)
    assert do_mmu_update_fast(w.vcpu, reqs, 0) == BatchResult(0, 0)
    assert do_mmu_update_fast(w.vcpu, reqs, foreigndom=77) == BatchResult(neg(Errno.ESRCH), 0)
    assert do_mmu_update_fast(w.vcpu, [], foreigndom=DOMID_SELF) == BatchResult(0, 0)
    with pytest.raises(RefmodelError):
        do_mmu_update_fast(w.vcpu, reqs, -1)
    with pytest.raises(RefmodelError):
        mmu_update_batch(w.vcpu, np.zeros(2, dtype=np.uint64), np.zeros(3, dtype=np.uint64))
    with pytest.raises(RefmodelError):
        do_mmu_update_fast(w.vcpu, reqs, foreigndom=1 << 16)
