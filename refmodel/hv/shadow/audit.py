"""Audits of a shadow backend's state — Xen's ``shadow_audit_tables`` and
``sh_audit_l1_table`` & co. (xen/arch/x86/mm/shadow/multi.c, SHADOW_AUDIT), as
predicates that return the violations they find (empty: all holds).

:func:`shadow_sound` is the safety property: whatever the hardware can reach through
the shadows is something the guest's own tables (composed with the P2M) grant, only
the domain's own frames, and never a write to a page table the hypervisor relies on
being write-protected. An out-of-sync L1 is judged against its snapshot: its shadow
may lag behind the guest's entries (like a TLB) but never beyond what the guest
granted when it was last synced.

:func:`shadow_in_sync` is the stronger design invariant of :mod:`.backend`: every
entry of an in-sync shadow *equals* the propagation of its guest entry.
"""

from ...arch.pte import Level, PteFlag, entry_frame_address
from ...arch.types import GFN, MFN, PAGE_SHIFT
from ...arch.walk import is_leaf
from ..machine import DOMID_XEN
from .backend import ShadowBackend
from .propagate import guest_entry_usable, shadow_leaf_entry, shadow_upper_entry
from .tables import ShadowPage


def shadow_sound(backend: ShadowBackend) -> list[str]:
    """Every violation of shadow soundness in ``backend``'s current state."""
    problems: list[str] = []
    for page in backend.shadows.pages():
        problems += _audit_page(backend, page)
    problems += _audit_root(backend)
    problems += _audit_oos(backend)
    problems += _audit_tlb(backend)
    return problems


def shadow_in_sync(backend: ShadowBackend) -> list[str]:
    """Shadow entries of in-sync tables that differ from what their guest entry
    propagates to (the only tolerated difference: a leaf made writable for a demand
    write to an out-of-sync frame, which its resync takes back)."""
    problems: list[str] = []
    for page in backend.shadows.pages():
        if backend.oos.find(page.gfn) is not None:
            continue
        shadow = backend.shadows.entries(page)
        for index, gentry in enumerate(backend.guest_entries(page.gfn)):
            want = _expected(backend, page, gentry)
            if shadow[index] != want and not _oos_write_grant(backend, page, shadow[index], want):
                problems.append(
                    f"{page.describe()}[{index}] = {shadow[index]:#x}, guest entry {gentry:#x} propagates to {want:#x}"
                )
    return problems


# -- one shadow table ------------------------------------------------------------------------------
def _reference_entries(backend: ShadowBackend, page: ShadowPage) -> tuple[int, ...]:
    """What the shadow must not exceed: the guest table, or an out-of-sync L1's snapshot."""
    oos = backend.oos.find(page.gfn)
    return tuple(oos.snapshot) if oos is not None else backend.guest_entries(page.gfn)


def _audit_page(backend: ShadowBackend, page: ShadowPage) -> list[str]:
    problems: list[str] = []
    if backend.domain.mfn_of(page.gfn) is None:
        problems.append(f"{page.describe()}: the domain has no such guest frame")
        return problems
    reference = _reference_entries(backend, page)
    for index, sentry in enumerate(backend.shadows.entries(page)):
        if not sentry & PteFlag.P:
            continue
        where = f"{page.describe()}[{index}]"
        if page.level is Level.L1:
            problems += _audit_leaf(backend, where, sentry, reference[index])
        else:
            problems += _audit_upper(backend, page.level, where, sentry, reference[index])
    return problems


def _rights_exceeded(sentry: int, gentry: int) -> list[str]:
    """Rights the shadow entry grants that the guest entry does not."""
    out = []
    if sentry & PteFlag.RW and not gentry & PteFlag.RW:
        out.append("writable")
    if sentry & PteFlag.US and not gentry & PteFlag.US:
        out.append("user")
    if gentry & PteFlag.XD and not sentry & PteFlag.XD:
        out.append("executable")
    return out


def _audit_leaf(backend: ShadowBackend, where: str, sentry: int, gentry: int) -> list[str]:
    machine = backend.machine
    problems: list[str] = []
    target = MFN(_frame(sentry, machine.mem.maxphyaddr))
    if machine.owner_of(target) != backend.domain.domid:
        problems.append(f"{where} maps mfn {target:#x}, which domain {backend.domain.domid} does not own")
    if not guest_entry_usable(gentry, Level.L1, backend.guest_context()):
        return problems + [f"{where} is present but the guest entry {gentry:#x} is not (or not yet accessed)"]
    gfn = _frame(gentry, machine.mem.maxphyaddr)
    if backend.domain.mfn_of(gfn) != target:
        problems.append(f"{where} maps mfn {target:#x}; the guest maps gfn {gfn:#x} -> {backend.domain.mfn_of(gfn)}")
    exceeded = _rights_exceeded(sentry, gentry)
    if sentry & PteFlag.RW and not gentry & PteFlag.D:
        exceeded.append("writable before the guest's D is set")
    if sentry & PteFlag.G and not gentry & PteFlag.G:
        exceeded.append("global")
    problems += [f"{where} is {what}; guest entry {gentry:#x} is not" for what in exceeded]
    mapped_gfn = machine.m2p.get(target)
    if sentry & PteFlag.RW and mapped_gfn is not None and backend.write_protected(mapped_gfn):
        problems.append(f"{where} maps write-protected page table gfn {mapped_gfn:#x} writable")
    return problems


