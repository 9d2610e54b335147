"""A numpy-backed TLB whose batch operations equal sequential
:class:`refmodel.arch.tlb.Tlb` use.

State: one row per set, one column per way, struct-of-arrays (tag, VPN, size,
frame, rights, G, D) plus an LRU *stamp*: a set's list in :class:`Tlb`, least
recently used first, is its valid ways in increasing stamp order. Every touch (a
hit, a fill) gives the entry a stamp above all earlier ones, so list order and
stamp order agree by construction.

What a batch can and cannot do in one step:

* :meth:`BatchTlb.lookup_batch` (N lookups in a row). A lookup never changes
  which entries a set holds, only their LRU order, so which entries *match* each
  lookup is fixed by the state before the batch and is computed for all N at once.
  The order matters only when several entries match one lookup at the first page
  size that has a match (possible: a global entry of another PCID next to one of
  the current PCID, SDM 4.10.2.4): ``Tlb.lookup`` returns the least recently used
  of them, which depends on the hits before it. Those (rare) lookups are resolved
  one by one, in order, from the "last hit before i" of each candidate; the final
  LRU order is then "stamp of the last hit", set for all entries at once.
* :meth:`BatchTlb.fill_batch` (N fills in a row). A fill removes the entry with
  the same (VPID, PCID, VPN, size), evicts the least recently used way of a full
  set and appends. Induction on the fills shows that a set's list is then always
  the ``ways`` most recent *distinct* keys of "the list before the batch, followed
  by the batch's fills", ordered by last occurrence, each with the value of its
  last fill. That is a sort and a group-by: fully vectorized.
* An *interleaved* stream (lookup, miss, walk, fill, lookup, ... as
  :meth:`refmodel.arch.mmu.Mmu.translate` does) is inherently sequential: whether
  lookup i hits depends on whether fill j < i evicted that line, and fill j
  happens only if lookup j missed. Within one set nothing can be batched; across
  sets the stream splits, but with a 16-set TLB that gains little. Callers batch
  homogeneous runs (the page walks themselves, which :mod:`refmodel.fast.translate`
  shows are order-free, can be done for the whole stream up front).

Invalidations are not batched: convert with :meth:`BatchTlb.to_tlb`, invalidate,
and convert back with :meth:`BatchTlb.from_tlb` (both exact).
"""

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..account.events import Counters
from ..arch.access import AccessKind
from ..arch.pte import PageSize
from ..arch.tlb import Tlb, TlbEntry
from ..arch.walk import PagingContext, Rights
from ..errors import RefmodelError
from .translate import KIND_CODES, BatchResult, Bools, U8, U64, denial_codes

I64 = NDArray[np.int64]
_SHIFTS = tuple(s.shift for s in PageSize)  # 12, 21, 30: the order Tlb.lookup tries


