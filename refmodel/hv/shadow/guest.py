"""The guest's own page tables, seen from the hypervisor.

A shadowed HVM guest keeps ordinary 4-level tables in its guest-physical memory:
entries hold GFNs (``pte_frame(gfn) == gfn``), and the guest's CR3 names its root by
GFN. The hypervisor reads them — and, walking them on the guest's behalf, sets their
Accessed/Dirty flags exactly as the processor would on bare metal — through the P2M
(Xen: ``sh_walk_guest_tables`` -> ``guest_walk_tables`` in xen/arch/x86/mm/guest_walk.c,
which maps each guest table frame through the P2M and sets A/D as the hardware does).

:class:`GuestPhysMemory` is that view: an :class:`~refmodel.arch.walk.EntryMemory`
whose addresses are guest-physical, so :func:`refmodel.arch.walk.walk` — the one
implementation of the SDM's walk — runs unchanged over the guest's tables.
"""

from dataclasses import replace

from ...arch.control import Cr0
from ...arch.physmem import PhysicalMemory
from ...arch.types import MFN, PAGE_SHIFT, frame_of, page_offset
from ...arch.vcpu import ArchState
from ...arch.walk import PagingContext
from ...errors import RefmodelError
from ..machine import Domain


class GuestPhysMemory:
    """Guest-physical memory of one domain, read and written through its P2M.

    A guest-physical frame the P2M does not back reads as zeros, as a frame of
    physical memory nobody wrote does on bare metal (so a guest entry that points
    outside the guest's RAM yields a not-present entry, exactly as natively). Writing
    to such a frame is a request the model cannot honour: memory-mapped I/O is not
    modelled.
    """

    def __init__(self, mem: PhysicalMemory, domain: Domain) -> None:
        self.mem = mem
        self.domain = domain

    def mfn(self, gfn: int) -> MFN | None:
        """The P2M lookup (Xen: ``get_gfn``)."""
        return self.domain.mfn_of(gfn)

    def machine_address(self, gpa: int) -> int | None:
        """The machine address backing a guest-physical address, if any."""
        mfn = self.mfn(frame_of(gpa))
        return None if mfn is None else (mfn << PAGE_SHIFT) | page_offset(gpa)

    def read_u64(self, pa: int) -> int:
        mpa = self.machine_address(pa)
        return 0 if mpa is None else self.mem.read_u64(mpa)

    def write_u64(self, pa: int, value: int) -> None:
        mpa = self.machine_address(pa)
        if mpa is None:
            raise RefmodelError(
                f"domain {self.domain.domid}: write to guest-physical {pa:#x}, which its P2M does not back"
            )
        self.mem.write_u64(mpa, value)

    def read_uint(self, gpa: int, size: int) -> int:
        """A data read of ``size`` bytes within one frame (emulated accesses)."""
        mpa = self.machine_address(gpa)
        return 0 if mpa is None else self.mem.read_uint(mpa, size)

    def write_uint(self, gpa: int, size: int, value: int) -> None:
        """A data write of ``size`` bytes within one frame (emulated accesses)."""
        mpa = self.machine_address(gpa)
        if mpa is None:
            raise RefmodelError(
                f"domain {self.domain.domid}: write to guest-physical {gpa:#x}, which its P2M does not back"
            )
        self.mem.write_uint(mpa, size, value)


def guest_paging_context(state: ArchState, maxphyaddr: int) -> PagingContext:
    """The context the *guest's* walk runs in: its own CR0/CR3/CR4/EFER/RFLAGS.

    1 GiB pages are not offered to a shadowed guest: Xen "Shadow pagetables don't
    support 1GB superpages at all, and will always treat L3 _PAGE_PSE as reserved"
    (xen/arch/x86/include/asm/guest_pt.h, ``guest_can_use_l3_superpages``), and
    CPUID does not advertise them without HAP.
    """
    return state.paging_context(maxphyaddr, page1gb=False)


def hardware_state(guest: ArchState, shadow_root: MFN) -> ArchState:
    """The register state the processor really runs the guest with: the guest's
    own registers, except that CR3 holds the shadow root, and CR0.WP is forced on so
    that write-protected page tables stay write-protected for supervisor writes too
    (Xen vmx.c ``vmx_update_guest_cr``: shadow mode adds X86_CR0_WP to the hardware
    CR0; multi.c ``sh_page_fault`` emulates the supervisor writes a guest with
    CR0.WP = 0 expects to succeed)."""
    return replace(guest, cr3=shadow_root << PAGE_SHIFT, cr0=guest.cr0 | int(Cr0.WP))
