"""Xen's PV MMU hypercalls, one request at a time (xen/arch/x86/mm.c: ``do_mmu_update``,
``mod_l1_entry``, ``mod_l[234]_entry``, ``do_mmuext_op``, ``new_guest_cr3``,
``__do_update_va_mapping``; the Python counterpart is :mod:`refmodel.hv.pv`).

Page types, as the specs see them (:mod:`specs.state`): ``ptype`` is the frame's
type, ``validated`` says a page-table type is *in use* (type count above zero, the
table validated). Three pieces of Xen's behaviour are choices the spec leaves open,
constrained by the rules Xen follows (the Python model makes one choice; the tie
tests check it satisfies the constraints):

- **N** (newly validated, frame -> level): taking a page-table type reference on a
  frame whose type is not in use validates it, and recursively every table its
  entries reference (``promote_lN_table`` -> ``get_page_from_lNe``). N is the set of
  frames so validated; each must be the caller's, not in use, not a page still
  writably mapped, and every guest entry of it must pass the per-entry rule of its
  level, where a referenced table counts as valid if it already is, or is itself in
  N at the level below.
- **W** (frames that take the *writable* type): the RW targets of new L1 entries.
- **D** (de-validated): dropping the last type reference of a table de-validates it
  and, cascading, the tables only it referenced (``demote_lN_table``). D may contain
  only validated tables that nothing references any more — no pin, no vCPU base,
  no entry of a table still validated.

And the TLB: when a frame changes type Xen flushes any TLB that may still hold a
writable mapping of it (``_get_page_type``'s ``tlbflush_filter``); the spec asks
only that no writable TLB entry maps a frame of N afterwards (``keep``).

Xen's hypercalls run as consecutive steps, each leaving the invariants true (other
CPUs may look at any point), and the spec has one transition per step:

- ``mmu_update`` of an L2..L4 entry = :func:`pv_get_type` (the new entry's type
  reference, validating) ; :func:`pv_mmu_update_upper` (the store) ;
  :func:`pv_put_type` (the old entry's reference dropped, de-validating);
- ``mmu_update`` of an L1 entry = :func:`pv_mmu_update_l1`; of an untyped frame =
  :func:`pv_mmu_update_plain`;
- ``MMUEXT_PIN_Lx_TABLE`` = :func:`pv_get_type` ; :func:`pv_pin`;
  ``MMUEXT_UNPIN_TABLE`` = :func:`pv_unpin` ; :func:`pv_put_type`;
  ``MMUEXT_NEW_BASEPTR`` = :func:`pv_get_type` ; :func:`pv_new_baseptr` ;
  :func:`pv_put_type`;
- ``MMUEXT_TLB_FLUSH_LOCAL``, ``MMUEXT_INVLPG_LOCAL`` and ``update_va_mapping``
  (finding the L1, ``mod_l1_entry``, then the flush asked for) are one step each.

Not modelled: privileged (foreign) data owners, MMU_PT_UPDATE_PRESERVE_AD (it
changes only A/D bits), MMU_MACHPHYS_UPDATE (the M2P plays no part in isolation),
the vCPU-bitmap flush scopes (a PV vCPU here is its domain's only vCPU), and the
one-level-deep limit on linear page tables (``linear_pt_count``): the spec allows
linear entries at any depth, a superset of Xen's behaviours.
"""

import z3

from . import words as w
from .state import DomMode, PageType, Sort, State, with_fields
from .steps import Param, Step, Transition
from .tlb import REG_CR3, drop
from .words import Expr

# -- flag rules (xen/arch/x86/mm.c arch_init_memory; asm/x86_64/page.h) --------------------------

