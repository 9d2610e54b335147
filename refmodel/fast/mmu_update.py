"""Batch ``mmu_update``: Xen's ``do_mmu_update`` on a whole request list, vectorized
where the requests do not depend on each other.

:func:`mmu_update_batch` gives the return value, ``done`` and the final state —
memory, page types and counts (``tlbflush_timestamp`` included), the M2P, the
frame-table statistics, the event counters and the TLB — that
:func:`refmodel.hv.pv.mmu_update.do_mmu_update` produces on the same machine. Xen
runs the requests in order and stops at the first failing one: the batch must find
that index and apply exactly the requests before it.

What is vectorized, honestly:

1. *Decoding and the checks no request can change* (:func:`static_screen`, whole
   list at once): the command (``ptr & 7``; 4-7 -> -ENOSYS), the XSM check (-EPERM),
   the owner of the frame holding the entry (-EINVAL unless the caller's) or, for
   MMU_MACHPHYS_UPDATE, of the frame (-EINVAL unless the data owner's). Frame
   ownership never changes inside ``mmu_update``, so the first such failure bounds
   the batch: nothing after it runs.
2. *L1 runs*: a stretch of consecutive requests that each write an entry of an L1
   page table in use (type L1, count > 0, validated), no two the same entry, plus
   MACHPHYS requests. Within such a run the outcome of every request can be
   computed from the state before the run (:func:`screen_run`):

   - the table frames stay L1 tables in use: an L1 entry takes and drops only
     *writable* type references (``get_page_from_l1e`` / ``put_page_from_l1e``),
     and a writable reference on a table in use fails;
   - the old entry of each request is the entry before the run (no entry twice);
   - Xen's rewrite of a present entry (``adjust_guest_l1e``) is a function of the
     entry alone, so it is applied to the whole array before the fast-path test;
   - the flag whitelist (``l1_disallow_mask``), the fast-path test
     (``l1e_has_changed``), MMIO without I/O memory permission (-EPERM; -EINVAL
     for INVALID_MFN) and the owner of the mapped frame (-EBUSY) are functions of
     the request and the ownership; a permitted I/O memory mapping goes to the
     slow path;
   - taking a writable reference fails (-EBUSY) exactly when the target's type
     count is > 0 with another type *before the run*: in a run no target's type
     can become anything but writable, and a writable type stays writable.

   So the first failing request of the run is found with array operations, and the
   run's prefix is applied at once: the stores (``UPDATE_ENTRY``, with A/D kept for
   MMU_PT_UPDATE_PRESERVE_AD) one frame at a time, the type counts from a per-frame
   prefix sum of +1 (get) / -1 (put) events in request order (which also finds the
   puts that bring a count to zero and stamp ``tlbflush_timestamp``), the M2P
   stores, the statistics and the counters.
3. Everything else goes to the slow path's own function,
   :func:`refmodel.hv.pv.mmu_update.mmu_update_one`, one request at a time, in its
   place in the order: L2-L4 updates (which validate whole tables, recursively),
   stores into frames that are not L1 tables in use, a second write to an entry
   within a run, and a type change that would need a TLB flush
   (``flush_for_type_change``: the flush clock moves, and later stamps with it).
   An L2-L4 update that defers the put of its old target ends an invocation as
   in the slow path (``end_invocation``: the flush, then the put).
   After each such request the screening resumes on the state it left.

A run is screened over a window of requests: the whole list at first (up to
65536 requests); after a slow-path request 64, doubling while runs fill it — so a
list of L1 updates is one array pass, and a list of L2 updates costs little more
than the slow path. An array pass has a fixed cost of a few hundred microseconds:
below a few dozen requests the slow path is faster.
The state is read once per distinct frame (Python dict lookups in the frame table),
never once per request.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..account.events import Event
from ..arch.pte import Level, PteFlag
from ..arch.types import GFN, MFN, PAGE_SHIFT
from ..errors import RefmodelError
from ..hv.machine import DOMID_SELF, Domain
from ..hv.pv.abi import MMU_CMD_MASK, BatchResult, MmuCmd, MmuUpdate, domid_t
from ..hv.pv.errno import Errno, neg
from ..hv.pv.mmu_update import end_invocation, mmu_update_one
from ..hv.pv.pagetype import INVALID_MFN, FrameTable, PageType, PvStat, cache_flush_permitted
from ..hv.pv.adjust import GUEST_KERNEL
from ..hv.pv.pteflags import FASTPATH_FLAG_WHITELIST, PTE_ADDR_BITS, PTE_FLAG_BITS, l1_disallow_mask
from ..hv.pv.vcpu import PvVcpu, get_pg_owner, xsm_target_allowed
from .snapshot import LE_U64, WORDS_PER_FRAME

U64 = NDArray[np.uint64]
I64 = NDArray[np.int64]
Bools = NDArray[np.bool_]

MIN_WINDOW = 64
MAX_WINDOW = 1 << 16

_P = np.uint64(int(PteFlag.P))
_RW = np.uint64(int(PteFlag.RW))
_AD = np.uint64(int(PteFlag.A | PteFlag.D))
_ADDR = np.uint64(PTE_ADDR_BITS)
_US = np.uint64(int(PteFlag.US))
_G = np.uint64(int(PteFlag.G))
#: ``l1e_has_changed(old, new, ~FASTPATH_FLAG_WHITELIST)``: the bits that must not differ
_REVALIDATE = np.uint64(PTE_ADDR_BITS | (PTE_FLAG_BITS & ~FASTPATH_FLAG_WHITELIST))
_TYPES: tuple[PageType, ...] = tuple(PageType)
_T_WRITABLE = _TYPES.index(PageType.WRITABLE)
_T_L1 = _TYPES.index(PageType.L1)
_EINVAL, _EPERM, _EBUSY = neg(Errno.EINVAL), neg(Errno.EPERM), neg(Errno.EBUSY)


@dataclass(frozen=True)
class FastBatchResult:
    """``mmu_update``'s (rc, done), and how the requests that ran were decided:
    ``vectorized`` by an array pass (the failing request included, if it was one),
    ``sequential`` by the slow path's :func:`mmu_update_one`."""

    rc: int
    done: int
    vectorized: int
    sequential: int

    @property
    def batch(self) -> BatchResult:
        return BatchResult(self.rc, self.done)


