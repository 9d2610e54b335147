"""The isolation invariants, as Z3 formulas over a :class:`~specs.state.State`.

Each invariant has two faces:

- its **statement** (``semantic``): what isolation means, in terms of every
  translation a domain can use — a walk of its page tables (PV), of its shadow
  tables (shadow), of its own tables composed with the EPT (HAP), or a TLB entry a
  vCPU of it can hit;
- its **inductive core** (``core``): the per-entry, per-frame clauses the hypervisor
  actually maintains (the rules Xen enforces entry by entry: page types, shadow
  write protection, P2M ownership, TLB tags). The core is what the transitions are
  proved to preserve; one lemma per invariant proves that the cores imply the
  statement, for every state.

Proof obligations (see :mod:`specs.proofs`): for every transition T and invariant I,
``Config ∧ Core ∧ T ⇒ Core_I'`` where ``Core`` is the conjunction of every
invariant's core (the standard way to prove a conjunction inductive clause by
clause), and once per invariant ``Config ∧ Core ⇒ Statement_I``.

``Config`` is the fixed configuration no transition changes: ordinary domain ids for
every vCPU, and, when the TLB is tagged, distinct VPIDs for vCPUs of different
domains.

Every quantifier ranges over all frames, entries, TLB slots, vCPUs and registers
(bit-vector indices: 2^40 frames, 2^16 slots, 2^8 vCPUs): nothing is bounded except
the widths themselves.
"""

from collections.abc import Callable
from dataclasses import dataclass

import z3

from . import words as w
from .state import DomMode, PageType, Sort, State
from .walks import hap_walk, machine_walk
from .words import Expr

Clause = tuple[str, Expr]

XEN = w.dom_val(w.DOMID_XEN)


def _lvl(n: int) -> Expr:
    return z3.BitVecVal(n, w.LEVEL_BITS)


def _pt(t: PageType) -> Expr:
    return z3.BitVecVal(int(t), w.PTYPE_BITS)


# -- configuration ---------------------------------------------------------------------------


def config(s: State) -> list[Clause]:
    """Fixed configuration: every vCPU belongs to an ordinary domain (not
    DOMID_XEN or another reserved id), and a tagged TLB gives vCPUs of different
    domains different VPIDs (Xen: one VPID per vCPU from a per-CPU allocator;
    refmodel: domain id + 1)."""
    ordinary = s.forall(Sort.VCPU, "cv", lambda v: z3.ULT(s.vcpu_dom[v], w.DOMID_FIRST_RESERVED))
    tags = s.forall2(
        Sort.VCPU, "cv1", Sort.VCPU, "cv2",
        lambda a, b: z3.Implies(z3.And(s.tagged, s.vcpu_dom[a] != s.vcpu_dom[b]), s.vcpu_vpid[a] != s.vcpu_vpid[b]),
    )
    return [("config.ordinary_domains", ordinary), ("config.distinct_tags", tags)]


# -- helpers over entries ---------------------------------------------------------------------


def _entries(s: State, name: str, body: Callable[[Expr, Expr, Expr], Expr]) -> Expr:
    """∀ entry address k: body(k, its table frame, its value)."""
    return s.forall(Sort.KEY, name, lambda k: body(k, w.key_frame(k), s.mem[k]))


def guest_entry_of_shadow(s: State, k: Expr) -> Expr:
    """The guest entry a shadow entry at ``k`` shadows: same index, in the guest
    table (the shadow's backpointer gfn, through the domain's P2M)."""
    f = w.key_frame(k)
    gmfn = w.target(s.p2m_entry(s.sh_dom[f], s.sh_back[f]))
    return s.mem[w.key(gmfn, w.key_index(k))]


# -- memory isolation -------------------------------------------------------------------------


