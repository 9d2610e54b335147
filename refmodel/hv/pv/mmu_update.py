"""``HYPERVISOR_mmu_update``: a batch of checked page-table writes
(``do_mmu_update``, ``mod_l1_entry``, ``mod_l[234]_entry`` in xen/arch/x86/mm.c).

The requests run strictly in order and the loop stops at the first error: the
failing request is not done, ``*pdone`` counts the requests that succeeded, and the
return value is that first error (0 if none). Each request names the machine address
of an entry; Xen dispatches on the *current type* of the frame holding it:

- an L1 page table -> :func:`mod_l1_entry`; L2..L4 -> :func:`mod_upper_entry`;
- a frame whose type is not in use -> taken as writable for the store (a plain write);
- a writable page in use -> a plain write; any other type -> -EINVAL.

A plain write stores the value as given, for every command: PRESERVE_AD keeps the
A/D bits only of page-table entries.

TLB: Xen does not flush after an L1 change — the guest asks for the flush it needs.
After a batch in which some L2..L4 entry changed, Xen flushes once ("flush_linear_pt
requires a FLUSH_TLB to all dirty CPUs"), because the guest's linear page-table
mappings may cache the old structure.

Deferred puts: ``mod_l[234]_entry`` drop the old target's type reference with
``PTF_defer`` — ``put_pt_page`` only records it in ``curr->arch.old_guest_table``.
The next iteration of ``do_mmu_update``'s loop finds it set and stops with
-ERESTART (after the last request, the loop's end does the same): this invocation
ends — with its flush if an upper level changed — and a continuation re-enters
``do_mmu_update``, whose first act is ``put_old_guest_table``. So the old target's
last reference goes *after* the flush (its ``tlbflush_timestamp`` is newer than it)
and each such change ends an invocation with its own flush. The model runs the
continuation at once (:func:`end_invocation`); the extra trap the re-entry costs the
guest is not counted.

Not modelled (xen/arch/x86/mm.c of Xen 4.17): preemption (``hypercall_preempt_check``,
4050) and the continuations it makes — a batch always runs to completion; a foreign
page-table owner (``foreigndom >> 16``, 4029-4041); translated (HVM) data owners
(2166-2199); the L1TF check of
non-present entries (``pv_l1tf_check_l1e`` .. ``_l4e``, 2237, 2301, 2364, 2426:
-ERESTART and shadow activation; off by default for dom0, ``opt_pv_l1tf_hwdom``,
xen/arch/x86/spec_ctrl.c 457-477); the XPTI root-table resync
(``flush_root_pt_local``/``_others``, ``FLUSH_ROOT_PGTBL``, 4172, 4184, 4306-4330);
the XSM device-model clause (``XSM_DM_PRIV``, xen/include/xsm/dummy.h 93-96); the
writable-page-table emulation (``pv_ro_page_fault`` / ``ptwr_do_page_fault``,
xen/arch/x86/pv/ro-page-fault.c 279-381, entered from ``fixup_page_fault``,
xen/arch/x86/traps.c 1582-1598, for ``VMASST_writable_pagetables`` and for the
hardware domain's ``mmio_ro`` case): a guest's write to its read-only page table
faults.
"""

from collections.abc import Sequence

from ...account.events import Event
from ...arch.pte import Level, PteFlag
from ...arch.types import GFN, PAGE_SHIFT, MFN
from ...errors import RefmodelError
from ..machine import DOMID_SELF, Domain
from .adjust import adjust_guest_l1e, adjust_guest_upper
from .abi import BatchResult, MmuCmd, MmuUpdate, domid_t
from .errno import Errno, neg
from .pagetype import (
    PageType,
    PvStat,
    cache_flush_permitted,
    get_page_from_l1e,
    get_page_from_upper_entry,
    get_page_type,
    is_guest_l4_slot,
    put_page_from_l1e,
    put_page_type,
)
from .pteflags import (
    FASTPATH_FLAG_WHITELIST,
    FASTPATH_PDE_FLAG_WHITELIST,
    UPPER_DISALLOW_MASK,
    entry_has_changed,
    entry_mfn,
    l1_disallow_mask,
    present,
)
from .vcpu import PvVcpu, get_pg_owner, xsm_target_allowed

PT_UPDATES = (MmuCmd.NORMAL_PT_UPDATE, MmuCmd.PT_UPDATE_PRESERVE_AD, MmuCmd.PT_UPDATE_NO_TRANSLATE)