def do_mmu_update_fast(
    v: PvVcpu, reqs: Sequence[MmuUpdate], count: int | None = None, foreigndom: int = DOMID_SELF
) -> BatchResult:
    """:func:`refmodel.hv.pv.mmu_update.do_mmu_update`, same arguments, same result."""
    ptr = np.fromiter((r.ptr for r in reqs), dtype=np.uint64, count=len(reqs))
    val = np.fromiter((r.val for r in reqs), dtype=np.uint64, count=len(reqs))
    return mmu_update_batch(v, ptr, val, count, foreigndom).batch


def mmu_update_batch(
    v: PvVcpu, ptrs: ArrayLike, vals: ArrayLike, count: int | None = None, foreigndom: int = DOMID_SELF
) -> FastBatchResult:
    """Run ``count`` requests (default: all) given as two uint64 arrays, ``ptr`` and
    ``val`` of ``struct mmu_update``, for vCPU ``v`` with data owner ``foreigndom``."""
    ptr, val = np.asarray(ptrs, dtype=np.uint64), np.asarray(vals, dtype=np.uint64)
    if ptr.ndim != 1 or ptr.shape != val.shape:
        raise RefmodelError(f"mmu_update batch: ptr and val must be equal-length vectors, got {ptr.shape} and {val.shape}")
    n = int(ptr.size)
    count = n if count is None else count
    if count < 0:
        raise RefmodelError(f"mmu_update count {count} is negative")
    if foreigndom >> 16:
        raise RefmodelError("a foreign page-table owner (foreigndom >> 16) is not modelled")
    pg_owner = get_pg_owner(v, domid_t(foreigndom))
    if pg_owner is None:
        return FastBatchResult(neg(Errno.ESRCH), 0, 0, 0)
    limit = min(count, n)
    static = static_screen(v, pg_owner, ptr[:limit])
    bad = np.flatnonzero(static)
    first_static = int(bad[0]) if bad.size else limit
    counters = v.machine.counters
    rc, done, vectorized, sequential, upper_changed = 0, 0, 0, 0, False
    i, window = 0, MAX_WINDOW
    while i < first_static:
        run = screen_run(v, pg_owner, ptr, val, i, min(first_static, i + window))
        apply_run(v, run)
        done += run.end - i
        vectorized += run.end - i
        if run.error:
            rc, vectorized = run.error, vectorized + 1
            break
        i = run.end
        if i == run.stop:
            window = min(2 * window, MAX_WINDOW)
            continue
        window = MIN_WINDOW  # request i is not for an array pass: the slow path's own step
        counters.add(Event.HYPERCALL_ENTRY)
        sequential += 1
        rc, level = mmu_update_one(v, MmuUpdate(int(ptr[i]), int(val[i])), pg_owner)
        if rc:
            break
        done += 1
        upper_changed |= level is not None and level is not Level.L1
        if v.old_guest_table is not None:  # a deferred put: the invocation ends here
            upper_changed = end_invocation(v, upper_changed)
        i += 1
    else:
        if first_static < limit:
            counters.add(Event.HYPERCALL_ENTRY)
            rc, vectorized = int(static[first_static]), vectorized + 1
        elif count > n:
            rc = neg(Errno.EFAULT)  # __copy_from_guest of a request past the array
    if upper_changed:
        v.frames.flush_domain(v.domain.domid)
    return FastBatchResult(rc, done, vectorized, sequential)


