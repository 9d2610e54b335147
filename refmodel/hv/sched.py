"""vCPU context switches on one physical CPU.

A :class:`Scheduler` runs the vCPUs of several domains on one physical CPU. The
physical register file (:attr:`Scheduler.regs`) holds the running vCPU's
architectural state; a switch saves it into the outgoing vCPU and loads the
incoming vCPU's saved state — all of it, so nothing of one guest's registers is
visible to the next (Xen: ``context_switch`` in xen/arch/x86/domain.c, with
``__context_switch`` saving and restoring the full register state).

What a switch costs is the same in every mode — a world switch — and what differs
is the TLB: without tags the physical TLB is flushed, so the incoming vCPU refills
its working set (cheap native walks, 24-reference nested walks under HAP); with
VPIDs (VMX, Vol. 3C 29.1) or PCIDs (PV guests, Xen's ``pcid=`` option) the entries
of different vCPUs coexist and survive the switch.
"""

from dataclasses import dataclass, replace

from ..account.events import Counters, Event, ExitReason
from ..arch.tlb import Tlb
from ..arch.vcpu import NUM_GPRS, ArchState
from ..errors import RefmodelError
from ..guest.ops import MmuBackend, Mode


@dataclass
class Vcpu:
    """A virtual CPU: its domain, the backend that runs it, and its saved state."""

    domid: int
    backend: MmuBackend
    saved: ArchState


class Scheduler:
    """One physical CPU, several vCPUs, explicit switches."""

    def __init__(self, tlb: Tlb, counters: Counters, tagged: bool) -> None:
        self.tlb = tlb
        self.counters = counters
        self.tagged = tagged
        self.vcpus: list[Vcpu] = []
        self.current: int | None = None
        self.regs = ArchState()  #: the physical register file

    def add(self, domid: int, backend: MmuBackend) -> int:
        """Register a vCPU; returns its index."""
        self.vcpus.append(Vcpu(domid, backend, ArchState()))
        return len(self.vcpus) - 1

    def running(self) -> Vcpu:
        if self.current is None:
            raise RefmodelError("no vCPU is running")
        return self.vcpus[self.current]

    def switch_to(self, index: int) -> None:
        """Deschedule the running vCPU and run ``index``: save the whole register
        file, load the incoming state, and flush the TLB unless tags keep the
        vCPUs' entries apart."""
        if not 0 <= index < len(self.vcpus):
            raise RefmodelError(f"no vCPU {index}; have {len(self.vcpus)}")
        if index == self.current:
            return
        incoming = self.vcpus[index]
        if self.current is not None:
            outgoing = self.vcpus[self.current]
            outgoing.saved = with_paging_registers(self.regs, outgoing.backend)
            if outgoing.backend.mode in (Mode.SHADOW, Mode.SHADOW_OOS, Mode.HAP):
                self.counters.exit(ExitReason.HLT)  # an HVM vCPU leaves the CPU through a VM exit
            if outgoing.domid != incoming.domid:
                self.counters.add(Event.WORLD_SWITCH)
        self.counters.add(Event.CONTEXT_SWITCH)
        if not self.tagged:
            self.tlb.flush_everything()
        self.regs = incoming.saved
        self.current = index

    # -- what a guest does with its registers ------------------------------------------------
    def set_gpr(self, index: int, value: int) -> None:
        if not 0 <= index < NUM_GPRS:
            raise RefmodelError(f"no general register {index}")
        self.running()
        self.regs = self.regs.with_gpr(index, value)

    def get_gpr(self, index: int) -> int:
        if not 0 <= index < NUM_GPRS:
            raise RefmodelError(f"no general register {index}")
        self.running()
        return self.regs.gprs[index]

    def set_rip(self, rip: int) -> None:
        self.running()
        self.regs = replace(self.regs, rip=rip)


def with_paging_registers(regs: ArchState, backend: MmuBackend) -> ArchState:
    """The complete state to save: the register file plus the paging registers
    (CR0, CR2, CR3, CR4, EFER) the backend keeps as the guest sees them."""
    guest = getattr(backend, "guest_state", None)
    if not isinstance(guest, ArchState):
        return regs
    return replace(regs, cr0=guest.cr0, cr2=guest.cr2, cr3=guest.cr3, cr4=guest.cr4, efer=guest.efer)