#: ``get_pte_flags`` keeps pte bits 11:0 and 63:52.
PTE_FLAG_BITS = 0xFFF | (0xFFF << 52)
PTE_ADDR_BITS = ((1 << 52) - 1) & ~0xFFF
_P, _RW, _US, _A, _D = (1 << b for b in (w.P, w.RW, w.US, w.A, w.D))
#: "PRESENT, R/W, USER, A/D, AVAIL[0,1,2], AVAIL_HIGH, NX" (``base_disallow_mask``).
BASE_ALLOWED = _P | _RW | _US | _A | _D | (0x7 << 9) | (0x7FF << 52) | (1 << 63)
#: L2..L4 entries: PWT, PCD, PSE and G refused (no superpages for PV).
UPPER_DISALLOW = PTE_FLAG_BITS & ~BASE_ALLOWED
#: ``L1_DISALLOW_MASK``: the base mask with G allowed (cache attributes need I/O
#: privilege, which no modelled domain has).
L1_DISALLOW = UPPER_DISALLOW & ~(1 << w.G)
#: ``_PAGE_GUEST_KERNEL`` (pte bit 52) and G: the bits ``adjust_guest_l1e`` adds.
_GUEST_KERNEL, _G = 1 << 52, 1 << w.G
#: ``FASTPATH_FLAG_WHITELIST``: NX, AVAIL_HIGH, AVAIL, G, D, A, US.
FASTPATH_WHITELIST = (1 << 63) | (0x7FF << 52) | (0x7 << 9) | (1 << w.G) | _D | _A | _US

#: ``ROOT_PAGETABLE_FIRST_XEN_SLOT`` .. ``LAST``: L4 slots Xen keeps for itself.
FIRST_XEN_SLOT, LAST_XEN_SLOT = 256, 271
#: ``__addr_ok``: linear pages below 2^47, or at or above ``HYPERVISOR_VIRT_END``.
HYPERVISOR_VIRT_END_VPN = (0xFFFF_8800_0000_0000 >> 12) & ((1 << w.VPN_BITS) - 1)
LOWER_HALF_END_VPN = 1 << 35

NONE_T, L1_T, L2_T, L4_T, WRITABLE_T = (
    z3.BitVecVal(int(t), w.PTYPE_BITS) for t in (PageType.NONE, PageType.L1, PageType.L2, PageType.L4, PageType.WRITABLE)
)


def _ptv(n: int) -> Expr:
    return z3.BitVecVal(n, w.PTYPE_BITS)


def l1_flags_ok(e: Expr) -> Expr:
    return e & w.word(L1_DISALLOW) == 0


def upper_flags_ok(e: Expr) -> Expr:
    return e & w.word(UPPER_DISALLOW) == 0


def fast_path(old: Expr, new: Expr) -> Expr:
    """``lNe_has_changed`` is false: same frame, and only whitelisted flags differ —
    written without re-validation (``mod_l1_entry``; for L2..L4 the same list with
    CONFIG_PV_LINEAR_PT, RW never whitelisted)."""
    return (old ^ new) & w.word(PTE_ADDR_BITS | (PTE_FLAG_BITS & ~FASTPATH_WHITELIST)) == 0


def xen_slot(index: Expr) -> Expr:
    return z3.And(z3.UGE(index, FIRST_XEN_SLOT), z3.ULE(index, LAST_XEN_SLOT))


def guest_slot(level: Expr, index: Expr) -> Expr:
    """``is_guest_lN_slot``: every slot, except Xen's 256..271 of an L4."""
    return z3.Not(z3.And(level == L4_T, xen_slot(index)))


def addr_ok(vpn: Expr) -> Expr:
    return z3.Or(z3.ULT(vpn, LOWER_HALF_END_VPN), z3.UGE(vpn, HYPERVISOR_VIRT_END_VPN))


# -- references -------------------------------------------------------------------------------


def not_rw_mapped_if_new(s: State, n: Expr) -> Expr:
    """No frame of N is writably mapped: every present RW entry of a validated L1
    table holds a writable type reference on its target (its type count is above
    zero), so that target cannot take a page-table type."""
    return s.forall(
        Sort.KEY, "rk",
        lambda k: z3.Implies(
            z3.And(s.validated[w.key_frame(k)], s.ptype[w.key_frame(k)] == L1_T, w.present(s.mem[k]), w.writable(s.mem[k])),
            n[w.target(s.mem[k])] == 0,
        ),
    )


def typed(s: State, n: Expr, g: Expr, level: Expr) -> Expr:
    """After this step, ``g`` is a validated table of ``level``: it already was,
    or it is newly validated (in N) at that level."""
    return z3.Or(z3.And(s.validated[g], s.ptype[g] == level), n[g] == level)


def linear_ok(s: State, e: Expr, table: Expr, level: Expr, dom: Expr) -> Expr:
    """``get_lN_linear_pagetable``: a read-only entry may reference its own table,
    or another validated table of the same level and domain."""
    t = w.target(e)
    same = z3.And(s.owner[t] == dom, s.validated[t], s.ptype[t] == level)
    return z3.And(z3.Not(w.writable(e)), z3.Or(t == table, same))