@dataclass(frozen=True, eq=False)
class TlbFills:
    """N translations to cache, in order (the fields of :class:`TlbEntry`)."""

    vpid: I64
    pcid: I64
    vpn: U64
    shift: U8  #: page-size shift: 12, 21 or 30
    frame: U64  #: physical base address of the page
    writable: Bools
    user: Bools
    execute_disable: Bools
    global_page: Bools
    dirty: Bools

    def __len__(self) -> int:
        return int(self.vpn.size)

    @staticmethod
    def from_entries(entries: list[TlbEntry]) -> "TlbFills":
        return TlbFills(
            vpid=np.array([e.vpid for e in entries], dtype=np.int64),
            pcid=np.array([e.pcid for e in entries], dtype=np.int64),
            vpn=np.array([e.vpn for e in entries], dtype=np.uint64),
            shift=np.array([e.size.shift for e in entries], dtype=np.uint8),
            frame=np.array([e.frame for e in entries], dtype=np.uint64),
            writable=np.array([e.rights.writable for e in entries], dtype=np.bool_),
            user=np.array([e.rights.user for e in entries], dtype=np.bool_),
            execute_disable=np.array([e.rights.execute_disable for e in entries], dtype=np.bool_),
            global_page=np.array([e.global_page for e in entries], dtype=np.bool_),
            dirty=np.array([e.dirty for e in entries], dtype=np.bool_),
        )

    @staticmethod
    def from_translations(result: BatchResult, vpid: int, pcid: int, select: Bools | None = None) -> "TlbFills":
        """What :func:`refmodel.arch.mmu.entry_from_translation` caches, for each
        successful translation of ``result`` (optionally only where ``select``)."""
        take = result.ok if select is None else result.ok & select
        idx = np.flatnonzero(take)
        size = result.size[idx]
        shift = np.zeros(idx.size, dtype=np.uint8)
        for s in _SHIFTS:
            shift[size == np.uint64(1 << s)] = s
        return TlbFills(
            vpid=np.full(idx.size, vpid, dtype=np.int64),
            pcid=np.full(idx.size, pcid, dtype=np.int64),
            vpn=result.va[idx] >> shift.astype(np.uint64),
            shift=shift,
            frame=result.pa[idx] & ~(size - np.uint64(1)),
            writable=result.writable[idx],
            user=result.user[idx],
            execute_disable=result.execute_disable[idx],
            global_page=result.global_page[idx],
            dirty=result.dirty[idx],
        )

    def entry(self, i: int) -> TlbEntry:
        return TlbEntry(
            vpid=int(self.vpid[i]), pcid=int(self.pcid[i]), vpn=int(self.vpn[i]),
            size=PageSize(1 << int(self.shift[i])), frame=int(self.frame[i]),
            rights=Rights(bool(self.writable[i]), bool(self.user[i]), bool(self.execute_disable[i])),
            global_page=bool(self.global_page[i]), dirty=bool(self.dirty[i]),
        )


@dataclass(frozen=True, eq=False)
class TlbLookups:
    """Outcome of N lookups: ``hit``, and for hits the entry found (``entries``
    holds a copy of each hit entry's fields; misses hold zeros) and the address."""

    va: U64
    hit: Bools
    slot: I64  #: set * ways + way of the entry found, -1 for a miss
    entries: TlbFills
    pa: U64

    def entry(self, i: int) -> TlbEntry | None:
        return self.entries.entry(i) if bool(self.hit[i]) else None

    def usable(self, ctx: PagingContext, kind: AccessKind | ArrayLike, cpl: ArrayLike = 0, implicit: ArrayLike = False) -> Bools:
        """:func:`refmodel.arch.mmu.usable`, vectorized: a hit whose cached rights
        allow the access and, for a write, whose page was cached dirty."""
        n = int(self.va.size)
        k = np.broadcast_to(np.asarray(KIND_CODES[kind] if isinstance(kind, AccessKind) else kind, dtype=np.uint8), (n,))
        user_mode = (np.broadcast_to(np.asarray(cpl), (n,)) == 3) & ~np.broadcast_to(np.asarray(implicit, dtype=np.bool_), (n,))
        e = self.entries
        denied = denial_codes(
            ctx, e.writable, e.user, e.execute_disable, k, user_mode,
            np.broadcast_to(np.asarray(implicit, dtype=np.bool_), (n,)),
        )
        needs_d = (k == KIND_CODES[AccessKind.WRITE]) & ~e.dirty
        return np.asarray(self.hit & (denied == 0) & ~needs_d, dtype=np.bool_)


