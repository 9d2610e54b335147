"""``HYPERVISOR_mmuext_op``: pinning, base-pointer switches and TLB flushes
(``do_mmuext_op``, ``new_guest_cr3`` in xen/arch/x86/mm.c).

Same loop shape as mmu_update: in order, stop at the first error, ``*pdone`` counts
the operations completed. The commands:

- PIN_Lx_TABLE: a type reference of level x on the frame — validating the whole tree
  below it the first time — held by the pin; pinning a pinned frame is -EINVAL (and
  gives the reference back). UNPIN_TABLE drops it; a frame not pinned is -EINVAL.
  Unpinning does not check whether the table is in use: a table in use keeps the
  references its users hold, so it stays validated.
- NEW_BASEPTR: only for the caller's own vCPU (-EPERM for a foreign data owner);
  takes an L4 reference on the new base (validating it if needed), loads CR3 (a
  flush of the non-global entries), then drops the old base's reference.
- TLB_FLUSH_LOCAL, INVLPG_LOCAL (a non-canonical address is ignored), *_MULTI (a vCPU
  bitmap read from guest memory; unreadable -> -EINVAL), *_ALL (every CPU the domain
  may be using: here, the one).
- FLUSH_CACHE (-EACCES without cache-flush permission), SET_LDT (argument checks),
  CLEAR_PAGE, COPY_PAGE; [UN]MARK_SUPER -> -EOPNOTSUPP; anything else -ENOSYS.

Every command other than pin/unpin and clear/copy page needs the data owner to be the
caller (-EPERM).

Not modelled (xen/arch/x86/mm.c of Xen 4.17): preemption (3503) and the
continuations and deferred puts (``old_guest_table``) it causes in pin, unpin and
NEW_BASEPTR; the LDT itself (``pv_destroy_ldt`` / ``load_LDT``, 3841-3850); XPTI's
root-table copy on NEW_BASEPTR; IOMMU side effects of the type changes.
"""

from collections.abc import Callable, Sequence

from ...account.events import Event
from ...arch.types import MFN, PAGE_SIZE
from ...errors import RefmodelError
from ..machine import DOMID_SELF, Domain
from .abi import BatchResult, MmuextCmd, MmuextOp, domid_t
from .errno import Errno, neg
from .pagetype import PageType, cache_flush_permitted, get_page_type, put_page_type
from .vcpu import PvVcpu, addr_ok, get_pg_owner, xsm_target_allowed

PIN_TYPES = {
    MmuextCmd.PIN_L1_TABLE: PageType.L1,
    MmuextCmd.PIN_L2_TABLE: PageType.L2,
    MmuextCmd.PIN_L3_TABLE: PageType.L3,
    MmuextCmd.PIN_L4_TABLE: PageType.L4,
}
#: MMUEXT_SET_LDT: "ents > 8192" is refused.
MAX_LDT_ENTRIES = 8192


def do_mmuext_op(
    v: PvVcpu, ops: Sequence[MmuextOp], count: int | None = None, foreigndom: int = DOMID_SELF
) -> BatchResult:
    """Run ``count`` operations (all of ``ops`` by default) for vCPU ``v``. The data
    owner is ``foreigndom``'s low 16 bits: ``do_mmuext_op`` takes an ``unsigned int``
    and hands it to ``get_pg_owner(domid_t)`` (xen/arch/x86/mm.c)."""
    count = len(ops) if count is None else count
    if count < 0:
        raise RefmodelError(f"mmuext_op count {count} is negative")
    pg_owner = get_pg_owner(v, domid_t(foreigndom))
    if pg_owner is None:
        return BatchResult(neg(Errno.ESRCH), 0)
    if not xsm_target_allowed(v.domain, pg_owner):
        return BatchResult(neg(Errno.EPERM), 0)  # xsm_mmuext_op
    rc, done = 0, 0
    for i in range(count):
        if i >= len(ops):
            rc = neg(Errno.EFAULT)
            break
        v.machine.counters.add(Event.HYPERCALL_ENTRY)
        rc = mmuext_one(v, ops[i], pg_owner)
        if rc:
            break
        done += 1
    return BatchResult(rc, done)