def mi_core(s: State) -> list[Clause]:
    """Every machine frame a domain's translations can end in is its own:

    - P2M: every present EPT/P2M entry of domain d maps a frame d owns (Xen's
      ``guest_physmap_add_page`` only adds pages allocated to d);
    - PV: every present entry of a validated page table references a frame owned
      by the table's owner (``get_page_from_lNe`` takes a reference on a page of
      the page-table owner, xen/arch/x86/mm.c);
    - shadow: every present shadow L1 entry maps a frame of the shadowed domain;
    - TLB: every valid entry maps a frame owned by the domain it was filled for."""
    p2m = s.forall(
        Sort.P2M, "mp",
        lambda pk: z3.Implies(
            w.ept_present(s.p2m[pk]), s.owner[w.target(s.p2m[pk])] == z3.Extract(w.DOM_BITS + w.FRAME_BITS - 1, w.FRAME_BITS, pk)
        ),
    )
    pv = _entries(
        s, "mk",
        lambda k, f, e: z3.Implies(z3.And(s.validated[f], w.present(e)), s.owner[w.target(e)] == s.owner[f]),
    )
    sh = _entries(
        s, "mk",
        lambda k, f, e: z3.Implies(z3.And(s.sh_level[f] == _lvl(1), w.present(e)), s.owner[w.target(e)] == s.sh_dom[f]),
    )
    tlb = s.forall(Sort.SLOT, "ms", lambda x: z3.Implies(s.tlb_valid[x], s.owner[s.tlb_frame[x]] == s.filled_for(x)))
    return [("mi.p2m_owned", p2m), ("mi.pv_tables_owned", pv), ("mi.shadow_l1_owned", sh), ("mi.tlb_owned", tlb)]


def can_hit(s: State, x: Expr, v: Expr) -> Expr:
    """vCPU ``v`` can hit TLB slot ``x``: the entry carries its VPID, and either v's
    domain is running or the TLB is tagged (so entries survive the switch to v)."""
    return z3.And(s.hits(x, v), z3.Or(s.vcpu_dom[v] == s.cur_dom, s.tagged))


def _translations(s: State, ok_frame: Callable[[Expr, Expr, Expr], Expr], name: str) -> Expr:
    """∀ vCPU v, linear page p (and for HAP any guest CR3, for PV any validated L4
    of v's domain): the frame reached satisfies ``ok_frame(v, frame, writable)``;
    and every TLB entry v can hit does too."""
    vpn = z3.Const(f"{name}.vpn", w.VpnS)

    def pv(v: Expr, l4: Expr) -> Expr:
        wk = machine_walk(s, l4, vpn)
        return z3.Implies(
            z3.And(s.is_mode(v, DomMode.PV), s.validated[l4], s.ptype_is(l4, PageType.L4), s.owner[l4] == s.vcpu_dom[v], wk.ok),
            ok_frame(v, wk.frame, wk.writable),
        )

    def shadow(v: Expr) -> Expr:
        wk = machine_walk(s, s.vcpu_base[v], vpn)
        return z3.Implies(z3.And(s.is_mode(v, DomMode.SHADOW), wk.ok), ok_frame(v, wk.frame, wk.writable))

    def hap(v: Expr, cr3: Expr) -> Expr:
        wk = hap_walk(s, s.vcpu_dom[v], cr3, vpn)
        return z3.Implies(z3.And(s.is_mode(v, DomMode.HAP), wk.ok), ok_frame(v, wk.frame, wk.writable))

    def tlb(v: Expr, x: Expr) -> Expr:
        return z3.Implies(can_hit(s, x, v), ok_frame(v, s.tlb_frame[x], s.tlb_w[x]))

    f = z3.Const(f"{name}.base", w.FrameS)
    v = z3.Const(f"{name}.v", w.VcpuS)
    x = z3.Const(f"{name}.slot", w.SlotS)
    return z3.ForAll([v, f, vpn, x], z3.And(pv(v, f), shadow(v), hap(v, f), tlb(v, x)))


def mi_semantic(s: State) -> Expr:
    """Memory isolation: every translation a domain can use — its PV page tables
    from any base it can load (a validated L4 it owns), its shadow tables, its
    tables composed with the EPT from any guest CR3, or any TLB entry one of its
    vCPUs can hit — reaches only machine frames it owns."""
    return _translations(s, lambda v, frame, _w: s.owner[frame] == s.vcpu_dom[v], "mi")