def l1e_ok(s: State, n: Expr, e: Expr, dom: Expr) -> Expr:
    """``get_page_from_l1e`` for a present entry: allowed flags, a frame the domain
    owns, and for RW a frame that can take the writable type (not a table in use,
    not one being validated now)."""
    t = w.target(e)
    writable_ok = z3.And(n[t] == 0, z3.Or(s.ptype[t] == WRITABLE_T, z3.Not(s.validated[t])))
    return z3.And(l1_flags_ok(e), s.owner[t] == dom, z3.Implies(w.writable(e), writable_ok))


def upper_ok(s: State, n: Expr, e: Expr, table: Expr, level: Expr, dom: Expr) -> Expr:
    """``get_page_from_l[234]e`` for a present entry: allowed flags, and a frame of
    the domain that is (or becomes) a validated table one level down — or a linear
    entry."""
    t = w.target(e)
    below = z3.And(s.owner[t] == dom, typed(s, n, t, level - 1))
    return z3.And(upper_flags_ok(e), z3.Or(below, linear_ok(s, e, table, level, dom)))


def entry_ok(s: State, n: Expr, e: Expr, table: Expr, level: Expr, dom: Expr) -> Expr:
    return z3.Or(
        z3.Not(w.present(e)),
        z3.If(level == L1_T, l1e_ok(s, n, e, dom), upper_ok(s, n, e, table, level, dom)),
    )


def validation_choice(s: State, n: Expr, wr: Expr, dom: Expr) -> Expr:
    """The constraints on N (newly validated tables) and W (frames newly typed
    writable) — ``promote_lN_table`` over the whole new subtree."""
    frames = s.forall(
        Sort.FRAME, "nf",
        lambda g: z3.And(
            z3.Implies(n[g] != 0, z3.And(z3.ULE(n[g], int(PageType.L4)), s.owner[g] == dom, z3.Not(s.validated[g]))),
            z3.Implies(wr[g], z3.And(n[g] == 0, z3.Not(s.validated[g]), s.owner[g] == dom)),
        ),
    )
    entries = s.forall(
        Sort.KEY, "nk",
        lambda k: z3.Implies(
            z3.And(n[w.key_frame(k)] != 0, guest_slot(n[w.key_frame(k)], w.key_index(k))),
            z3.And(
                entry_ok(s, n, s.mem[k], w.key_frame(k), n[w.key_frame(k)], dom),
                z3.Implies(
                    z3.And(n[w.key_frame(k)] == L1_T, w.present(s.mem[k]), w.writable(s.mem[k])),
                    z3.Or(s.ptype[w.target(s.mem[k])] == WRITABLE_T, wr[w.target(s.mem[k])]),
                ),
            ),
        ),
    )
    return z3.And(frames, entries, not_rw_mapped_if_new(s, n))


def retyped(s: State, n: Expr, wr: Expr) -> Expr:
    """Page types after validation: N's levels, W writable."""
    return w.lam(w.FrameS, "tf", lambda g: z3.If(n[g] != 0, n[g], z3.If(wr[g], WRITABLE_T, s.ptype[g])))


def clear_xen_slots(mem: Expr, n: Expr) -> Expr:
    """A newly validated table's entries as ``promote_lN_table`` leaves them: each
    rewritten by :func:`adjust_guest_entry`, and for an L4 slots 256..271 Xen's
    (``init_xen_l4_slots``; the model writes them not present)."""
    def entry(k: Expr) -> Expr:
        level = n[w.key_frame(k)]
        return z3.If(
            level == 0, mem[k],
            z3.If(z3.And(level == L4_T, xen_slot(w.key_index(k))), w.word(0), adjust_guest_entry(mem[k], level)),
        )
    return w.lam(w.KeyS, "xk", entry)


def adjust_guest_l1e(e: Expr) -> Expr:
    """``adjust_guest_l1e`` (xen/arch/x86/pv/mm.h 89-109; refmodel/hv/pv/adjust.py):
    a present kernel entry (no U) gains U and ``_PAGE_GUEST_KERNEL``; then one
    without ``_PAGE_GUEST_KERNEL`` gains G and U."""
    kernel = z3.If(e & w.word(_US) == 0, e | w.word(_GUEST_KERNEL | _US), e)
    user = z3.If(kernel & w.word(_GUEST_KERNEL) == 0, kernel | w.word(_G | _US), kernel)
    return z3.If(w.present(e), user, e)


