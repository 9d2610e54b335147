"""The processor with EPT on: :class:`refmodel.arch.mmu.Mmu` with the 2-D walk on a
TLB miss and combined translations in the TLB (SDM Vol. 3C 29.4, "Caching
Translation Information").

Everything else is the bare-metal MMU, unchanged: the TLB-hit rules, #PF delivery
(CR2, invalidation of the faulting page), MOV to CR3, INVLPG and INVPCID — which,
with EPT and VPIDs, run in the guest without exits and act on the entries tagged
with the current VPID (29.4.3: they invalidate "combined mappings" for the VPID).

A combined TLB entry caches GVA -> MPA with the guest's rights *and* the EPT
permissions of the page (29.4.2): a hit is used only if both allow the access, so a
page the hypervisor made read-only in EPT can never be written through a cached
entry that was filled while it was writable — once INVEPT has dropped that entry.
"""

from dataclasses import dataclass

from ...account.events import Event
from ...arch.access import Access
from ...arch.fault import PageFault
from ...arch.mmu import Mmu, entry_from_translation, usable
from ...arch.tlb import TlbEntry
from ...arch.types import VPID
from ...arch.vcpu import ArchState
from ...arch.walk import PagingContext, Translation
from ..machine import Machine
from .ept import EptCapabilities, EptRights
from .nested import CombinedTranslation, EptExit, nested_walk
from .tables import Ept


@dataclass(frozen=True)
class CombinedTlbEntry(TlbEntry):
    """A TLB entry for a combined mapping: the guest's translation to machine memory,
    the guest's rights, and the EPT permissions of the page (SDM 29.4.2)."""

    ept: EptRights


class HapMmu(Mmu):
    """A logical processor running a guest with EPT and (if ``vpid`` != 0) VPIDs."""

    def __init__(self, machine: Machine, ept: Ept, vpid: VPID, caps: EptCapabilities) -> None:
        super().__init__(machine.mem, ArchState(), machine.tlb, machine.counters, vpid)
        self.ept = ept
        self.caps = caps

    def hit_usable(self, entry: TlbEntry, access: Access, ctx: PagingContext) -> bool:
        """A hit serves the access only if the guest's rules (:func:`usable`) and the
        cached EPT permissions both allow it; otherwise the processor walks again."""
        return isinstance(entry, CombinedTlbEntry) and usable(entry, access, ctx) and entry.ept.allows(access.kind)

    def walk_on_miss(self, ctx: PagingContext, va: int, access: Access) -> Translation | PageFault:
        """The 2-D walk, counted: guest entry reads as WALK_REF, EPT entry reads as
        EPT_WALK_REF. An EPT violation or misconfiguration leaves the guest (raises
        :class:`EptExit` for the hypervisor); a guest #PF is returned, no exit."""
        result = nested_walk(self.mem, self.ept.eptp, ctx, va, access, self.caps)
        self.counters.add(Event.WALK_REF, result.guest_refs)
        self.counters.add(Event.EPT_WALK_REF, result.ept_refs)
        if not isinstance(result.outcome, (CombinedTranslation, PageFault)):
            raise EptExit(result.outcome)
        return result.outcome

    def tlb_entry(self, translation: Translation, pcid: int) -> TlbEntry:
        if not isinstance(translation, CombinedTranslation):
            raise AssertionError("a HAP walk produces combined translations only")
        e = entry_from_translation(translation, self.vpid, pcid)
        return CombinedTlbEntry(
            vpid=e.vpid, pcid=e.pcid, vpn=e.vpn, size=e.size, frame=e.frame,
            rights=e.rights, global_page=e.global_page, dirty=e.dirty, ept=translation.ept,
        )