# -- hypervisor integrity -----------------------------------------------------------------------


def hi_core(s: State) -> list[Clause]:
    """No P2M entry, validated PV table entry, shadow L1 entry or TLB entry maps a
    frame owned by DOMID_XEN (Xen's text, data, its own page tables, and the shadow
    and EPT tables it builds)."""
    p2m = s.forall(Sort.P2M, "hp", lambda pk: z3.Implies(w.ept_present(s.p2m[pk]), s.owner[w.target(s.p2m[pk])] != XEN))
    pv = _entries(s, "hk", lambda k, f, e: z3.Implies(z3.And(s.validated[f], w.present(e)), s.owner[w.target(e)] != XEN))
    sh = _entries(
        s, "hk", lambda k, f, e: z3.Implies(z3.And(s.sh_level[f] == _lvl(1), w.present(e)), s.owner[w.target(e)] != XEN)
    )
    tlb = s.forall(Sort.SLOT, "hs", lambda x: z3.Implies(s.tlb_valid[x], s.owner[s.tlb_frame[x]] != XEN))
    return [("hi.p2m", p2m), ("hi.pv_tables", pv), ("hi.shadow_l1", sh), ("hi.tlb", tlb)]


def hi_semantic(s: State) -> Expr:
    """Hypervisor integrity: no translation any guest can use (page tables, shadow
    tables, tables composed with the EPT, TLB entries) reaches a DOMID_XEN frame."""
    return _translations(s, lambda v, frame, _w: s.owner[frame] != XEN, "hi")


# -- page-table integrity (PV) --------------------------------------------------------------------


def pt_core(s: State) -> list[Clause]:
    """Xen's PV type system (xen/arch/x86/mm.c, ``get_page_type``/``alloc_lN_table``):

    - only page-table types are validated; only frames of (ordinary) PV domains
      have a type at all; a pin or an active base keeps its table
      validated, and a PV vCPU's base is a validated L4 of its own domain;
    - a present entry of a validated L2..L4 table has no PS and references a
      validated table of the level below — or, read-only, one of its own level
      (a linear page table, ``get_lN_linear_pagetable``);
    - a present, writable entry of a validated L1 table references a frame of type
      *writable* — never a page table;
    - no writable TLB entry maps a frame typed as a page table (Xen flushes TLBs
      that may hold such a mapping when a frame's type changes)."""
    typed = s.forall(
        Sort.FRAME, "pf",
        lambda f: z3.And(
            z3.Implies(s.validated[f], s.is_pt_type(f)),
            z3.Implies(
                s.ptype[f] != _pt(PageType.NONE),
                z3.And(s.dom_mode[s.owner[f]] == int(DomMode.PV), z3.ULT(s.owner[f], w.DOMID_FIRST_RESERVED)),
            ),
        ),
    )
    pinned = s.forall(Sort.FRAME, "pf", lambda f: z3.Implies(s.pinned[f], s.validated[f]))
    base = s.forall(
        Sort.VCPU, "pv",
        lambda v: z3.Implies(
            s.is_mode(v, DomMode.PV),
            z3.And(s.validated[s.vcpu_base[v]], s.ptype_is(s.vcpu_base[v], PageType.L4), s.owner[s.vcpu_base[v]] == s.vcpu_dom[v]),
        ),
    )
    upper = _entries(
        s, "pk",
        lambda k, f, e: z3.Implies(
            z3.And(s.validated[f], z3.UGE(s.ptype[f], int(PageType.L2)), w.present(e)),
            z3.And(
                z3.Not(w.large(e)), s.validated[w.target(e)],
                z3.Or(
                    s.ptype[w.target(e)] == s.ptype[f] - 1,
                    z3.And(z3.Not(w.writable(e)), s.ptype[w.target(e)] == s.ptype[f]),
                ),
            ),
        ),
    )
    l1 = _entries(
        s, "pk",
        lambda k, f, e: z3.Implies(
            z3.And(s.validated[f], s.ptype_is(f, PageType.L1), w.present(e), w.writable(e)),
            s.ptype_is(w.target(e), PageType.WRITABLE),
        ),
    )
    tlb = s.forall(
        Sort.SLOT, "ps", lambda x: z3.Implies(z3.And(s.tlb_valid[x], s.tlb_w[x]), z3.Not(s.is_pt_type(s.tlb_frame[x])))
    )
    return [
        ("pt.validated_typed", typed), ("pt.pinned_validated", pinned), ("pt.base_l4", base),
        ("pt.upper_typed", upper), ("pt.l1_rw_writable", l1), ("pt.tlb_no_rw_pt", tlb),
    ]