def adjust_guest_entry(e: Expr, level: Expr) -> Expr:
    """``adjust_guest_l1e`` .. ``adjust_guest_l4e``: L1 as above; a present L2/L3
    entry gains U, a present L4 entry A and U."""
    upper = e | w.word(_US) | z3.If(level == L4_T, w.word(_A), w.word(0))
    return z3.If(level == L1_T, adjust_guest_l1e(e), z3.If(w.present(e), upper, e))


def devalidation_choice(post: State, d: Expr, pre: State) -> Expr:
    """The constraints on D: only tables validated before, and only those nothing
    references afterwards — no pin, no PV vCPU's base, no present entry of a table
    still validated (a linear one included)."""
    frames = post.forall(
        Sort.FRAME, "df", lambda g: z3.Implies(d[g], z3.And(pre.validated[g], z3.Not(post.pinned[g])))
    )
    bases = post.forall(
        Sort.VCPU, "dv", lambda v: z3.Implies(post.is_mode(v, DomMode.PV), z3.Not(d[post.vcpu_base[v]]))
    )
    refs = post.forall(
        Sort.KEY, "dk",
        lambda k: z3.Implies(
            z3.And(
                post.validated[w.key_frame(k)], z3.UGE(post.ptype[w.key_frame(k)], int(PageType.L2)),
                w.present(post.mem[k]), w.target(post.mem[k]) != w.key_frame(k),
            ),
            z3.Not(d[w.target(post.mem[k])]),
        ),
    )
    return z3.And(frames, bases, refs)


def tlb_after_retype(s: State, n: Expr, keep: Expr) -> Expr:
    """The TLB after a type change: any subset of the entries (Xen's flushes are
    filtered by timestamps), as long as no writable entry maps a frame of N."""
    return w.lam(w.SlotS, "kx", lambda x: z3.And(s.tlb_valid[x], keep[x]))


def no_rw_to_new_tables(post: State, n: Expr) -> Expr:
    return post.forall(
        Sort.SLOT, "kx",
        lambda x: z3.Implies(z3.And(post.tlb_valid[x], post.tlb_w[x]), n[post.tlb_frame[x]] == 0),
    )


# -- type references: taking one (validating), dropping them (de-validating) --------------------


def without_tables(a: dict[str, Expr]) -> dict[str, Expr]:
    """No table newly validated: the choice a path without page-table type
    references makes (an L1 update, a plain write)."""
    return dict(a, n=z3.K(w.FrameS, z3.BitVecVal(0, w.PTYPE_BITS)))


def with_types(s: State, a: dict[str, Expr], mem: Expr) -> tuple[State, Expr]:
    """Apply N and W (validation, retyping) and the TLB choice to ``s`` with new
    memory ``mem``; returns the post-state and the choice constraints."""
    n, wr, keep = a["n"], a["wr"], a["keep"]
    post = with_fields(
        s,
        mem=clear_xen_slots(mem, n),
        ptype=retyped(s, n, wr),
        validated=w.lam(w.FrameS, "vf", lambda g: z3.Or(s.validated[g], n[g] != 0)),
        tlb_valid=tlb_after_retype(s, n, keep),
    )
    return post, z3.And(validation_choice(s, n, wr, s.cur_dom), no_rw_to_new_tables(post, n))


def pv_get_type(s: State, a: dict[str, Expr]) -> Step:
    """``_get_page_type(frame, L<level>)`` taking a new type reference for the
    running PV vCPU — the first step of a pin, of NEW_BASEPTR, and of installing an
    L2..L4 entry. The frame must be the caller's; it succeeds if the frame already is
    a validated table of that level, or if its type is not in use and it validates:
    then it and every table below it not yet validated are validated (N), the RW
    targets of their L1 entries take the writable type (W), and no writable TLB entry
    of a newly validated frame survives (Xen's type-change flush)."""
    f, level = a["frame"], a["level"]
    ok = z3.And(
        s.is_mode(s.cur, DomMode.PV), s.owner[f] == s.cur_dom,
        z3.UGE(level, int(PageType.L1)), z3.ULE(level, int(PageType.L4)), typed(s, a["n"], f, level),
    )
    post, choice = with_types(s, a, s.mem)
    return Step(ok=ok, post=post, choice=choice)


