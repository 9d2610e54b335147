"""A PV guest's vCPU as Xen sees it (``struct vcpu``, ``struct pv_vcpu``): the
hardware it runs on directly, and the per-vCPU state the hypercalls read and write.

A PV guest runs on the real MMU with its own page tables: CR3 holds the machine
address of the base table Xen accepted with MMUEXT_NEW_BASEPTR (``arch.guest_table``,
which holds an L4 type reference). There is no VMX, hence no VM exit: entering Xen
is a hypercall, and Xen runs on the guest's page tables, so entering it flushes
nothing (Barham et al., SOSP 2003, section 3.3).

One vCPU (``vcpu_id`` 0) per domain, on the machine's one physical CPU.

CR4: the vCPU runs with the CR4 Xen makes for it (``pv_make_cr4``,
xen/arch/x86/pv/domain.c): PCIDE when the domain uses PCIDs, else PGE unless XPTI is
on or ``global-pages`` is off. The model follows Xen 4.17 without XPTI and without
PCIDs (the default on hardware not affected by Meltdown): CR4.PGE is set, so the
guest's G entries are global in the TLB, and every flush Xen does for the vCPU —
``flush_tlb_local``, ``flush_tlb_mask``, ``write_ptbase`` — drops them too.
XPTI (its per-CPU root-table copy and resync) and PCIDs for PV are not modelled.
"""

from dataclasses import replace

from ...arch.control import Cr4
from ...arch.mmu import LoadResult, Mmu
from ...arch.types import MFN, PAGE_SHIFT, DomId
from ...arch.vcpu import ArchState
from ...arch.walk import is_canonical
from ...errors import RefmodelError
from ..machine import DOMID_COW, DOMID_IO, DOMID_SELF, DOMID_XEN, Domain, Machine
from .pagetype import FrameTable, frame_table_of

#: Xen's reserved linear range for a 64-bit PV guest: L4 slots 256..271
#: (``HYPERVISOR_VIRT_START`` .. ``HYPERVISOR_VIRT_END``, asm/config.h).
HYPERVISOR_VIRT_START = 0xFFFF_8000_0000_0000
HYPERVISOR_VIRT_END = HYPERVISOR_VIRT_START + 16 * (1 << 39)
#: ``d->max_vcpus``: one vCPU per domain in this model.
MAX_VCPUS = 1


def addr_ok(va: int) -> bool:
    """``__addr_ok`` (asm/x86_64/uaccess.h): "Valid if in +ve half of 48-bit address
    space, or above Xen-reserved area"."""
    return va < (1 << 47) or va >= HYPERVISOR_VIRT_END


def pv_make_cr4() -> int:
    """``pv_make_cr4`` (xen/arch/x86/pv/domain.c) for a domain without PCIDs and
    without XPTI, ``opt_global_pages`` on: the paging bits of the real CR4 a PV vCPU
    runs with — PAE and PGE (``mmu_cr4_features`` has PGE; PCIDE is not set)."""
    return int(Cr4.PAE | Cr4.PGE)


