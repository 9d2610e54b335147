"""The translation lookaside buffer (SDM Vol. 3A 4.10).

Entries cache the leaf translation, its page size and the access rights combined
over all levels (4.10.2.2), tagged by PCID (4.10.1) and VPID (Vol. 3C 28.1). A hit
uses the cached translation even if the entries in memory have changed since: it is
stale until invalidated, as hardware may be (4.10.4.3). The model's TLB is a
set-associative array with a deterministic least-recently-used policy; the
architecture allows any policy, so an implementation checked against refmodel must
be judged by what it *may* cache, not by this policy (see :mod:`refmodel.oracle`).

Invalidation (4.10.4.1): MOV to CR3 (non-global entries of one PCID), INVLPG (one
page, global entries included), INVPCID types 0-3, MOV to CR4 that changes PGE or
clears PCIDE (everything), and a page fault (the faulting page, current PCID).
"""

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..account.events import Counters, Event
from ..errors import RefmodelError
from .pte import PageSize
from .walk import Rights


@dataclass(frozen=True)
class TlbEntry:
    """One cached translation."""

    vpid: int
    pcid: int
    vpn: int  #: linear address >> size.shift
    size: PageSize
    frame: int  #: physical base address of the page
    rights: Rights
    global_page: bool
    dirty: bool  #: the leaf's D flag when cached; a write through a clean entry re-walks

    def matches(self, va: int, vpid: int, pcid: int) -> bool:
        """SDM 4.10.2.4: a global entry may be used whatever the current PCID."""
        return (
            self.vpid == vpid
            and (self.pcid == pcid or self.global_page)
            and self.vpn == va >> self.size.shift
        )

    def translate(self, va: int) -> int:
        return self.frame | (va & (self.size.value - 1))


class InvpcidType(enum.IntEnum):
    """INVPCID types (SDM Vol. 2A, INVPCID)."""

    INDIVIDUAL_ADDRESS = 0  #: one page of one PCID, global entries kept
    SINGLE_CONTEXT = 1  #: every non-global entry of one PCID
    ALL_CONTEXT_INCLUDING_GLOBAL = 2  #: every entry
    ALL_CONTEXT = 3  #: every non-global entry


class Tlb:
    """A set-associative, LRU, PCID- and VPID-tagged TLB."""

    def __init__(self, capacity: int = 64, ways: int = 4, counters: Counters | None = None) -> None:
        if capacity <= 0 or ways <= 0 or capacity % ways:
            raise RefmodelError(f"TLB capacity {capacity} must be a positive multiple of ways {ways}")
        self.capacity = capacity
        self.ways = ways
        self.nsets = capacity // ways
        self.counters = counters if counters is not None else Counters()
        #: each set lists its entries, least recently used first
        self._sets: list[list[TlbEntry]] = [[] for _ in range(self.nsets)]

    def _set_of(self, vpn: int) -> list[TlbEntry]:
        return self._sets[vpn % self.nsets]

    def entries(self) -> list[TlbEntry]:
        """Every valid entry (for invariants and tests)."""
        return [e for s in self._sets for e in s]

    # -- lookup and fill ---------------------------------------------------------
    def lookup(self, va: int, vpid: int, pcid: int) -> TlbEntry | None:
        """The entry that translates ``va`` for this tag, refreshing its LRU age."""
        for size in PageSize:
            ways = self._set_of(va >> size.shift)
            for i, e in enumerate(ways):
                if e.size is size and e.matches(va, vpid, pcid):
                    ways.append(ways.pop(i))
                    return e
        return None

    def fill(self, entry: TlbEntry) -> None:
        """Cache a translation, replacing any entry for the same page and tag and
        evicting the least recently used way of a full set."""
        ways = self._set_of(entry.vpn)
        ways[:] = [
            e
            for e in ways
            if not (e.vpid == entry.vpid and e.pcid == entry.pcid and e.vpn == entry.vpn and e.size is entry.size)
        ]
        if len(ways) >= self.ways:
            ways.pop(0)
        ways.append(entry)

    # -- invalidation --------------------------------------------------------------
    def _drop(self, doomed: Callable[[TlbEntry], bool], sets: Iterable[int] | None = None) -> int:
        """Remove the entries ``doomed`` selects, looking only in ``sets`` if given."""
        n = 0
        for ways in self._sets if sets is None else (self._sets[i] for i in sets):
            keep = [e for e in ways if not doomed(e)]
            n += len(ways) - len(keep)
            ways[:] = keep
        return n

    def invalidate_page(
        self, va: int, vpid: int, pcid: int, include_global: bool = True, counted: bool = True
    ) -> int:
        """INVLPG (SDM 4.10.4.1): entries for the page containing ``va`` of the
        current PCID, and global entries for that page whatever their PCID.
        ``counted=False`` for the invalidation a #PF does as part of the fault, which
        is not a flush anyone asked for."""
        if counted:
            self.counters.add(Event.TLB_FLUSH_SINGLE)
        # an entry for this page lives in the set its page number selects, per size
        sets = {(va >> size.shift) % self.nsets for size in PageSize}
        return self._drop(
            lambda e: e.vpid == vpid
            and e.vpn == va >> e.size.shift
            and (e.pcid == pcid or (include_global and e.global_page))
            and (include_global or not e.global_page),
            sets,
        )

    def invalidate_pcid(self, vpid: int, pcid: int) -> int:
        """MOV to CR3 / INVPCID type 1: non-global entries of one PCID."""
        self.counters.add(Event.TLB_FLUSH_PCID)
        return self._drop(lambda e: e.vpid == vpid and e.pcid == pcid and not e.global_page)

    def invalidate_nonglobal(self, vpid: int) -> int:
        """INVPCID type 3: non-global entries of every PCID."""
        self.counters.add(Event.TLB_FLUSH_FULL)
        return self._drop(lambda e: e.vpid == vpid and not e.global_page)

    def invalidate_all(self, vpid: int) -> int:
        """INVPCID type 2, CR4.PGE toggle, CR4.PCIDE 1->0: every entry of the VPID."""
        self.counters.add(Event.TLB_FLUSH_GLOBAL)
        return self._drop(lambda e: e.vpid == vpid)

    def invalidate_vpid(self, vpid: int) -> int:
        """INVVPID single-context (Vol. 3C 28.3.3.3): every entry of one VPID."""
        self.counters.add(Event.TLB_FLUSH_VPID)
        return self._drop(lambda e: e.vpid == vpid)

    def flush_everything(self) -> int:
        """Every entry of every tag (a VM switch without VPIDs, a hypervisor flush)."""
        self.counters.add(Event.TLB_FLUSH_GLOBAL)
        return self._drop(lambda e: True)

    def invpcid(self, kind: InvpcidType, vpid: int, pcid: int, va: int) -> int:
        """INVPCID (SDM Vol. 2A): dispatch on the type."""
        if kind is InvpcidType.INDIVIDUAL_ADDRESS:
            return self.invalidate_page(va, vpid, pcid, include_global=False)
        if kind is InvpcidType.SINGLE_CONTEXT:
            return self.invalidate_pcid(vpid, pcid)
        if kind is InvpcidType.ALL_CONTEXT_INCLUDING_GLOBAL:
            return self.invalidate_all(vpid)
        return self.invalidate_nonglobal(vpid)