def do_mmu_update(
    v: PvVcpu, reqs: Sequence[MmuUpdate], count: int | None = None, foreigndom: int = DOMID_SELF
) -> BatchResult:
    """Run ``count`` requests (all of ``reqs`` by default) for vCPU ``v``; the data
    owner of new mappings is ``foreigndom`` (DOMID_SELF: the caller)."""
    count = len(reqs) if count is None else count
    if count < 0:
        raise RefmodelError(f"mmu_update count {count} is negative")
    if foreigndom >> 16:
        raise RefmodelError("a foreign page-table owner (foreigndom >> 16) is not modelled")
    pg_owner = get_pg_owner(v, domid_t(foreigndom))
    if pg_owner is None:
        return BatchResult(neg(Errno.ESRCH), 0)
    rc, done, upper_changed = 0, 0, False
    for i in range(count):
        if i >= len(reqs):
            rc = neg(Errno.EFAULT)  # __copy_from_guest of a request past the array
            break
        v.machine.counters.add(Event.HYPERCALL_ENTRY)
        rc, level = mmu_update_one(v, reqs[i], pg_owner)
        if rc:
            break
        done += 1
        upper_changed |= level is not None and level is not Level.L1
        if v.old_guest_table is not None:
            upper_changed = end_invocation(v, upper_changed)
    if upper_changed:
        v.frames.flush_domain(v.domain.domid)
    return BatchResult(rc, done)


def end_invocation(v: PvVcpu, upper_changed: bool) -> bool:
    """A put was deferred (``old_guest_table``): ``do_mmu_update`` stops with
    -ERESTART, ends this invocation — flushing if an upper level changed — and its
    continuation starts with ``put_old_guest_table``. Returns the new invocation's
    ``flush_linear_pt`` (false)."""
    if upper_changed:
        v.frames.flush_domain(v.domain.domid)
    put_old_guest_table(v)
    return False


def put_old_guest_table(v: PvVcpu) -> None:
    """``put_old_guest_table``: drop the deferred type reference, if any."""
    if v.old_guest_table is not None:
        page, ptpg = v.old_guest_table
        v.old_guest_table = None
        put_page_type(v.frames, page, ptpg=ptpg)


def mmu_update_one(v: PvVcpu, req: MmuUpdate, pg_owner: Domain) -> tuple[int, Level | None]:
    """One request: its return, and the level of the page table it changed (None
    when it wrote no page table)."""
    cmd = req.cmd
    if cmd in PT_UPDATES:
        return pt_update(v, req, pg_owner)
    if cmd == MmuCmd.MACHPHYS_UPDATE:
        return machphys_update(v, req, pg_owner), None
    return neg(Errno.ENOSYS), None


def pt_update(v: PvVcpu, req: MmuUpdate, pg_owner: Domain) -> tuple[int, Level | None]:
    """MMU_NORMAL_PT_UPDATE / PRESERVE_AD / NO_TRANSLATE: dispatch on the type of the
    frame that holds the entry (``page_lock`` succeeds only for a type in use and
    validated)."""
    if not xsm_target_allowed(v.domain, pg_owner):
        return neg(Errno.EPERM), None  # xsm_mmu_update
    mfn = MFN(req.maddr >> PAGE_SHIFT)
    if not v.frames.owned_by(mfn, v.domain):
        return neg(Errno.EINVAL), None  # "Could not get page for normal update"
    page = v.frames.info(mfn)
    preserve_ad = req.cmd == MmuCmd.PT_UPDATE_PRESERVE_AD
    if not (page.count > 0 and page.validated):
        # page_lock failed: the frame's type is not in use; write it as a writable page.
        if get_page_type(v.frames, mfn, PageType.WRITABLE):
            return neg(Errno.EINVAL), None
        plain_write(v, req.maddr, req.val)
        put_page_type(v.frames, mfn)
        return 0, None
    level = page.type.level
    if level is Level.L1:
        return mod_l1_entry(v, req.maddr, req.val, mfn, preserve_ad, pg_owner), level
    if level is not None:
        if pg_owner is not v.domain:
            return neg(Errno.EINVAL), None
        return mod_upper_entry(v, req.maddr, req.val, mfn, level, preserve_ad), level
    if page.type is PageType.WRITABLE:
        plain_write(v, req.maddr, req.val)
        return 0, None
    return neg(Errno.EINVAL), None


def machphys_update(v: PvVcpu, req: MmuUpdate, pg_owner: Domain) -> int:
    """MMU_MACHPHYS_UPDATE: set M2P[frame] = val for a frame the data owner owns
    (``set_gpfn_from_mfn``). The guest keeps its own P2M; Xen edits only the M2P."""
    if not xsm_target_allowed(v.domain, pg_owner):
        return neg(Errno.EPERM)
    mfn = MFN(req.ptr >> PAGE_SHIFT)
    if not v.frames.owned_by(mfn, pg_owner):
        return neg(Errno.EINVAL)  # "Could not get page for mach->phys update"
    v.machine.m2p[mfn] = GFN(req.val)
    return 0