def pt_semantic(s: State) -> Expr:
    """Page-table integrity (PV): no guest-writable translation (a walk from any
    base the domain can load, or a writable TLB entry) reaches a frame typed as a
    page table; and every table reachable from a pinned or active base is validated
    at its level (or, reached through a read-only linear entry, at a higher one)."""
    no_rw = _translations(
        s, lambda v, frame, wr: z3.Implies(z3.And(wr, s.is_mode(v, DomMode.PV)), z3.Not(s.is_pt_type(frame))), "pt"
    )
    f = z3.Const("pt.root", w.FrameS)
    vpn = z3.Const("pt.rvpn", w.VpnS)
    v = z3.Const("pt.rv", w.VcpuS)
    wk = machine_walk(s, f, vpn)
    rooted = z3.Or(s.pinned[f], z3.And(s.is_mode(v, DomMode.PV), s.vcpu_base[v] == f))
    steps = []
    for used, (table, level) in zip(wk.used, wk.tables):
        # the table at this position of the walk is validated at its level; or,
        # reached through a read-only linear entry, at a higher level
        at_level = s.ptype_is(table, PageType(level))
        higher = z3.And(z3.UGT(s.ptype[table], level), z3.Not(wk.writable))
        steps.append(z3.Implies(used.reached, z3.And(s.validated[table], z3.Or(at_level, higher))))
    reach = z3.ForAll([f, vpn, v], z3.Implies(z3.And(rooted, s.ptype_is(f, PageType.L4)), z3.And(*steps)))
    return z3.And(no_rw, reach)


# -- shadow soundness -------------------------------------------------------------------------------


def shadow_l1_sound(s: State, k: Expr) -> Expr:
    """A present shadow L1 entry grants no more than its guest entry composed with
    the P2M: the guest entry is present, the P2M maps its gfn to the very frame the
    shadow maps, R/W only if the guest and the P2M both allow writes and the frame is
    not a guest page table, U/S only if the guest's is set, XD if the guest's is."""
    f = w.key_frame(k)
    se = s.mem[k]
    d = s.sh_dom[f]
    ge = guest_entry_of_shadow(s, k)
    pe = s.p2m_entry(d, w.target(ge))
    return z3.Implies(
        z3.And(s.sh_level[f] == _lvl(1), w.present(se)),
        z3.And(
            w.present(ge),
            w.ept_readable(pe),
            w.target(se) == w.target(pe),
            z3.Implies(w.writable(se), z3.And(w.writable(ge), w.ept_writable(pe), z3.Not(s.gpt[w.target(se)]))),
            z3.Implies(w.user(se), w.user(ge)),
            z3.Implies(w.no_exec(ge), w.no_exec(se)),
        ),
    )


def shadow_upper_sound(s: State, k: Expr) -> Expr:
    """A present upper-level shadow entry shadows a present, non-PS guest entry: it
    references the shadow, one level down and of the same domain, of exactly the
    guest table that entry references, with no more rights."""
    f = w.key_frame(k)
    se = s.mem[k]
    ge = guest_entry_of_shadow(s, k)
    t = w.target(se)
    return z3.Implies(
        z3.And(z3.UGE(s.sh_level[f], 2), w.present(se)),
        z3.And(
            w.present(ge), z3.Not(w.large(ge)), z3.Not(w.large(se)),
            s.sh_level[t] == s.sh_level[f] - 1, s.sh_dom[t] == s.sh_dom[f], s.sh_back[t] == w.target(ge),
            z3.Implies(w.writable(se), w.writable(ge)), z3.Implies(w.user(se), w.user(ge)),
        ),
    )


