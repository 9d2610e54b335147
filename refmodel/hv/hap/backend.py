"""HAP: a fully virtualized guest on nested paging (Intel EPT) with VPID-tagged TLBs
— Xen's HVM guest with ``hap=1`` (xen/arch/x86/mm/hap/hap.c, p2m-ept.c).

The guest's page tables hold its own frame numbers (GFNs) and are the tables the
processor walks; EPT, built by Xen from the domain's P2M, translates every
guest-physical address the walk produces. So nothing the guest does to its page
tables concerns the hypervisor:

- a page-table write is a plain store into guest memory: no trap, no emulation;
- MOV to CR3, INVLPG and a full flush run in the guest (Xen sets neither "CR3-load
  exiting" nor "INVLPG exiting" with HAP: ``vmx_update_guest_cr`` and
  ``construct_vmcs`` in xen/arch/x86/hvm/vmx/) and act only on this VPID's entries;
- a guest #PF is delivered to the guest by the processor, without a VM exit.

The cost moves into TLB misses: each one is a 2-D walk of up to 24 memory
references (:mod:`.nested`) — fewer when EPT maps guest memory with 2 MiB or 1 GiB
pages, which the backend does where the domain's P2M is contiguous and aligned
(``large_pages``, the default: Xen's ``hap_2mb`` / ``hap_1gb``): 19 for a 4 KiB
guest page on 2 MiB EPT pages. The only VM exits are EPT violations (and
misconfigurations), which a domain whose EPT mirrors its P2M never causes unless the
hypervisor has narrowed an entry (:meth:`HapBackend.ept_set_rights`: log-dirty
tracking) or removed it.

With ``tagged=False`` the processor has no VPIDs: every guest translation is cached
under VPID 0000H (SDM Vol. 3C 29.1: "if VPIDs are not enabled, the current VPID is
0000H"), shared with the host and every other guest, so each VM exit and VM entry
flushes the whole TLB; the model flushes once per exit-and-entry round trip and
counts it. (A scheduler switching vCPUs flushes too: :mod:`refmodel.hv.sched`.)
"""

from ...account.events import Counters, Event, ExitReason
from ...arch.access import AccessKind
from ...arch.fault import PageFault
from ...arch.pte import Level, PageSize
from ...arch.types import ENTRY_SIZE, GFN, MFN, MPA, PAGE_SHIFT, PAGE_SIZE, VPID
from ...arch.vcpu import ArchState
from ...errors import RefmodelError
from ...guest.ops import MmuBackend, Mode
from ..machine import Domain, Machine
from ..native import hardware_access
from .ept import (
    RWX,
    EptAccess,
    EptCapabilities,
    EptFlag,
    EptMisconfiguration,
    EptTranslation,
    EptViolation,
    ept_walk,
    is_present,
    make_leaf,
    misconfiguration,
)
from .mmu import HapMmu
from .nested import EptExit, EptExitOutcome
from .tables import Ept

#: VM exits one guest access may take before it must have made progress: one per
#: guest paging-structure entry, one for the final page, with room to spare.
MAX_EXITS_PER_ACCESS = 16


def largest_ept_page(caps: EptCapabilities) -> PageSize:
    """The largest EPT page the processor supports (IA32_VMX_EPT_VPID_CAP bits 16, 17;
    Xen's ``hap_has_1gb`` / ``hap_has_2mb``)."""
    if caps.page_1g:
        return PageSize.SIZE_1G
    return PageSize.SIZE_2M if caps.page_2m else PageSize.SIZE_4K