class PvVcpu:
    """One PV vCPU: its domain, the MMU it runs on, and Xen's bookkeeping for it."""

    def __init__(self, machine: Machine, domain: Domain, vpid: int) -> None:
        self.machine = machine
        self.domain = domain
        self.frames: FrameTable = frame_table_of(machine)
        self.vpid = vpid
        self.mmu = Mmu(machine.mem, ArchState(cr4=pv_make_cr4()), machine.tlb, machine.counters, vpid)
        self.guest_table: MFN | None = None  #: ``arch.guest_table``: the current base
        self.guest_table_user: MFN | None = None  #: ``arch.guest_table_user``
        self.in_multicall = False  #: ``mc_state.flags & _MCSF_in_multicall``
        self.ldt_base = 0  #: ``arch.pv.ldt_base``
        self.ldt_ents = 0  #: ``arch.pv.ldt_ents``
        #: ``arch.old_guest_table`` / ``arch.old_guest_ptpg``: a type reference whose
        #: put is deferred (``PTF_defer``), and the page table whose entry held it.
        self.old_guest_table: tuple[MFN, MFN] | None = None
        self.frames.register(domain.domid, vpid)

    # -- TLB maintenance Xen performs for this vCPU ---------------------------------------
    def flush_tlb_local(self) -> None:
        """``flush_tlb_local()`` = ``flush_local(FLUSH_TLB)`` (asm/flushtlb.h): every
        entry of this vCPU, global ones included — with one vCPU per domain, the
        domain's whole flush."""
        self.frames.flush_domain(self.domain.domid)

    def flush_tlb_one(self, va: int) -> None:
        """``flush_tlb_one_local`` (INVLPG); ``paging_invlpg`` ignores a
        non-canonical address, as the INVLPG instruction does."""
        if is_canonical(va):
            self.mmu.invlpg(va)

    def write_ptbase(self) -> None:
        """``write_ptbase`` -> ``switch_cr3_cr4`` (xen/arch/x86/flushtlb.c): load CR3
        with the current base. With CR4.PGE set and staying set, Xen first writes
        CR4 with PGE clear — a flush of every entry, global ones included — then
        CR3, then CR4 again; the later two writes find nothing of the tag left, so
        the model does the three as one flush of the tag (one
        :attr:`Event.TLB_FLUSH_GLOBAL`). With PGE clear it is the CR3 write alone
        (no entry is global then)."""
        assert self.guest_table is not None
        cr3 = self.guest_table << PAGE_SHIFT
        state = self.mmu.state
        if state.cr4 & Cr4.PGE and not state.cr4 & Cr4.PCIDE:
            self.mmu.state = replace(state, cr3=cr3)
            self.machine.tlb.invalidate_all(self.vpid)
        else:
            fault = self.mmu.mov_cr3(cr3)
            assert fault is None, fault
        self.frames.note_full_flush(self.domain.domid)

    # -- guest memory as Xen reads it -------------------------------------------------------
    def copy_from_guest_u64(self, va: int) -> int | None:
        """``copy_from_guest``: Xen reads 8 bytes at guest-virtual ``va`` through the
        guest's page tables, as a supervisor access. None if the read faults (the
        fault is Xen's own, fixed up, and never reaches the guest)."""
        if va % 8:
            raise RefmodelError(f"guest buffer {va:#x}: the model reads 8-byte aligned words only")
        if not addr_ok(va):
            return None
        saved = self.mmu.state
        self.mmu.state = replace(saved, cpl=0)
        out = self.mmu.load(va, 8)
        self.mmu.state = saved
        return out.value if isinstance(out, LoadResult) else None

    def vcpumask(self, bmap_ptr: int) -> int | None:
        """``vcpumask_to_pcpumask``: read the guest's vCPU bitmap; None if it cannot
        be read. Bits at or above ``max_vcpus`` are ignored."""
        word = self.copy_from_guest_u64(bmap_ptr)
        return None if word is None else word & ((1 << MAX_VCPUS) - 1)


def get_pg_owner(v: PvVcpu, domid: int) -> Domain | None:
    """``get_pg_owner`` (xen/common/page_alloc.c): the data owner a hypercall names.
    DOMID_SELF is the caller; naming oneself by number is refused ("Cannot specify
    itself as foreign domain"); an unknown domain is None (the caller returns
    -ESRCH). DOMID_IO, DOMID_XEN and DOMID_COW owners are not modelled."""
    if domid == DOMID_SELF:
        return v.domain
    if domid == v.domain.domid:
        return None
    if domid in (DOMID_IO, DOMID_XEN, DOMID_COW):
        raise RefmodelError(f"data owner {domid:#x} (DOMID_IO/XEN/COW) is not modelled")
    return v.machine.domains.get(DomId(domid))


def xsm_target_allowed(src: Domain, target: Domain) -> bool:
    """``xsm_default_action(XSM_TARGET, src, target)`` with the dummy XSM policy
    (xen/include/xsm/dummy.h): a domain may act on itself; a control (privileged)
    domain on any domain; otherwise -EPERM."""
    return src is target or src.privileged