class BatchTlb:
    """Set-associative, LRU, PCID- and VPID-tagged TLB in numpy arrays, with the
    same geometry and policy as :class:`refmodel.arch.tlb.Tlb`."""

    def __init__(self, capacity: int = 64, ways: int = 4) -> None:
        if capacity <= 0 or ways <= 0 or capacity % ways:
            raise RefmodelError(f"TLB capacity {capacity} must be a positive multiple of ways {ways}")
        self.capacity = capacity
        self.ways = ways
        self.nsets = capacity // ways
        shape = (self.nsets, ways)
        self.valid = np.zeros(shape, dtype=np.bool_)
        self.vpid = np.zeros(shape, dtype=np.int64)
        self.pcid = np.zeros(shape, dtype=np.int64)
        self.vpn = np.zeros(shape, dtype=np.uint64)
        self.shift = np.zeros(shape, dtype=np.uint8)
        self.frame = np.zeros(shape, dtype=np.uint64)
        self.writable = np.zeros(shape, dtype=np.bool_)
        self.user = np.zeros(shape, dtype=np.bool_)
        self.execute_disable = np.zeros(shape, dtype=np.bool_)
        self.global_page = np.zeros(shape, dtype=np.bool_)
        self.dirty = np.zeros(shape, dtype=np.bool_)
        #: LRU age: larger is more recent; only the order within a set matters
        self.stamp = np.zeros(shape, dtype=np.int64)
        self.clock = 0

    # -- conversion ------------------------------------------------------------------
    @classmethod
    def from_tlb(cls, tlb: Tlb) -> "BatchTlb":
        out = cls(tlb.capacity, tlb.ways)
        out.fill_batch(TlbFills.from_entries(tlb.entries()))  # per set: LRU order kept, no eviction
        return out

    def entries(self) -> list[TlbEntry]:
        """Every valid entry, set by set, least recently used first: the order of
        :meth:`Tlb.entries`."""
        out: list[TlbEntry] = []
        fields = self._fields(np.arange(self.capacity, dtype=np.int64))
        for s in range(self.nsets):
            ways = [w for w in range(self.ways) if self.valid[s, w]]
            for w in sorted(ways, key=lambda w: int(self.stamp[s, w])):
                out.append(fields.entry(s * self.ways + w))
        return out

    def to_tlb(self, counters: Counters | None = None) -> Tlb:
        """The same contents, in the same LRU order, as a slow :class:`Tlb`."""
        out = Tlb(self.capacity, self.ways, counters=counters)
        for e in self.entries():  # set by set, LRU first: appends, never evicts
            out.fill(e)
        return out

    def _fields(self, slots: I64) -> TlbFills:
        flat = slots.clip(0)
        return TlbFills(
            vpid=self.vpid.reshape(-1)[flat], pcid=self.pcid.reshape(-1)[flat],
            vpn=self.vpn.reshape(-1)[flat], shift=self.shift.reshape(-1)[flat],
            frame=self.frame.reshape(-1)[flat], writable=self.writable.reshape(-1)[flat],
            user=self.user.reshape(-1)[flat], execute_disable=self.execute_disable.reshape(-1)[flat],
            global_page=self.global_page.reshape(-1)[flat], dirty=self.dirty.reshape(-1)[flat],
        )

    # -- lookup ----------------------------------------------------------------------
    def lookup_batch(self, vas: ArrayLike, vpid: int, pcid: int) -> TlbLookups:
        """N sequential :meth:`Tlb.lookup` calls with one tag, including their LRU
        refreshes."""
        va = np.asarray(vas, dtype=np.uint64)
        n = int(va.size)
        ways = self.ways
        found = np.zeros(n, dtype=np.bool_)
        slot = np.full(n, -1, dtype=np.int64)
        ambiguous: dict[int, list[int]] = {}
        for shift in _SHIFTS:
            vpn = va >> np.uint64(shift)
            s = (vpn % np.uint64(self.nsets)).astype(np.intp)
            match = (
                self.valid[s] & (self.shift[s] == shift) & (self.vpid[s] == vpid)
                & ((self.pcid[s] == pcid) | self.global_page[s]) & (self.vpn[s] == vpn[:, None])
            )
            count = match.sum(axis=1)
            new = ~found & (count > 0)
            single = new & (count == 1)
            way = match.argmax(axis=1)
            slot = np.where(single, s.astype(np.int64) * ways + way, slot)
            for i in np.flatnonzero(new & (count > 1)).tolist():
                ambiguous[i] = [int(s[i]) * ways + int(w) for w in np.flatnonzero(match[i]).tolist()]
            found |= new
        if ambiguous:
            self._resolve(slot, ambiguous)
        # LRU refresh: each entry hit moves to "most recent" as of its last hit
        hit = slot >= 0
        hits = np.flatnonzero(hit)
        if hits.size:
            last = np.full(self.capacity, -1, dtype=np.int64)
            np.maximum.at(last, slot[hits], hits.astype(np.int64))
            touched = last >= 0
            self.stamp.reshape(-1)[touched] = self.clock + 1 + last[touched]
        self.clock += n
        fields = self._fields(slot)
        size = np.uint64(1) << fields.shift.astype(np.uint64)
        pa = np.where(hit, fields.frame | (va & (size - np.uint64(1))), np.uint64(0)).astype(np.uint64)
        return TlbLookups(va=va, hit=hit, slot=slot, entries=fields, pa=pa)

    def _resolve(self, slot: I64, ambiguous: dict[int, list[int]]) -> None:
        """Pick, for each lookup with several matching entries, the one least
        recently used *at that point*: an entry's age at lookup i is the time of its
        last hit before i, or its stamp before the batch. In place on ``slot``."""
        n = slot.size
        known = np.flatnonzero(slot >= 0)  # unambiguous hits, in order
        keys = np.sort(slot[known] * (n + 1) + known)
        resolved_last: dict[int, int] = {}  # slot -> last resolved ambiguous hit index
        stamp0 = self.stamp.reshape(-1)
        for i in sorted(ambiguous):
            best, best_age = -1, 0
            for c in ambiguous[i]:
                p = int(np.searchsorted(keys, c * (n + 1) + i))
                last = -1
                if p > 0 and int(keys[p - 1]) // (n + 1) == c:
                    last = int(keys[p - 1]) % (n + 1)
                last = max(last, resolved_last.get(c, -1))
                age = self.clock + 1 + last if last >= 0 else int(stamp0[c])
                if best < 0 or age < best_age:
                    best, best_age = c, age
            slot[i] = best
            resolved_last[best] = i

    # -- fill ------------------------------------------------------------------------
    def fill_batch(self, fills: TlbFills) -> None:
        """N sequential :meth:`Tlb.fill` calls."""
        n = len(fills)
        if not n:
            return
        old = np.flatnonzero(self.valid.reshape(-1))
        cur = self._fields(old.astype(np.int64))

        def cat(a: NDArray[np.generic], b: NDArray[np.generic]) -> NDArray[np.generic]:
            return np.concatenate([a, b])

        vpid = cat(cur.vpid, fills.vpid.astype(np.int64))
        pcid = cat(cur.pcid, fills.pcid.astype(np.int64))
        vpn = cat(cur.vpn, fills.vpn.astype(np.uint64))
        shift = cat(cur.shift, fills.shift.astype(np.uint8))
        stamp = np.concatenate([self.stamp.reshape(-1)[old], self.clock + 1 + np.arange(n, dtype=np.int64)])
        sets = (np.asarray(vpn, dtype=np.uint64) % np.uint64(self.nsets)).astype(np.int64)
        # keep the last occurrence of each (set, vpid, pcid, vpn, size)
        order = np.lexsort((stamp, shift, vpn, pcid, vpid, sets))
        keys = (sets[order], vpid[order], pcid[order], vpn[order], shift[order])
        last_of_key = np.ones(order.size, dtype=np.bool_)
        if order.size > 1:
            differs = np.zeros(order.size - 1, dtype=np.bool_)
            for key in keys:
                differs |= key[1:] != key[:-1]
            last_of_key[:-1] = differs
        keep = order[last_of_key]
        # per set, the `ways` most recent survivors
        order2 = keep[np.lexsort((-stamp[keep], sets[keep]))]
        set2 = sets[order2]
        start = np.searchsorted(set2, set2, side="left")
        rank = np.arange(order2.size) - start
        chosen = order2[rank < self.ways]
        way = rank[rank < self.ways]
        cs = sets[chosen]

        def pick(a: NDArray[np.generic], b: NDArray[np.generic]) -> NDArray[np.generic]:
            return np.concatenate([a, b])[chosen]

        self.valid[:] = False
        self.valid[cs, way] = True
        self.vpid[cs, way] = vpid[chosen]
        self.pcid[cs, way] = pcid[chosen]
        self.vpn[cs, way] = vpn[chosen]
        self.shift[cs, way] = shift[chosen]
        self.frame[cs, way] = pick(cur.frame, fills.frame)
        self.writable[cs, way] = pick(cur.writable, fills.writable)
        self.user[cs, way] = pick(cur.user, fills.user)
        self.execute_disable[cs, way] = pick(cur.execute_disable, fills.execute_disable)
        self.global_page[cs, way] = pick(cur.global_page, fills.global_page)
        self.dirty[cs, way] = pick(cur.dirty, fills.dirty)
        self.stamp[cs, way] = stamp[chosen]
        self.clock += n