def plain_write(v: PvVcpu, maddr: int, value: int) -> None:
    """A store into a frame that is no page table (``paging_write_guest_entry``,
    xen/arch/x86/mm.c 4190, 4201): ``value`` as given — MMU_PT_UPDATE_PRESERVE_AD
    keeps A/D only in page-table entries (``update_intpte``)."""
    v.machine.mem.write_u64(maddr, value)


def update_entry(v: PvVcpu, maddr: int, new: int, preserve_ad: bool) -> None:
    """``UPDATE_ENTRY`` / ``update_intpte``: the store, keeping the A/D bits already
    set when asked (MMU_PT_UPDATE_PRESERVE_AD)."""
    mem = v.machine.mem
    if preserve_ad:
        new |= mem.read_u64(maddr) & int(PteFlag.A | PteFlag.D)
    mem.write_u64(maddr, new)


def mod_l1_entry(v: PvVcpu, maddr: int, new: int, table: MFN, preserve_ad: bool, pg_owner: Domain) -> int:
    """``mod_l1_entry``: a new present entry must pass the L1 flag check and is
    rewritten as Xen stores it (:func:`.adjust.adjust_guest_l1e`); if only
    whitelisted bits changed (same frame, same P/RW/cache bits) it is written
    without re-validation (the fast path); otherwise ``get_page_from_l1e`` takes its
    references, and the old entry's references are dropped after the write."""
    old = v.machine.mem.read_u64(maddr)
    if present(new):
        if new & l1_disallow_mask(cache_flush_permitted(v.domain)):
            return neg(Errno.EINVAL)  # "Bad L1 flags"
        new = adjust_guest_l1e(new)
        if not entry_has_changed(old, new, FASTPATH_FLAG_WHITELIST):
            v.frames.stats[PvStat.FAST_PATH] += 1
            update_entry(v, maddr, new, preserve_ad)
            return 0
        rc = get_page_from_l1e(v.frames, new, v.domain, pg_owner)
        if rc < 0:
            return rc
        new ^= rc  # I/O memory: "l1e_flip_flags(nl1e, rc)"
    update_entry(v, maddr, new, preserve_ad)
    put_page_from_l1e(v.frames, old)
    return 0


def mod_upper_entry(v: PvVcpu, maddr: int, new: int, table: MFN, level: Level, preserve_ad: bool) -> int:
    """``mod_l2_entry`` / ``mod_l3_entry`` / ``mod_l4_entry``: Xen's own L4 slots are
    refused (-EINVAL); a new present entry must pass the flag check and gains Xen's
    bits (:func:`.adjust.adjust_guest_upper`); the fast path
    as for L1 (RW is not whitelisted: linear page tables depend on it); otherwise the
    new target is referenced (validating it), then the old one released — deferred
    (``PTF_defer``: :attr:`PvVcpu.old_guest_table`, see the module docstring)."""
    slot = (maddr & ((1 << PAGE_SHIFT) - 1)) // 8
    if level is Level.L4 and not is_guest_l4_slot(slot):
        return neg(Errno.EINVAL)  # "L4 update in Xen-private area"
    old = v.machine.mem.read_u64(maddr)
    if present(new):
        if new & UPPER_DISALLOW_MASK:
            return neg(Errno.EINVAL)  # "Bad L2/L3/L4 flags"
        new = adjust_guest_upper(new, level)
        if not entry_has_changed(old, new, FASTPATH_PDE_FLAG_WHITELIST):
            v.frames.stats[PvStat.FAST_PATH] += 1
            update_entry(v, maddr, new, preserve_ad)
            return 0
        rc = get_page_from_upper_entry(v.frames, new, level, table, v.domain)
        if rc:
            return rc
    update_entry(v, maddr, new, preserve_ad)
    defer_put_from_upper_entry(v, old, table)
    return 0


def defer_put_from_upper_entry(v: PvVcpu, old: int, table: MFN) -> None:
    """``put_page_from_l[234]e(old, mfn, PTF_defer)`` -> ``put_pt_page``: an entry
    that held a reference (present, not mapping its own table) leaves it to
    ``put_old_guest_table``."""
    if present(old) and entry_mfn(old) != table:
        assert v.old_guest_table is None, "a second deferred put in one invocation"
        v.old_guest_table = (MFN(entry_mfn(old)), table)