# -- 1. checks that no request can change ---------------------------------------------------------


def static_screen(v: PvVcpu, pg_owner: Domain, ptr: U64) -> NDArray[np.int64]:
    """Per request: the error it fails with whatever ran before it, or 0 —
    ``mmu_update_one``'s command dispatch (-ENOSYS), ``pt_update``'s and
    ``machphys_update``'s XSM check (-EPERM) and ownership checks (-EINVAL)."""
    cmd = ptr & np.uint64(MMU_CMD_MASK)
    is_pt = (cmd == MmuCmd.NORMAL_PT_UPDATE) | (cmd == MmuCmd.PT_UPDATE_PRESERVE_AD) | (cmd == MmuCmd.PT_UPDATE_NO_TRANSLATE)
    is_mp = cmd == MmuCmd.MACHPHYS_UPDATE
    rc = np.where(is_pt | is_mp, 0, neg(Errno.ENOSYS)).astype(np.int64)
    if not xsm_target_allowed(v.domain, pg_owner):
        rc[is_pt | is_mp] = _EPERM
        return rc
    owner = frame_owners(v, ptr >> np.uint64(PAGE_SHIFT))
    rc[is_pt & (owner != v.domain.domid)] = _EINVAL  # "Could not get page for normal update"
    rc[is_mp & (owner != pg_owner.domid)] = _EINVAL  # "... for mach->phys update"
    return rc


def frame_owners(v: PvVcpu, mfns: U64) -> I64:
    """The owner of each frame (``page_get_owner``), -1 for a free frame or one that
    does not exist; one lookup per distinct frame."""
    machine = v.machine
    uniq, inv = np.unique(mfns, return_inverse=True)
    owners = [
        machine.owner.get(MFN(m), -1) if machine.frame_exists(m) else -1 for m in (int(x) for x in uniq.tolist())
    ]
    return np.asarray(owners, dtype=np.int64)[inv]