def pv_put_type(s: State, a: dict[str, Expr]) -> Step:
    """``_put_page_type`` after a reference was given up (an unpin, a replaced
    entry or base): every table whose last type reference went is de-validated,
    cascading through the references its entries held (``demote_lN_table``). D is
    that set: validated tables nothing references any more."""
    d = a["dv"]
    post = with_fields(s, validated=w.lam(w.FrameS, "vf", lambda g: z3.And(s.validated[g], z3.Not(d[g]))))
    return Step(ok=s.is_mode(s.cur, DomMode.PV), post=post, choice=devalidation_choice(post, d, s))


# -- mmu_update ---------------------------------------------------------------------------------


def mod_l1(s: State, a: dict[str, Expr], table: Expr, index: Expr, new: Expr) -> tuple[Expr, Expr]:
    """``mod_l1_entry``: (success, W-constraint). Fast path, or a new present entry
    that passes ``get_page_from_l1e``; the RW target takes the writable type."""
    dom = s.cur_dom
    old = s.mem[w.key(table, index)]
    n, wr = a["n"], a["wr"]
    stored = adjust_guest_l1e(new)
    ok = z3.Or(
        z3.Not(w.present(new)),
        z3.And(l1_flags_ok(new), z3.Or(fast_path(old, stored), l1e_ok(s, n, stored, dom))),
    )
    takes_writable = z3.And(w.present(new), z3.Not(fast_path(old, stored)), w.writable(new))
    t = w.target(new)
    return ok, z3.Implies(takes_writable, z3.Or(s.ptype[t] == WRITABLE_T, wr[t]))


def _mmu_update_guard(s: State, a: dict[str, Expr]) -> Expr:
    """Common to every MMU_NORMAL_PT_UPDATE: a PV vCPU, and the frame holding the
    entry is the caller's (else -EINVAL, "Could not get page for normal update")."""
    return z3.And(s.is_mode(s.cur, DomMode.PV), s.owner[a["table"]] == s.cur_dom)


def pv_mmu_update_plain(s: State, a: dict[str, Expr]) -> Step:
    """MMU_NORMAL_PT_UPDATE of a frame whose type is not in use (not a validated
    table): ``page_lock`` fails, so Xen takes it as a writable page for the store —
    the frame takes the writable type (W) — and writes the value unchecked."""
    a = without_tables(a)
    table, index, value = a["table"], a["index"], a["value"]
    ok = z3.And(_mmu_update_guard(s, a), z3.Not(s.validated[table]))
    post, choice = with_types(s, a, z3.Store(s.mem, w.key(table, index), value))
    return Step(ok=ok, post=post, choice=z3.And(choice, z3.Or(s.ptype[table] == WRITABLE_T, a["wr"][table])))


def pv_mmu_update_l1(s: State, a: dict[str, Expr]) -> Step:
    """MMU_NORMAL_PT_UPDATE of an entry of a validated L1 table: ``mod_l1_entry``
    — a not-present value, the fast path (same frame, only whitelisted flags
    changed), or a new entry passing ``get_page_from_l1e`` (its RW target takes the
    writable type, W). The old entry's writable reference, if any, is dropped
    (a writable page stays writable; nothing is de-validated)."""
    a = without_tables(a)
    table, index, value = a["table"], a["index"], a["value"]
    l1_ok, l1_w = mod_l1(s, a, table, index, value)
    ok = z3.And(_mmu_update_guard(s, a), s.validated[table], s.ptype[table] == L1_T, l1_ok)
    post, choice = with_types(s, a, z3.Store(s.mem, w.key(table, index), adjust_guest_l1e(value)))
    return Step(ok=ok, post=post, choice=z3.And(choice, l1_w))


def pv_mmu_update_upper(s: State, a: dict[str, Expr]) -> Step:
    """MMU_NORMAL_PT_UPDATE of an entry of a validated L2..L4 table, once the new
    entry's type reference is held (``mod_l[234]_entry`` after
    ``get_page_from_l[234]e`` — :func:`pv_get_type` — and before the old entry's
    reference is dropped — :func:`pv_put_type`): Xen's L4 slots are refused; a new
    present entry has allowed flags and takes the fast path, references a validated
    table one level down of the caller, or is a read-only linear entry. The store.
    Xen's flush at the end of the batch may drop any TLB entries (``keep``)."""
    table, index, new = a["table"], a["index"], a["value"]
    level = s.ptype[table]
    old = s.mem[w.key(table, index)]
    t = w.target(new)
    stored = adjust_guest_entry(new, level)
    below = z3.And(s.owner[t] == s.cur_dom, s.validated[t], s.ptype[t] == level - 1)
    ok_new = z3.Or(
        z3.Not(w.present(new)),
        z3.And(upper_flags_ok(new), z3.Or(fast_path(old, stored), below, linear_ok(s, new, table, level, s.cur_dom))),
    )
    ok = z3.And(
        _mmu_update_guard(s, a), s.validated[table], z3.UGE(level, int(PageType.L2)),
        guest_slot(level, index), ok_new,
    )
    post = with_fields(
        s,
        mem=z3.Store(s.mem, w.key(table, index), stored),
        tlb_valid=w.lam(w.SlotS, "ux", lambda x: z3.And(s.tlb_valid[x], a["keep"][x])),
    )
    return Step(ok=ok, post=post)