def mmuext_one(v: PvVcpu, op: MmuextOp, pg_owner: Domain) -> int:
    """One operation: the ``switch ( op.cmd )`` of ``do_mmuext_op``."""
    if op.cmd in PIN_TYPES:
        return pin_table(v, MFN(op.arg1), PIN_TYPES[MmuextCmd(op.cmd)], pg_owner)
    if op.cmd == MmuextCmd.UNPIN_TABLE:
        return unpin_table(v, MFN(op.arg1), pg_owner)
    if op.cmd == MmuextCmd.CLEAR_PAGE:
        return clear_page(v, MFN(op.arg1), pg_owner)
    if op.cmd == MmuextCmd.COPY_PAGE:
        return copy_page(v, MFN(op.arg1), MFN(op.arg2), pg_owner)
    if op.cmd in (MmuextCmd.MARK_SUPER, MmuextCmd.UNMARK_SUPER):
        return neg(Errno.EOPNOTSUPP)
    handler = _OWN_DOMAIN_OPS.get(op.cmd)
    if handler is None:
        return neg(Errno.ENOSYS)
    if pg_owner is not v.domain:
        return neg(Errno.EPERM)  # "currd != pg_owner"
    return handler(v, op)


def pin_table(v: PvVcpu, mfn: MFN, type_: PageType, pg_owner: Domain) -> int:
    """MMUEXT_PIN_Lx_TABLE: take (and keep) a type reference of ``type_``."""
    if not v.frames.owned_by(mfn, pg_owner):
        return neg(Errno.EINVAL)  # get_page_from_gfn failed
    rc = get_page_type(v.frames, mfn, type_)
    if rc:
        return rc  # "Error %d while pinning mfn"
    page = v.frames.info(mfn)
    if page.pinned:
        put_page_type(v.frames, mfn)  # pin_drop
        return neg(Errno.EINVAL)  # "mfn already pinned"
    page.pinned = True
    return 0


def unpin_table(v: PvVcpu, mfn: MFN, pg_owner: Domain) -> int:
    """MMUEXT_UNPIN_TABLE: drop the pin's type reference (de-validating the table if
    it was the last one)."""
    if not v.frames.owned_by(mfn, pg_owner):
        return neg(Errno.EINVAL)  # "mfn bad, or bad owner"
    page = v.frames.info(mfn)
    if not page.pinned:
        return neg(Errno.EINVAL)  # "mfn not pinned"
    page.pinned = False
    put_page_type(v.frames, mfn)
    return 0


def get_base_reference(v: PvVcpu, mfn: MFN) -> int:
    """``get_page_and_type_from_mfn(mfn, PGT_root_page_table, currd)``: the frame must
    be the caller's (-EINVAL) and take an L4 type reference, validating it if needed."""
    if not v.frames.owned_by(mfn, v.domain):
        return neg(Errno.EINVAL)
    return get_page_type(v.frames, mfn, PageType.L4)


def new_guest_cr3(v: PvVcpu, op: MmuextOp) -> int:
    """MMUEXT_NEW_BASEPTR (``new_guest_cr3``): switch to the L4 table in ``arg1``.
    Reloading the current base only reloads CR3."""
    mfn, old = MFN(op.arg1), v.guest_table
    if old == mfn:
        v.write_ptbase()
        return 0
    rc = get_base_reference(v, mfn)
    if rc:
        return rc  # "Error while installing new baseptr"
    v.guest_table = mfn
    v.write_ptbase()
    if old is not None:
        put_page_type(v.frames, old)
    return 0


def new_user_baseptr(v: PvVcpu, op: MmuextOp) -> int:
    """MMUEXT_NEW_USER_BASEPTR: the base a 64-bit PV guest's user mode runs on (0:
    none). Only the references are modelled: the model does not run guest user mode
    on separate tables."""
    mfn, old = op.arg1, v.guest_table_user
    if (old or 0) == mfn:
        return 0
    if mfn:
        rc = get_base_reference(v, MFN(mfn))
        if rc:
            return rc
    v.guest_table_user = MFN(mfn) if mfn else None
    if old is not None:
        put_page_type(v.frames, old)
    return 0


def tlb_flush_local(v: PvVcpu, op: MmuextOp) -> int:
    v.flush_tlb_local()
    return 0