# -- 2. an L1 run ---------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FrameStates:
    """The ``page_info`` type state of some frames, as arrays."""

    type: NDArray[np.intp]  #: index into ``tuple(PageType)``
    count: I64
    validated: Bools
    flush_on_type_change: Bools  #: ``flush_for_type_change`` would flush now

    @staticmethod
    def of(ft: FrameTable, frames: U64) -> "FrameStates":
        pages = [ft.pages.get(MFN(int(f))) for f in frames.tolist()]
        owners = [ft.machine.owner_of(int(f)) for f in frames.tolist()]
        return FrameStates(
            np.array([_TYPES.index(p.type) if p else 0 for p in pages], dtype=np.intp),
            np.array([p.count if p else 0 for p in pages], dtype=np.int64),
            np.array([p.validated if p else False for p in pages], dtype=np.bool_),
            np.array([bool(p and o is not None and ft.need_flush(o, p.tlbflush_timestamp)) for p, o in zip(pages, owners)],
                     dtype=np.bool_),
        )


@dataclass(frozen=True, eq=False)
class Run:
    """A screened window ``[start, stop)``: requests ``[start, end)`` succeed and are
    applied by :func:`apply_run`; then either ``error`` (request ``end`` fails with
    it, found by the screen) or, if ``end < stop``, request ``end`` needs the slow
    path."""

    start: int
    stop: int
    end: int
    error: int
    error_checked: bool  #: the failing request got as far as ``get_page_from_l1e``
    # the prefix, as arrays over requests start..end-1
    is_pt: Bools
    maddr: U64
    new_entry: U64  #: what ``UPDATE_ENTRY`` stores (A/D kept for PRESERVE_AD)
    fast_path: Bools
    checked: Bools  #: ``get_page_from_l1e`` ran (and succeeded)
    get_frames: U64  #: writable type references taken, in request order
    get_keys: I64
    put_frames: U64  #: writable type references dropped, in request order
    put_keys: I64
    m2p_mfns: U64
    m2p_gfns: U64