# -- mmuext_op ----------------------------------------------------------------------------------


def pv_pin(s: State, a: dict[str, Expr]) -> Step:
    """MMUEXT_PIN_L<level>_TABLE, once the type reference is held
    (:func:`pv_get_type`): the frame is the caller's validated table of that level
    and not pinned already (-EINVAL: the reference is given back); the pin keeps
    the reference."""
    f, level = a["frame"], a["level"]
    ok = z3.And(
        s.is_mode(s.cur, DomMode.PV), s.owner[f] == s.cur_dom,
        s.validated[f], s.ptype[f] == level, z3.Not(s.pinned[f]),
    )
    return Step(ok=ok, post=with_fields(s, pinned=z3.Store(s.pinned, f, True)))


def pv_unpin(s: State, a: dict[str, Expr]) -> Step:
    """MMUEXT_UNPIN_TABLE: the frame must be the caller's and pinned (-EINVAL); the
    pin's reference is given up (what that de-validates is :func:`pv_put_type`)."""
    f = a["frame"]
    ok = z3.And(s.is_mode(s.cur, DomMode.PV), s.owner[f] == s.cur_dom, s.pinned[f])
    return Step(ok=ok, post=with_fields(s, pinned=z3.Store(s.pinned, f, False)))


def pv_new_baseptr(s: State, a: dict[str, Expr]) -> Step:
    """MMUEXT_NEW_BASEPTR (``new_guest_cr3``), once the L4 reference on the new base
    is held (:func:`pv_get_type`): the caller's validated L4 becomes the vCPU's base;
    CR3 is loaded — flushing this vCPU's non-global entries of its PCID (SDM
    4.10.4.1); the old base's reference is given up (:func:`pv_put_type`)."""
    v, f = s.cur, a["frame"]
    ok = z3.And(s.is_mode(v, DomMode.PV), s.owner[f] == s.cur_dom, s.validated[f], s.ptype[f] == L4_T)
    cr3 = z3.Concat(z3.BitVecVal(0, 12), f, z3.BitVecVal(0, 12))
    post = with_fields(
        drop(s, lambda x: z3.And(s.tlb_vpid[x] == s.vcpu_vpid[v], s.tlb_pcid[x] == s.vcpu_pcid[v], z3.Not(s.tlb_g[x]))),
        vcpu_base=z3.Store(s.vcpu_base, v, f),
        regs=z3.Store(s.regs, REG_CR3, cr3),
        ghost=z3.Store(s.ghost, v, z3.Store(s.ghost[v], REG_CR3, cr3)),
    )
    return Step(ok=ok, post=post)


def pv_flush_local(s: State, a: dict[str, Expr]) -> Step:
    """MMUEXT_TLB_FLUSH_LOCAL (``flush_tlb_local``): every non-global entry of this
    vCPU's tag."""
    v = s.cur
    return Step(
        ok=s.is_mode(v, DomMode.PV),
        post=drop(s, lambda x: z3.And(s.tlb_vpid[x] == s.vcpu_vpid[v], z3.Not(s.tlb_g[x]))),
    )


def invlpg_here(s: State, vpn: Expr) -> State:
    """INVLPG of ``vpn`` on the running vCPU (SDM 4.10.4.1)."""
    v = s.cur
    return drop(
        s,
        lambda x: z3.And(
            s.tlb_vpid[x] == s.vcpu_vpid[v], s.tlb_vpn[x] == vpn, z3.Or(s.tlb_pcid[x] == s.vcpu_pcid[v], s.tlb_g[x])
        ),
    )