def ss_core(s: State) -> list[Clause]:
    """Xen's shadow code (xen/arch/x86/mm/shadow/multi.c, ``_sh_propagate``,
    ``sh_page_fault``, ``sh_x86_emulate_write``):

    - a shadow is a DOMID_XEN frame of level 1..4 shadowing a page-table gfn of a
      shadow-mode domain; the P2M maps that gfn, and its machine frame is marked a
      guest page table (write-protected);
    - only frames of (ordinary) shadow-mode domains are guest page tables;
    - the hash finds only shadows, each of the (domain, gfn, level) it is keyed by;
    - every shadow entry is sound (:func:`shadow_l1_sound`, :func:`shadow_upper_sound`);
    - a shadow-mode vCPU runs on a top-level shadow of its own domain;
    - no writable TLB entry filled for a shadow-mode domain maps a guest page table."""
    meta = s.forall(
        Sort.FRAME, "sf",
        lambda f: z3.Implies(
            s.sh_level[f] != _lvl(0),
            z3.And(
                z3.ULE(s.sh_level[f], 4), s.owner[f] == XEN,
                s.dom_mode[s.sh_dom[f]] == int(DomMode.SHADOW),
                w.ept_present(s.p2m_entry(s.sh_dom[f], s.sh_back[f])),
                s.gpt[w.target(s.p2m_entry(s.sh_dom[f], s.sh_back[f]))],
            ),
        ),
    )
    gpt_owner = s.forall(
        Sort.FRAME, "sf",
        lambda f: z3.Implies(
            s.gpt[f], z3.And(s.dom_mode[s.owner[f]] == int(DomMode.SHADOW), z3.ULT(s.owner[f], w.DOMID_FIRST_RESERVED))
        ),
    )
    hash_ok = s.forall(
        Sort.SHKEY, "sh",
        lambda hk: z3.Implies(
            s.sh_hash[hk] != w.frame_val(0),
            z3.And(
                s.sh_level[s.sh_hash[hk]] != _lvl(0),
                s.sh_level[s.sh_hash[hk]] == z3.Extract(w.LEVEL_BITS - 1, 0, hk),
                s.sh_back[s.sh_hash[hk]] == z3.Extract(w.FRAME_BITS + w.LEVEL_BITS - 1, w.LEVEL_BITS, hk),
                s.sh_dom[s.sh_hash[hk]] == z3.Extract(w.DOM_BITS + w.FRAME_BITS + w.LEVEL_BITS - 1, w.FRAME_BITS + w.LEVEL_BITS, hk),
            ),
        ),
    )
    l1 = s.forall(Sort.KEY, "sk", lambda k: shadow_l1_sound(s, k))
    upper = s.forall(Sort.KEY, "sk", lambda k: shadow_upper_sound(s, k))
    base = s.forall(
        Sort.VCPU, "sv",
        lambda v: z3.Implies(
            s.is_mode(v, DomMode.SHADOW),
            z3.And(s.sh_level[s.vcpu_base[v]] == _lvl(4), s.sh_dom[s.vcpu_base[v]] == s.vcpu_dom[v]),
        ),
    )
    tlb = s.forall(
        Sort.SLOT, "ss",
        lambda x: z3.Implies(
            z3.And(s.tlb_valid[x], s.tlb_w[x], s.dom_mode[s.filled_for(x)] == int(DomMode.SHADOW)),
            z3.Not(s.gpt[s.tlb_frame[x]]),
        ),
    )
    return [
        ("ss.shadow_meta", meta), ("ss.gpt_owner", gpt_owner), ("ss.hash", hash_ok), ("ss.l1_sound", l1),
        ("ss.upper_sound", upper), ("ss.base", base), ("ss.tlb_no_rw_gpt", tlb),
    ]