def screen_run(v: PvVcpu, pg_owner: Domain, ptr: U64, val: U64, start: int, stop: int) -> Run:
    """Screen requests ``[start, stop)`` (all past :func:`static_screen`) for an L1
    run (module docstring, point 2): where it ends, and whether it ends in an error."""
    ft, mem, machine = v.frames, v.machine.mem, v.machine
    p, new = ptr[start:stop], val[start:stop]
    n = int(p.size)
    is_pt = (p & np.uint64(MMU_CMD_MASK)) != MmuCmd.MACHPHYS_UPDATE
    maddr = p & ~np.uint64(MMU_CMD_MASK)
    table = maddr >> np.uint64(PAGE_SHIFT)
    slot = ((maddr >> np.uint64(3)) & np.uint64(WORDS_PER_FRAME - 1)).astype(np.intp)
    pt = np.flatnonzero(is_pt)

    # the tables: L1 in use? their entries before the run
    tables, t_of = np.unique(table[pt], return_inverse=True)
    t_state = FrameStates.of(ft, tables)
    l1_in_use = (t_state.type == _T_L1) & (t_state.count > 0) & t_state.validated
    rows = [np.frombuffer(mem.frame_bytes(int(f)), dtype=LE_U64) for f in tables.tolist()]
    words = np.stack(rows) if rows else np.zeros((0, WORDS_PER_FRAME), dtype=np.uint64)
    old = np.zeros(n, dtype=np.uint64)
    old[pt] = words[t_of, slot[pt]]
    l1 = np.zeros(n, dtype=np.bool_)
    l1[pt] = l1_in_use[t_of]
    repeat = np.zeros(n, dtype=np.bool_)
    _, first = np.unique(maddr[pt], return_index=True)
    repeat[pt] = True
    repeat[pt[first]] = False

    # mod_l1_entry: flags, the fast path, get_page_from_l1e (SDM-free: Xen's rules)
    present = l1 & ((new & _P) != 0)
    bad_flags = present & ((new & np.uint64(l1_disallow_mask(cache_flush_permitted(v.domain)))) != 0)
    new = np.where(present & ~bad_flags, adjust_guest_l1e_array(new), new)
    fast_path = present & ~bad_flags & ((old ^ new) & _REVALIDATE == 0)
    checked = present & ~bad_flags & ~fast_path
    target = (new & _ADDR) >> np.uint64(PAGE_SHIFT)
    exists = target < np.uint64(machine.nr_frames)
    owner = frame_owners(v, np.where(checked, target, np.uint64(0)))
    transfer = pg_owner is not v.domain and pg_owner.privileged  # a privileged data owner's grant
    owner_ok = (owner == pg_owner.domid) | (transfer & np.isin(owner, list(machine.domains)))
    mmio = checked & ~exists
    # I/O memory the data owner and the caller may map: rare, left to the slow path
    iomem_ok = np.zeros(n, dtype=np.bool_)
    if pg_owner.iomem_caps and v.domain.iomem_caps and mmio.any():
        iomem_ok[mmio] = [
            pg_owner.iomem_access_permitted(m, m) and v.domain.iomem_access_permitted(m, m)
            for m in (int(x) for x in target[mmio].tolist())
        ]
    mmio_refused = mmio & ~iomem_ok
    foreign = checked & exists & ~owner_ok
    wants_rw = checked & exists & owner_ok & ((new & _RW) != 0)
    got, x_of = np.unique(target[wants_rw], return_inverse=True)
    x_state = FrameStates.of(ft, got)
    x_busy = (x_state.count > 0) & (x_state.type != _T_WRITABLE)
    busy = np.zeros(n, dtype=np.bool_)
    busy[wants_rw] = x_busy[x_of]
    error = np.zeros(n, dtype=np.int64)
    error[bad_flags] = _EINVAL
    error[mmio_refused] = _EPERM
    error[mmio_refused & (target == np.uint64(INVALID_MFN))] = _EINVAL  # INVALID_MFN
    error[foreign | busy] = _EBUSY
    gets = wants_rw & ~busy
    # what the array pass leaves to the slow path
    slow = is_pt & ~l1
    slow |= iomem_ok
    slow |= repeat
    x_flush = x_state.flush_on_type_change & (x_state.count == 0) & (x_state.type != _T_WRITABLE)
    x_odd = (x_state.type == _T_WRITABLE) & (x_state.count > 0) & ~x_state.validated
    slow[wants_rw] |= (x_flush | x_odd)[x_of] & gets[wants_rw]
    # put_page_from_l1e(old) after a store that was not a fast-path one
    old_target = (old & _ADDR) >> np.uint64(PAGE_SHIFT)
    puts = l1 & (error == 0) & ~fast_path & ((old & (_P | _RW)) == (_P | _RW)) & (old_target < np.uint64(machine.nr_frames))
    put_state = FrameStates.of(ft, np.unique(old_target[puts]))
    put_fine = (put_state.type == _T_WRITABLE) & put_state.validated
    _, o_of = np.unique(old_target[puts], return_inverse=True)
    slow[puts] |= ~put_fine[o_of]

    stops = np.flatnonzero(slow | (error != 0))
    end = int(stops[0]) if stops.size else n
    err = int(error[end]) if end < n and not slow[end] else 0
    keep = np.arange(n) < end
    keys = np.arange(start, stop, dtype=np.int64)
    g, pu, mp = gets & keep, puts & keep, ~is_pt & keep
    stored = np.where(p & np.uint64(MMU_CMD_MASK) == MmuCmd.PT_UPDATE_PRESERVE_AD, new | (old & _AD), new)
    return Run(
        start=start, stop=stop, end=start + end, error=err, error_checked=bool(err and checked[end]),
        is_pt=is_pt[:end], maddr=maddr[:end], new_entry=stored[:end], fast_path=fast_path[:end], checked=checked[:end],
        get_frames=target[g], get_keys=2 * keys[g], put_frames=old_target[pu], put_keys=2 * keys[pu] + 1,
        m2p_mfns=table[mp], m2p_gfns=new[mp],
    )


