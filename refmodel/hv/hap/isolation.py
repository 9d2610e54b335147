"""The isolation invariant of a HAP domain: nothing the hardware may use on its behalf
reaches a machine frame it does not own.

Two things reach machine memory for a HAP guest: its EPT (every access goes through
it, SDM Vol. 3C 29.3) and the TLB entries tagged with its VPID (combined mappings
GVA -> MPA, 29.4.2, used without consulting either table). Both must stay inside
the domain's own frames, and the EPT tables themselves must be Xen's frames: a guest
that owned a frame of its EPT could map anything. (Xen: the P2M may only map frames
the domain owns, ``p2m_add_page`` / ``guest_physmap_add_page``; the EPT tables are
allocated from the domain's P2M pool, ``p2m_alloc_ptp``, which the guest never maps.)
"""

from ...arch.tlb import TlbEntry
from ...arch.types import PAGE_SHIFT, DomId
from ..machine import DOMID_XEN, Machine
from .backend import HapBackend
from .tables import EptMapping


def describe_owner(machine: Machine, mfn: int) -> str:
    owner = machine.owner_of(mfn)
    if owner is None:
        return "nobody (free or nonexistent)"
    if owner == DOMID_XEN:
        return "Xen (DOMID_XEN)"
    return f"domain {owner}"


def foreign_frames(machine: Machine, domid: DomId, first: int, count: int) -> list[int]:
    """The frames of ``first`` .. ``first + count`` that ``domid`` does not own."""
    return [m for m in range(first, first + count) if machine.owner_of(m) != domid]


def mapping_violations(machine: Machine, domid: DomId, m: EptMapping) -> list[str]:
    return [
        f"EPT maps gfn {m.gfn + (mfn - m.mfn):#x} to mfn {mfn:#x}, owned by {describe_owner(machine, mfn)}"
        for mfn in foreign_frames(machine, domid, m.mfn, m.frames)
    ]


def tlb_violations(machine: Machine, domid: DomId, e: TlbEntry) -> list[str]:
    first = e.frame >> PAGE_SHIFT
    return [
        f"TLB entry (vpid {e.vpid}, pcid {e.pcid}, va {e.vpn << e.size.shift:#x}) reaches mfn {mfn:#x}, "
        f"owned by {describe_owner(machine, mfn)}"
        for mfn in foreign_frames(machine, domid, first, e.size.value >> PAGE_SHIFT)
    ]


def hap_isolated(backend: HapBackend) -> list[str]:
    """Every violation of HAP isolation for ``backend``'s domain (empty: isolated):

    - an EPT table in a frame that is not Xen's;
    - an EPT leaf mapping a frame the domain does not own (Xen's included);
    - a TLB entry tagged with the domain's VPID reaching a frame it does not own.

    Without VPIDs (``tagged=False``) the domain's tag is 0000H, shared with every
    other untagged guest: an entry another domain left behind counts as a violation,
    because this domain's vCPU would use it — hence the flush on every VM entry.
    """
    machine, domid = backend.machine, backend.domain.domid
    problems = [
        f"EPT table in mfn {mfn:#x}, owned by {describe_owner(machine, mfn)}, not Xen"
        for mfn in backend.ept.tables()
        if not machine.is_hypervisor_frame(mfn)
    ]
    for mapping in backend.ept.mappings():
        problems += mapping_violations(machine, domid, mapping)
    for entry in machine.tlb.entries():
        if entry.vpid == backend.vpid:
            problems += tlb_violations(machine, domid, entry)
    return problems