def invlpg_local(v: PvVcpu, op: MmuextOp) -> int:
    v.flush_tlb_one(op.arg1)
    return 0


def tlb_flush_multi(v: PvVcpu, op: MmuextOp) -> int:
    """MMUEXT_TLB_FLUSH_MULTI / INVLPG_MULTI: flush the vCPUs in the bitmap at guest
    address ``arg2``; an unreadable bitmap is -EINVAL."""
    mask = v.vcpumask(op.arg2)
    if mask is None:
        return neg(Errno.EINVAL)
    if mask:
        if op.cmd == MmuextCmd.TLB_FLUSH_MULTI:
            v.flush_tlb_local()
        elif addr_ok(op.arg1):
            v.flush_tlb_one(op.arg1)
    return 0


def tlb_flush_all(v: PvVcpu, op: MmuextOp) -> int:
    v.frames.flush_domain(v.domain.domid)
    return 0


def invlpg_all(v: PvVcpu, op: MmuextOp) -> int:
    if addr_ok(op.arg1):
        v.flush_tlb_one(op.arg1)
    return 0


def flush_cache(v: PvVcpu, op: MmuextOp) -> int:
    """MMUEXT_FLUSH_CACHE[_GLOBAL]: caches are not modelled; only the permission is."""
    return 0 if cache_flush_permitted(v.domain) else neg(Errno.EACCES)


def set_ldt(v: PvVcpu, op: MmuextOp) -> int:
    """MMUEXT_SET_LDT: the argument checks; the LDT itself is not modelled. The
    entry count is ``arg2.nr_ents``, an ``unsigned int`` (xen.h ``struct
    mmuext_op``): the low 32 bits of the slot."""
    ents, ptr = op.arg2 & 0xFFFF_FFFF, op.arg1
    if ents > MAX_LDT_ENTRIES or (ents and (ptr % PAGE_SIZE or not addr_ok(ptr))):
        return neg(Errno.EINVAL)  # "Bad args to SET_LDT"
    v.ldt_base, v.ldt_ents = (ptr if ents else 0), ents
    return 0


def clear_page(v: PvVcpu, mfn: MFN, pg_owner: Domain) -> int:
    """MMUEXT_CLEAR_PAGE: zero a frame of the data owner that can be a writable page."""
    if not v.frames.owned_by(mfn, pg_owner) or get_page_type(v.frames, mfn, PageType.WRITABLE):
        return neg(Errno.EINVAL)  # "Error clearing mfn"
    v.machine.mem.load_frame(mfn, bytes(PAGE_SIZE))
    put_page_type(v.frames, mfn)
    return 0


def copy_page(v: PvVcpu, dst: MFN, src: MFN, pg_owner: Domain) -> int:
    """MMUEXT_COPY_PAGE: copy frame ``src`` into frame ``dst`` (a writable page), both
    the data owner's."""
    if not v.frames.owned_by(src, pg_owner):
        return neg(Errno.EINVAL)  # "Error copying from mfn"
    if not v.frames.owned_by(dst, pg_owner) or get_page_type(v.frames, dst, PageType.WRITABLE):
        return neg(Errno.EINVAL)  # "Error copying to mfn"
    v.machine.mem.load_frame(dst, v.machine.mem.frame_bytes(src))
    put_page_type(v.frames, dst)
    return 0


_OWN_DOMAIN_OPS: dict[int, Callable[[PvVcpu, MmuextOp], int]] = {
    MmuextCmd.NEW_BASEPTR: new_guest_cr3,
    MmuextCmd.NEW_USER_BASEPTR: new_user_baseptr,
    MmuextCmd.TLB_FLUSH_LOCAL: tlb_flush_local,
    MmuextCmd.INVLPG_LOCAL: invlpg_local,
    MmuextCmd.TLB_FLUSH_MULTI: tlb_flush_multi,
    MmuextCmd.INVLPG_MULTI: tlb_flush_multi,
    MmuextCmd.TLB_FLUSH_ALL: tlb_flush_all,
    MmuextCmd.INVLPG_ALL: invlpg_all,
    MmuextCmd.FLUSH_CACHE: flush_cache,
    MmuextCmd.FLUSH_CACHE_GLOBAL: flush_cache,
    MmuextCmd.SET_LDT: set_ldt,
}