def adjust_guest_l1e_array(entries: U64) -> U64:
    """:func:`refmodel.hv.pv.adjust.adjust_guest_l1e` on an array of present
    entries: U and ``_PAGE_GUEST_KERNEL`` where U is clear, then G and U where
    ``_PAGE_GUEST_KERNEL`` is clear."""
    kernel = (entries & _US) == 0
    entries = np.where(kernel, entries | np.uint64(GUEST_KERNEL) | _US, entries)
    user = (entries & np.uint64(GUEST_KERNEL)) == 0
    return np.where(user, entries | _G | _US, entries)


def apply_run(v: PvVcpu, run: Run) -> None:
    """Apply the successful prefix of a run (and the side effects of its failing
    request): stores, type references, M2P, statistics, counters."""
    ft, mem = v.frames, v.machine.mem
    # UPDATE_ENTRY: the stores, one frame at a time (no entry is written twice)
    maddr, stored = run.maddr[run.is_pt], run.new_entry[run.is_pt]
    frames, f_of = np.unique(maddr >> np.uint64(PAGE_SHIFT), return_inverse=True)
    for k, frame in enumerate(int(f) for f in frames.tolist()):
        words = np.frombuffer(mem.frame_bytes(frame), dtype=LE_U64).copy()
        mine = f_of == k
        words[((maddr[mine] >> np.uint64(3)) & np.uint64(WORDS_PER_FRAME - 1)).astype(np.intp)] = stored[mine]
        mem.load_frame(frame, words.astype(LE_U64, copy=False).tobytes())
    _apply_type_references(ft, run)
    v.machine.m2p.update(zip((MFN(int(m)) for m in run.m2p_mfns.tolist()), (GFN(int(g)) for g in run.m2p_gfns.tolist())))
    for stat, n in ((PvStat.FAST_PATH, int(run.fast_path.sum())),
                    (PvStat.L1E_CHECKED, int(run.checked.sum()) + (1 if run.error_checked else 0))):
        if n:
            ft.stats[stat] += n
    v.machine.counters.add(Event.HYPERCALL_ENTRY, run.end - run.start + (1 if run.error else 0))


def _apply_type_references(ft: FrameTable, run: Run) -> None:
    """``get_page_type(WRITABLE)`` / ``put_page_type`` for the run, in request order
    (get before put within a request), per frame: the count after every event is a
    prefix sum; a put that reaches zero stamps the frame with the flush clock (which
    no request of a run moves)."""
    frames = np.concatenate([run.get_frames, run.put_frames])
    if not frames.size:
        return
    keys = np.concatenate([run.get_keys, run.put_keys])
    delta = np.concatenate([np.ones(run.get_frames.size, np.int64), -np.ones(run.put_frames.size, np.int64)])
    order = np.lexsort((keys, frames))
    frames, delta = frames[order], delta[order]
    uniq, first, n_events = np.unique(frames, return_index=True, return_counts=True)
    before = FrameStates.of(ft, uniq).count
    running = np.cumsum(delta)
    offset = np.repeat(before - np.concatenate([[0], running[first[1:] - 1]]), n_events)
    after = running + offset  # the frame's count after each event
    if bool((after < 0).any()):
        raise AssertionError("mmu_update batch: a type reference dropped that was never taken")
    reaches_zero = np.zeros(uniq.size, dtype=np.bool_)
    np.logical_or.at(reaches_zero, np.repeat(np.arange(uniq.size), n_events), (after == 0) & (delta < 0))
    got_one = np.zeros(uniq.size, dtype=np.bool_)
    np.logical_or.at(got_one, np.repeat(np.arange(uniq.size), n_events), delta > 0)
    final = after[first + n_events - 1]
    for k, frame in enumerate(int(f) for f in uniq.tolist()):
        page = ft.info(frame)
        page.count = int(final[k])
        if got_one[k]:
            page.type, page.validated = PageType.WRITABLE, True
        if reaches_zero[k]:
            page.tlbflush_timestamp = ft.clock
