"""``HYPERVISOR_update_va_mapping``: set the L1 entry that maps one guest-virtual
address, and flush as asked (``__do_update_va_mapping`` in xen/arch/x86/mm.c).

Xen finds the L1 table through the guest's *current* page tables
(``map_guest_l1e``: the L2 entry for ``va``, read through the linear page table, must
be present and not a superpage); the frame must be the caller's, its type in use,
and an L1 page table — else -EINVAL. The entry is then set by ``mod_l1_entry``
exactly as an mmu_update would. The flush (``flags & UVMF_FLUSHTYPE_MASK``) happens
only if the update succeeded; its scope is ``flags & ~3``: UVMF_LOCAL (0), UVMF_ALL
(4), or a guest pointer to a vCPU bitmap — one Xen cannot read makes the call return
-EFAULT, *after* the entry was changed.

Not modelled: what ``mod_l1_entry`` leaves out (:mod:`.mmu_update`: the entry
rewriting ``adjust_guest_l1e``, the L1TF check), preemption, and translated guests.
"""

from ...account.events import Event
from ...arch.pte import Level, PteFlag, table_index
from ...arch.types import ENTRY_SIZE, MFN, PAGE_SHIFT
from ..machine import Domain
from .abi import Uvmf, domid_t
from .errno import Errno, neg
from .mmu_update import mod_l1_entry
from .pagetype import PageType, read_entry
from .pteflags import entry_mfn, present
from .vcpu import PvVcpu, addr_ok, get_pg_owner, xsm_target_allowed


def do_update_va_mapping(v: PvVcpu, va: int, val: int, flags: int) -> int:
    """``do_update_va_mapping``: the caller is the data owner."""
    return update_va_mapping(v, va, val, flags, v.domain)


def do_update_va_mapping_otherdomain(v: PvVcpu, va: int, val: int, flags: int, domid: int) -> int:
    """``do_update_va_mapping_otherdomain``: the data owner is ``domid``, a
    ``domid_t`` parameter — only its low 16 bits reach Xen."""
    pg_owner = get_pg_owner(v, domid_t(domid))
    if pg_owner is None:
        return neg(Errno.ESRCH)
    return update_va_mapping(v, va, val, flags, pg_owner)


def map_guest_l1e(v: PvVcpu, va: int) -> tuple[MFN, int] | None:
    """``map_guest_l1e``: the L1 frame and the machine address of the entry for
    ``va`` in the current page tables, or None. The linear-table read of the L2
    entry needs the L4 and L3 entries present; the L2 entry must be present without
    PSE."""
    if not addr_ok(va) or v.guest_table is None:
        return None
    table = int(v.guest_table)
    for level in (Level.L4, Level.L3, Level.L2):
        entry = read_entry(v.frames, table, table_index(va, level))
        if not present(entry) or (level is Level.L2 and entry & PteFlag.PS):
            return None
        table = entry_mfn(entry)
    return MFN(table), (table << PAGE_SHIFT) + table_index(va, Level.L1) * ENTRY_SIZE


def update_va_mapping(v: PvVcpu, va: int, val: int, flags: int, pg_owner: Domain) -> int:
    """``__do_update_va_mapping``."""
    v.machine.counters.add(Event.HYPERCALL_ENTRY)
    if not xsm_target_allowed(v.domain, pg_owner):
        return neg(Errno.EPERM)  # xsm_update_va_mapping
    found = map_guest_l1e(v, va)
    if found is None:
        return neg(Errno.EINVAL)
    gl1mfn, maddr = found
    page = v.frames.info(gl1mfn)
    if not v.frames.owned_by(gl1mfn, v.domain) or not (page.count > 0 and page.validated):
        return neg(Errno.EINVAL)  # get_page_from_mfn / page_lock failed
    if page.type is not PageType.L1:
        return neg(Errno.EINVAL)
    rc = mod_l1_entry(v, maddr, val, gl1mfn, False, pg_owner)
    if rc:
        return rc  # "Any error at this point means that we haven't change the L1e"
    return flush_after_update(v, va, flags)


def flush_after_update(v: PvVcpu, va: int, flags: int) -> int:
    """The ``switch ( flags & UVMF_FLUSHTYPE_MASK )`` that ends the hypercall."""
    kind, where = flags & Uvmf.FLUSHTYPE_MASK, flags & ~Uvmf.FLUSHTYPE_MASK
    if kind not in (Uvmf.TLB_FLUSH, Uvmf.INVLPG):
        return 0
    if where == Uvmf.LOCAL or where == Uvmf.ALL:
        selected = True  # this vCPU / every CPU the domain uses: the one
    else:
        mask = v.vcpumask(where)
        if mask is None:
            return neg(Errno.EFAULT)  # vcpumask_to_pcpumask's -EFAULT; nothing flushed
        selected = bool(mask)
    if selected:
        if kind == Uvmf.TLB_FLUSH:
            v.flush_tlb_local()
        else:
            v.flush_tlb_one(va)
    return 0