def pv_invlpg_local(s: State, a: dict[str, Expr]) -> Step:
    """MMUEXT_INVLPG_LOCAL: INVLPG of one page (a canonical address: every linear
    page number here is one)."""
    return Step(ok=s.is_mode(s.cur, DomMode.PV), post=invlpg_here(s, a["vpn"]))


def pv_update_va_mapping(s: State, a: dict[str, Expr]) -> Step:
    """``update_va_mapping(va, value, flags)``: find the L1 entry for ``va`` through
    the current tables (``map_guest_l1e``: an acceptable address, L4, L3 and L2
    entries present, the L2 entry without PSE); the frame must be the caller's
    validated L1 (-EINVAL); ``mod_l1_entry`` as for mmu_update; then, only on
    success, the flush asked for (0 none, 1 UVMF_TLB_FLUSH, 2 UVMF_INVLPG, local
    scope)."""
    a = without_tables(a)
    v, vpn, value, kind = s.cur, a["vpn"], a["value"], a["flush"]
    e4 = s.mem[w.key(s.vcpu_base[v], w.vpn_index(vpn, 4))]
    e3 = s.mem[w.key(w.target(e4), w.vpn_index(vpn, 3))]
    e2 = s.mem[w.key(w.target(e3), w.vpn_index(vpn, 2))]
    table, index = w.target(e2), w.vpn_index(vpn, 1)
    found = z3.And(addr_ok(vpn), w.present(e4), w.present(e3), w.present(e2), z3.Not(w.large(e2)))
    l1_ok, l1_w = mod_l1(s, a, table, index, value)
    ok = z3.And(
        s.is_mode(v, DomMode.PV), found, s.owner[table] == s.cur_dom,
        s.validated[table], s.ptype[table] == L1_T, l1_ok,
    )
    post, choice = with_types(s, a, z3.Store(s.mem, w.key(table, index), adjust_guest_l1e(value)))
    flushed = drop(post, lambda x: z3.And(post.tlb_vpid[x] == s.vcpu_vpid[v], z3.Not(post.tlb_g[x])))
    invlpged = invlpg_here(post, vpn)
    post = with_fields(
        post,
        tlb_valid=z3.If(kind == 1, flushed.tlb_valid, z3.If(kind == 2, invlpged.tlb_valid, post.tlb_valid)),
    )
    return Step(ok=ok, post=post, choice=z3.And(choice, l1_w))


# -- the table ------------------------------------------------------------------------------------

_B = z3.BoolSort()
N_ = Param("n", z3.ArraySort(w.FrameS, w.PtypeS), True)
W_ = Param("wr", z3.ArraySort(w.FrameS, _B), True)
D_ = Param("dv", z3.ArraySort(w.FrameS, _B), True)
KEEP_ = Param("keep", z3.ArraySort(w.SlotS, _B), True)
_IDX = z3.BitVecSort(w.INDEX_BITS)
_ENTRY = (Param("table", w.FrameS), Param("index", _IDX), Param("value", w.Word))

TRANSITIONS: tuple[Transition, ...] = (
    Transition("pv_get_type", "pv", (Param("frame", w.FrameS), Param("level", w.PtypeS), N_, W_, KEEP_), pv_get_type),
    Transition("pv_put_type", "pv", (D_,), pv_put_type),
    Transition("pv_mmu_update_plain", "pv", (*_ENTRY, W_, KEEP_), pv_mmu_update_plain),
    Transition("pv_mmu_update_l1", "pv", (*_ENTRY, W_, KEEP_), pv_mmu_update_l1),
    Transition("pv_mmu_update_upper", "pv", (*_ENTRY, KEEP_), pv_mmu_update_upper),
    Transition("pv_pin", "pv", (Param("frame", w.FrameS), Param("level", w.PtypeS)), pv_pin),
    Transition("pv_unpin", "pv", (Param("frame", w.FrameS),), pv_unpin),
    Transition("pv_new_baseptr", "pv", (Param("frame", w.FrameS),), pv_new_baseptr),
    Transition("pv_flush_local", "pv", (), pv_flush_local),
    Transition("pv_invlpg_local", "pv", (Param("vpn", w.VpnS),), pv_invlpg_local),
    Transition(
        "pv_update_va_mapping", "pv",
        (Param("vpn", w.VpnS), Param("value", w.Word), Param("flush", z3.BitVecSort(2)), W_, KEEP_),
        pv_update_va_mapping,
    ),
)