class HapBackend(MmuBackend):
    """A guest on EPT: its page tables are the hardware's, EPT does the rest."""

    mode = Mode.HAP

    def __init__(
        self,
        machine: Machine,
        domain: Domain,
        *,
        tagged: bool = True,
        caps: EptCapabilities = EptCapabilities(),
        large_pages: bool = True,
    ) -> None:
        if machine.domains.get(domain.domid) is not domain:
            raise RefmodelError(f"domain {domain.domid} does not belong to this machine")
        self.machine = machine
        self.domain = domain
        self.tagged = tagged
        self.caps = caps
        self.counters: Counters = machine.counters
        #: SDM Vol. 3C 29.1: VPID 0000H is the host's and is what every guest uses
        #: when VPIDs are off; a tagged guest gets its own.
        self.vpid = VPID(domain.domid + 1) if tagged else VPID(0)
        #: EPT maps guest memory with the largest pages the P2M and the processor
        #: allow (Xen's default, ``hap_1gb`` / ``hap_2mb``), or 4 KiB pages only
        self.large_pages = large_pages
        self.ept = Ept.from_p2m(machine, domain, largest_ept_page(caps) if large_pages else PageSize.SIZE_4K)
        self.mmu = HapMmu(machine, self.ept, self.vpid, caps)
        #: GFNs written while their EPT entry denied writes (Xen ``paging_mark_dirty``)
        self.dirty_log: set[GFN] = set()
        #: every EPT exit this vCPU took, in order
        self.exits: list[EptExitOutcome] = []

    # -- the guest-visible vCPU state ---------------------------------------------------
    @property
    def guest_state(self) -> ArchState:
        """The guest's own CR0/CR2/CR3/CR4/EFER: with HAP the processor runs on them."""
        return self.mmu.state

    @guest_state.setter
    def guest_state(self, state: ArchState) -> None:
        self.mmu.state = state

    # -- the guest's physical memory ----------------------------------------------------
    def _mpa(self, gfn: GFN, offset: int, kind: AccessKind) -> MPA:
        """Where the guest's access to ``gfn`` + ``offset`` lands: through EPT, taking
        (and handling) an EPT violation if the entry refuses it. The kernel's direct
        map is not modelled, so these EPT reads are not counted."""
        if not 0 <= offset < PAGE_SIZE:
            raise RefmodelError(f"offset {offset:#x} is outside a 4 KiB frame")
        for _ in range(MAX_EXITS_PER_ACCESS):
            result = ept_walk(self.machine.mem, self.ept.eptp, (gfn << PAGE_SHIFT) + offset, EptAccess(kind), self.caps)
            if isinstance(result.outcome, EptTranslation):
                return result.outcome.mpa
            self.vm_exit(result.outcome)
        raise RefmodelError(f"gfn {gfn:#x}: EPT still refuses the access after {MAX_EXITS_PER_ACCESS} exits")

    def read_frame_u64(self, gfn: GFN, offset: int) -> int:
        return self.machine.mem.read_u64(self._mpa(gfn, offset, AccessKind.READ))

    def write_frame_u64(self, gfn: GFN, offset: int, value: int) -> None:
        self.machine.mem.write_u64(self._mpa(gfn, offset, AccessKind.WRITE), value)

    def copy_frame(self, src: GFN, dst: GFN) -> None:
        data = self.machine.mem.frame_bytes(self._mpa(src, 0, AccessKind.READ) >> PAGE_SHIFT)
        self.machine.mem.load_frame(self._mpa(dst, 0, AccessKind.WRITE) >> PAGE_SHIFT, data)

    # -- page tables: the guest's own, plain memory ----------------------------------------
    def pte_frame(self, gfn: GFN) -> int:
        return int(gfn)

    def entry_gfn(self, frame: int) -> GFN:
        return GFN(frame)

    def read_pte(self, table: GFN, index: int) -> int:
        return self.read_frame_u64(table, index * ENTRY_SIZE)

    def write_pte(self, table: GFN, index: int, level: Level, value: int) -> None:
        """A plain store: the hypervisor neither sees nor validates it."""
        self.write_frame_u64(table, index * ENTRY_SIZE, value)

    def new_table(self, table: GFN, level: Level) -> None:
        if self.domain.mfn_of(table) is None:
            raise RefmodelError(f"domain {self.domain.domid} has no gfn {table:#x} for a page table")

    def lazy_begin(self) -> None:
        pass

    def lazy_end(self) -> None:
        pass

    # -- the processor: no exits --------------------------------------------------------------
    def load_cr3(self, root: GFN) -> None:
        """MOV to CR3 with a guest-physical address; EPT is consulted only when the
        walk first reads the table (SDM Vol. 3C 29.3.3)."""
        fault = self.mmu.mov_cr3(root << PAGE_SHIFT)
        if fault is not None:
            raise RefmodelError(f"load_cr3: {fault.reason}")

    def invlpg(self, va: int) -> None:
        self.mmu.invlpg(va)

    def flush_tlb(self) -> None:
        self.load_cr3(GFN(self.mmu.state.cr3 >> PAGE_SHIFT))

    def access(self, va: int, kind: AccessKind, cpl: int = 3, value: int = 0) -> int | PageFault:
        """The access on the processor; an EPT exit is handled and the instruction
        restarted, as after any VM exit the hypervisor resolves."""
        for _ in range(MAX_EXITS_PER_ACCESS):
            try:
                return hardware_access(self.mmu, va, kind, cpl, value)
            except EptExit as exit_:
                self.vm_exit(exit_.outcome)
        raise RefmodelError(f"access {va:#x}: EPT still refuses it after {MAX_EXITS_PER_ACCESS} exits")

    # -- the hypervisor ------------------------------------------------------------------------
    def vm_exit(self, outcome: EptExitOutcome) -> None:
        """One VM exit and the VM entry back: counted; without VPIDs the TLB is
        flushed; then Xen's handler runs (``vmx_vmexit_handler``)."""
        self.exits.append(outcome)
        if isinstance(outcome, EptMisconfiguration):
            self.counters.exit(ExitReason.EPT_MISCONFIG)
        else:
            self.counters.exit(ExitReason.EPT_VIOLATION)
        if not self.tagged:
            self.machine.tlb.flush_everything()
        if isinstance(outcome, EptMisconfiguration):
            # Xen ept_handle_misconfig: only its own "recalc" marks are resolvable,
            # anything else crashes the domain.
            raise RefmodelError(
                f"domain {self.domain.domid}: EPT misconfiguration at gpa {outcome.gpa:#x} "
                f"({outcome.level.entry_name} {outcome.entry:#x}: {outcome.reason}); Xen crashes the domain"
            )
        self.handle_ept_violation(outcome)

    def handle_ept_violation(self, v: EptViolation) -> None:
        """Xen ``ept_handle_violation`` -> ``hvm_hap_nested_page_fault``: for a GFN
        the P2M backs with RAM the fault is spurious or a log-dirty one — a write is
        logged (``paging_mark_pfn_dirty``) and the entry gets the P2M's full rights
        back (``p2m_change_type_one(.., p2m_ram_logdirty, p2m_ram_rw)``); the guest
        retries. A GFN the domain does not have crashes it (``domain_crash``)."""
        gfn = GFN(v.gfn)
        mfn = self.domain.mfn_of(gfn)
        if mfn is None:
            raise RefmodelError(
                f"domain {self.domain.domid}: EPT violation at gpa {v.gpa:#x} (qualification "
                f"{v.qualification.raw:#x}): gfn {gfn:#x} is not in its P2M; Xen crashes the domain"
            )
        if v.qualification.write:
            self.dirty_log.add(gfn)
        self.ept_update(gfn, make_leaf(mfn, RWX))

    # -- hypervisor EPT updates -------------------------------------------------------------------
    def ept_update(self, gfn: GFN, entry: int) -> None:
        """The one primitive: store the EPT PTE of ``gfn`` and, if the old entry was
        present, INVEPT single-context so no combined translation built from it
        survives (Xen ``ept_set_entry``: ``needs_sync`` unless the old entry was not
        present, then ``ept_sync_domain``)."""
        old = self.ept.write_leaf(gfn, entry)
        if is_present(old):
            self.invept()

    def invept(self) -> None:
        """INVEPT single-context (SDM Vol. 3C 29.4.3.1, Vol. 3C INVEPT): invalidate the
        combined mappings derived from this EPT. Here one EPT is used by exactly one
        VPID, so those are the entries tagged with it; untagged, VPID 0's entries —
        a superset, which invalidation is always allowed to be."""
        self.counters.add(Event.INVEPT)
        self.machine.tlb.invalidate_vpid(self.vpid)

    def ept_set_rights(self, gfn: GFN, rights: EptFlag | int) -> None:
        """Narrow (or widen) the EPT permissions of a backed GFN, keeping its frame —
        Xen's p2m type changes, e.g. to ``p2m_ram_logdirty`` (read and execute only)
        for dirty-page tracking. 0 makes the entry not present. The P2M still backs
        the GFN, so an access the new rights refuse exits once and gets full rights
        back (:meth:`handle_ept_violation`)."""
        mfn = self.domain.mfn_of(gfn)
        if mfn is None:
            raise RefmodelError(f"domain {self.domain.domid} has no gfn {gfn:#x}")
        entry = make_leaf(mfn, rights)
        if is_present(entry):
            reason = misconfiguration(entry, Level.L1, self.machine.mem.maxphyaddr, self.caps)
            if reason is not None:
                raise RefmodelError(f"EPT rights {int(rights):03b}b would be a misconfiguration: {reason}")
        self.ept_update(gfn, entry)

    def ept_remap(self, gfn: GFN, mfn: MFN) -> None:
        """Back ``gfn`` with another machine frame the domain owns (P2M, M2P and EPT
        together: with HAP, Xen's EPT is the P2M)."""
        if self.machine.owner_of(mfn) != self.domain.domid:
            raise RefmodelError(f"mfn {mfn:#x} is not owned by domain {self.domain.domid}")
        old = self.domain.p2m.get(gfn)
        if old is not None and self.machine.m2p.get(old) == gfn:
            del self.machine.m2p[old]
        self.domain.p2m[gfn] = mfn
        self.machine.m2p[mfn] = gfn
        self.ept_update(gfn, make_leaf(mfn, RWX))

    def ept_remove(self, gfn: GFN) -> None:
        """Take ``gfn`` away from the domain (Xen ``guest_remove_page``): P2M, M2P and
        EPT entry go; the frame stays the domain's. A later access crashes it."""
        mfn = self.domain.p2m.pop(gfn, None)
        if mfn is None:
            raise RefmodelError(f"domain {self.domain.domid} has no gfn {gfn:#x}")
        if self.machine.m2p.get(mfn) == gfn:
            del self.machine.m2p[mfn]
        self.ept_update(gfn, 0)

