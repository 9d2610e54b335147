"""The two-dimensional page walk of nested paging (SDM Vol. 3C 29.3.2, "EPT
Translation Mechanism"; Bhargava, Serebrin, Spadini & Manne, "Accelerating
Two-Dimensional Page Walks for Virtualized Systems", ASPLOS 2008).

With EPT on, the guest's own 4-level walk runs unchanged — the *same*
:func:`refmodel.arch.walk.walk` as on bare metal — but every address it produces is
guest-physical: CR3 and each entry's frame field are GPAs. So each guest
paging-structure entry is reached through a full EPT walk first, and so is the final
guest-physical address. With an n-level guest and an m-level EPT and no
paging-structure caches that is n·m EPT reads for the guest entries, m for the final
address, and n guest reads: (n+1)(m+1) - 1 = 24 memory references for 4 and 4.

:class:`GuestPagingEntries` is the :class:`~refmodel.arch.walk.EntryMemory` that
makes this happen: it translates each entry address through EPT before reading it,
and checks EPT write permission before the guest walk sets an Accessed or Dirty flag
("writes by the logical processor to guest paging structures to update accessed and
dirty flags are considered to be data writes", 29.3.3.2). Guest A/D flags therefore
land in guest memory exactly where a bare-metal walk would put them.

A refused EPT access stops the instruction where it is: whatever A flags the guest
walk set before it stay set (the processor does not undo them) and the outcome is
the EPT violation or misconfiguration, a VM exit. Guest page faults are outcomes of
the guest walk alone and cause no exit: the guest receives them directly.
"""

from dataclasses import dataclass

from ...arch.access import Access, AccessKind
from ...arch.fault import PageFault
from ...arch.physmem import PhysicalMemory
from ...arch.pte import PageSize
from ...arch.types import GPA, PA, VA
from ...arch.walk import PagingContext, Translation, walk
from .ept import (
    EptAccess,
    EptCapabilities,
    EptMisconfiguration,
    Eptp,
    EptRights,
    EptTranslation,
    EptViolation,
    ept_walk,
    violation,
)

EptExitOutcome = EptViolation | EptMisconfiguration


class EptExit(Exception):
    """A VM exit caused by EPT, abandoning the guest instruction midway.

    The processor leaves the guest in the middle of a walk or an access; refmodel
    raises this where that happens and catches it where the hypervisor takes over
    (:func:`nested_walk` returns it as a value; :class:`~.backend.HapBackend`
    handles it). It never reaches a caller of refmodel.
    """

    def __init__(self, outcome: EptExitOutcome) -> None:
        super().__init__(outcome)
        self.outcome = outcome


@dataclass(frozen=True)
class CombinedTranslation(Translation):
    """A guest-linear address translated all the way to machine memory: ``pa`` is the
    machine address, ``size`` the smaller of the guest and EPT page sizes, ``rights``
    the guest's, ``ept`` the EPT permissions of the final guest-physical page (SDM
    29.4.2, "combined mappings"). ``leaf_addr`` and ``entry_addrs`` are GPAs."""

    gpa: GPA
    ept: EptRights


@dataclass(frozen=True)
class NestedWalkResult:
    """Outcome of one 2-D walk and the memory references it made."""

    outcome: CombinedTranslation | PageFault | EptViolation | EptMisconfiguration
    guest_refs: int  #: guest paging-structure entries read
    ept_refs: int  #: EPT entries read

    @property
    def refs(self) -> int:
        return self.guest_refs + self.ept_refs


class GuestPagingEntries:
    """Guest paging-structure entries as the guest walk sees them: at guest-physical
    addresses, each reached through EPT (the walk's :class:`EntryMemory`)."""

    def __init__(self, mem: PhysicalMemory, eptp: Eptp, va: int, caps: EptCapabilities) -> None:
        self.mem = mem
        self.eptp = eptp
        self.va = va
        self.caps = caps
        self.guest_refs = 0
        self.ept_refs = 0
        #: the EPT translation of each entry read, reused for its A/D update (the
        #: processor updates the entry it just read; it does not walk EPT again)
        self._read: dict[int, EptTranslation] = {}

    def translate(self, gpa: int, kind: AccessKind, final: bool) -> EptTranslation:
        """One EPT walk for an access of this guest walk; an exit stops the walk."""
        result = ept_walk(self.mem, self.eptp, gpa, EptAccess(kind, gla=self.va, final=final), self.caps)
        self.ept_refs += result.refs
        if not isinstance(result.outcome, EptTranslation):
            raise EptExit(result.outcome)
        return result.outcome

    def read_u64(self, pa: int) -> int:
        """SDM 29.3.3.2: "reads by the logical processor of guest paging structures to
        translate a linear address are considered to be data reads"."""
        host = self.translate(pa, AccessKind.READ, final=False)
        self._read[pa] = host
        self.guest_refs += 1
        return self.mem.read_u64(host.mpa)

    def write_u64(self, pa: int, value: int) -> None:
        """An A/D update: a data write for EPT, needing bit 1 in every EPT entry used."""
        host = self._read.get(pa)
        if host is None:
            host = self.translate(pa, AccessKind.WRITE, final=False)
        elif not host.rights.write:
            raise EptExit(violation(pa, EptAccess(AccessKind.WRITE, gla=self.va, final=False), host.rights))
        self.mem.write_u64(host.mpa, value)


def combine(guest: Translation, host: EptTranslation) -> CombinedTranslation:
    """The combined mapping of a guest translation and the EPT translation of its
    guest-physical address: the page is no larger than either (SDM 29.4.2)."""
    size = guest.size if guest.size.value <= host.size.value else host.size
    return CombinedTranslation(
        va=VA(guest.va),
        pa=PA(host.mpa),
        size=PageSize(size),
        rights=guest.rights,
        global_page=guest.global_page,
        dirty=guest.dirty,
        leaf_addr=guest.leaf_addr,
        entry_addrs=guest.entry_addrs,
        gpa=GPA(guest.pa),
        ept=host.rights,
    )


def nested_walk(
    mem: PhysicalMemory,
    eptp: Eptp,
    ctx: PagingContext,
    va: int,
    access: Access,
    caps: EptCapabilities = EptCapabilities(),
) -> NestedWalkResult:
    """Translate ``va`` for ``access`` with guest paging (``ctx``, CR3 a GPA) on top
    of EPT (``eptp``): the guest walk through :class:`GuestPagingEntries`, then the
    EPT walk of the final guest-physical address (SDM 29.3.2)."""
    entries = GuestPagingEntries(mem, eptp, va, caps)
    try:
        guest = walk(entries, ctx, va, access).outcome
        if isinstance(guest, PageFault):
            return NestedWalkResult(guest, entries.guest_refs, entries.ept_refs)
        host = entries.translate(guest.pa, access.kind, final=True)
    except EptExit as stop:
        return NestedWalkResult(stop.outcome, entries.guest_refs, entries.ept_refs)
    return NestedWalkResult(combine(guest, host), entries.guest_refs, entries.ept_refs)