def _audit_upper(backend: ShadowBackend, level: Level, where: str, sentry: int, gentry: int) -> list[str]:
    machine = backend.machine
    target = _frame(sentry, machine.mem.maxphyaddr)
    if machine.owner_of(target) != DOMID_XEN:
        return [f"{where} links mfn {target:#x}, which is not a hypervisor frame"]
    child = backend.shadows.by_smfn(target)
    if child is None or child.level is not Level(level - 1):
        return [f"{where} links mfn {target:#x}, which is not a shadow {Level(level - 1).name}"]
    ctx = backend.guest_context()
    if not guest_entry_usable(gentry, level, ctx) or is_leaf(gentry, level):
        return [f"{where} is present but the guest entry {gentry:#x} is not (or not yet accessed)"]
    problems = []
    if child.gfn != _frame(gentry, ctx.maxphyaddr):
        problems.append(f"{where} links the shadow of gfn {child.gfn:#x}; the guest entry references {gentry:#x}")
    problems += [f"{where} is {what}; guest entry {gentry:#x} is not" for what in _rights_exceeded(sentry, gentry)]
    return problems


# -- the rest of the state --------------------------------------------------------------------------
def _audit_root(backend: ShadowBackend) -> list[str]:
    root = backend.root
    if root is None:
        return []
    guest_root = GFN(backend.guest_state.cr3 >> PAGE_SHIFT)
    problems = []
    if (root.gfn, root.level) != (guest_root, Level.L4):
        problems.append(f"hardware CR3 holds {root.describe()}, the guest's CR3 is gfn {guest_root:#x}")
    hw_root = backend.mmu.state.cr3 >> PAGE_SHIFT
    if hw_root != root.smfn:
        problems.append(f"hardware CR3 frame {hw_root:#x} is not the shadow root {root.smfn:#x}")
    return problems


def _audit_oos(backend: ShadowBackend) -> list[str]:
    problems = []
    for page in backend.oos.pages():
        if backend.shadows.levels_of(page.gfn) != {Level.L1}:
            problems.append(f"out-of-sync gfn {page.gfn:#x} is shadowed at {sorted(backend.shadows.levels_of(page.gfn))}")
        if not backend.oos_enabled:
            problems.append(f"gfn {page.gfn:#x} is out of sync, but out-of-sync mode is off")
    return problems


def _audit_tlb(backend: ShadowBackend) -> list[str]:
    """The hardware TLB holds no usable writable translation of a write-protected
    page table, and (tagged) nothing of this vCPU outside the domain's frames."""
    machine = backend.machine
    problems = []
    for e in machine.tlb.entries():
        if e.vpid != backend.mmu.vpid:
            continue
        mfn = MFN(e.frame >> PAGE_SHIFT)
        owner = machine.owner_of(mfn)
        if owner != backend.domain.domid:
            if backend.tagged:
                problems.append(f"TLB entry for vpn {e.vpn:#x} of vpid {e.vpid} maps mfn {mfn:#x} of owner {owner}")
            continue
        gfn = machine.m2p.get(mfn)
        if e.rights.writable and e.dirty and gfn is not None and backend.write_protected(gfn):
            problems.append(f"TLB entry for vpn {e.vpn:#x} writes write-protected page table gfn {gfn:#x}")
    return problems


# -- helpers -------------------------------------------------------------------------------------------
def _frame(entry: int, maxphyaddr: int) -> int:
    """The frame number an entry references (an MFN in a shadow, a GFN in the guest's)."""
    return entry_frame_address(entry, maxphyaddr) >> PAGE_SHIFT


def _expected(backend: ShadowBackend, page: ShadowPage, gentry: int) -> int:
    """The propagation of ``gentry`` (:meth:`ShadowBackend.propagate`) without its
    side effects: referenced tables must already be shadowed."""
    ctx = backend.guest_context()
    if page.level is Level.L1:
        if not guest_entry_usable(gentry, Level.L1, ctx):
            return 0
        gfn = GFN(_frame(gentry, ctx.maxphyaddr))
        mfn = backend.domain.mfn_of(gfn)
        return 0 if mfn is None else shadow_leaf_entry(gentry, mfn, backend.shadows.is_shadowed(gfn))
    if not guest_entry_usable(gentry, page.level, ctx) or is_leaf(gentry, page.level):
        return 0
    child = backend.shadows.lookup(GFN(_frame(gentry, ctx.maxphyaddr)), Level(page.level - 1))
    return 0 if child is None else shadow_upper_entry(gentry, child.smfn)


def _oos_write_grant(backend: ShadowBackend, page: ShadowPage, actual: int, want: int) -> bool:
    """A leaf made writable for a demand write to an out-of-sync frame."""
    if page.level is not Level.L1 or not actual & PteFlag.RW:
        return False
    gfn = backend.machine.m2p.get(MFN(_frame(actual, backend.machine.mem.maxphyaddr)))
    return gfn is not None and gfn in backend.oos and actual & ~int(PteFlag.RW | PteFlag.D) == want