def ss_semantic(s: State) -> Expr:
    """Shadow soundness: each shadow entry grants no more than the guest entry
    composed with the P2M, and no translation through a shadow-mode vCPU's shadow
    tables, nor a TLB entry it can hit, lets it write a guest page-table frame."""
    entries = s.forall(Sort.KEY, "ssk", lambda k: z3.And(shadow_l1_sound(s, k), shadow_upper_sound(s, k)))
    no_rw = _translations(
        s, lambda v, frame, wr: z3.Implies(z3.And(wr, s.is_mode(v, DomMode.SHADOW)), z3.Not(s.gpt[frame])), "ss"
    )
    return z3.And(entries, no_rw)


# -- TLB isolation across switches ---------------------------------------------------------------------


def ti_core(s: State) -> list[Clause]:
    """Every valid TLB entry carries the VPID of the vCPU that filled it; and an
    entry filled for a domain that is not running can be hit only by vCPUs of that
    domain (either the TLB was flushed at the switch, or the tags differ)."""
    tag = s.forall(Sort.SLOT, "ts", lambda x: z3.Implies(s.tlb_valid[x], s.tlb_vpid[x] == s.vcpu_vpid[s.tlb_vcpu[x]]))
    foreign = s.forall2(
        Sort.SLOT, "ts", Sort.VCPU, "tv",
        lambda x, v: z3.Implies(
            z3.And(s.tlb_valid[x], s.filled_for(x) != s.cur_dom, s.vcpu_vpid[v] == s.tlb_vpid[x]),
            s.vcpu_dom[v] == s.filled_for(x),
        ),
    )
    return [("ti.tag_of_filler", tag), ("ti.foreign_unhittable", foreign)]


def ti_semantic(s: State) -> Expr:
    """TLB isolation: no TLB entry the running vCPU can hit was filled for another
    domain — in particular right after a switch."""
    return s.forall(Sort.SLOT, "tss", lambda x: z3.Implies(s.hits(x, s.cur), s.filled_for(x) == s.cur_dom))


# -- register confidentiality ---------------------------------------------------------------------------


def rc_core(s: State) -> list[Clause]:
    """The physical register file holds the running vCPU's own registers, and each
    other vCPU's save area holds its own."""
    live = s.forall(Sort.REG, "rr", lambda r: s.regs[r] == s.ghost[s.cur][r])
    saved = s.forall2(
        Sort.VCPU, "rv", Sort.REG, "rr", lambda v, r: z3.Implies(v != s.cur, s.saved[v][r] == s.ghost[v][r])
    )
    return [("rc.live_is_own", live), ("rc.saved_is_own", saved)]


def rc_semantic(s: State) -> Expr:
    """Register confidentiality: the running vCPU sees exactly its own register
    state — after a switch, the state it had when it was switched out."""
    return s.forall(Sort.REG, "rsr", lambda r: s.regs[r] == s.ghost[s.cur][r])


# -- the table ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Invariant:
    """A named isolation invariant: its statement, its inductive core, and the
    concrete twin in :mod:`refmodel.hv.invariants` that checks the same property on
    the Python model."""

    name: str
    title: str
    semantic: Callable[[State], Expr]
    core: Callable[[State], list[Clause]]
    twin: str

    @property
    def doc(self) -> str:
        return (self.semantic.__doc__ or "").strip()


INVARIANTS: tuple[Invariant, ...] = (
    Invariant("memory_isolation", "memory isolation", mi_semantic, mi_core, "memory_isolation"),
    Invariant("hypervisor_integrity", "hypervisor integrity", hi_semantic, hi_core, "hypervisor_integrity"),
    Invariant("pt_integrity", "page-table integrity (PV)", pt_semantic, pt_core, "pt_integrity"),
    Invariant("shadow_soundness", "shadow soundness", ss_semantic, ss_core, "shadow_soundness"),
    Invariant("tlb_isolation", "TLB isolation across switches", ti_semantic, ti_core, "tlb_isolation"),
    Invariant("register_confidentiality", "register confidentiality", rc_semantic, rc_core, "register_confidentiality"),
)


def all_core(s: State) -> list[Clause]:
    """Every invariant's core clauses."""
    return [c for inv in INVARIANTS for c in inv.core(s)]


def by_name(name: str) -> Invariant:
    for inv in INVARIANTS:
        if inv.name == name:
            return inv
    raise KeyError(name)
