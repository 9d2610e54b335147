"""TLB transitions (SDM Vol. 3A 4.10; Vol. 3C 28.3.3): a fill from a walk, a guest
store through a TLB entry, and every invalidation the guest or the hypervisor can
issue. The Python counterpart is :class:`refmodel.arch.tlb.Tlb` driven by
:class:`refmodel.arch.mmu.Mmu`.

TLB entries here map 4 KiB pages: the walks of :mod:`specs.walks` yield the 4 KiB
frame of the linear page they translate, and a large page is cached by the model as
the pages it is used through (a 2 MiB TLB entry is not modelled).
"""

from collections.abc import Callable
from dataclasses import dataclass

import z3

from . import words as w
from .state import DomMode, State, with_fields
from .steps import Param, Step, Transition
from .walks import hap_walk, machine_walk
from .words import Expr

#: Index of each register in the register-file array (refmodel.arch.vcpu.ArchState order).
REG_RIP, REG_RFLAGS, REG_CR0, REG_CR2, REG_CR3, REG_CR4, REG_EFER, REG_CPL = range(16, 24)
NUM_REGS = 24

A_FLAG = 1 << w.A
D_FLAG = 1 << w.D


def drop(s: State, doomed: Callable[[Expr], Expr]) -> State:
    """Invalidate every TLB slot ``x`` for which ``doomed(x)`` holds."""
    return with_fields(s, tlb_valid=w.lam(w.SlotS, "dx", lambda x: z3.And(s.tlb_valid[x], z3.Not(doomed(x)))))


def same_vpid(s: State, x: Expr, vpid: Expr) -> Expr:
    return s.tlb_vpid[x] == vpid


# -- fill and store ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Translated:
    """What a successful walk hands the TLB."""

    ok: Expr
    frame: Expr
    writable: Expr
    user: Expr
    glob: Expr


def walk_for(s: State, mode: DomMode, vpn: Expr) -> Translated:
    """The running vCPU's walk of ``vpn`` in ``mode``: a PV guest's own tables or the
    shadow tables, from its base (machine frames); or a HAP guest's tables through
    the EPT (SDM Vol. 3C 29.3)."""
    v = s.cur
    if mode is DomMode.HAP:
        h = hap_walk(s, s.cur_dom, s.vcpu_base[v], vpn)
        return Translated(h.ok, h.frame, h.writable, h.user, h.glob)
    m = machine_walk(s, s.vcpu_base[v], vpn)
    return Translated(m.ok, m.frame, m.writable, m.user, m.glob)


def fill(s: State, a: dict[str, Expr], mode: DomMode) -> Step:
    """Cache the running vCPU's translation of ``vpn`` in ``slot`` if the access
    (read or write, user or supervisor, CR0.WP = 1) is allowed (SDM 4.6, 4.10.2),
    tagged with its VPID and PCID; G only with CR4.PGE (4.10.2.4). Any other entry
    may be evicted (``keep`` is the replacement policy's choice). The Accessed and
    Dirty flags the walk sets are the separate transition :func:`ad_update`."""
    v = s.cur
    vpn, slot, write, user_mode, keep = a["vpn"], a["slot"], a["write"], a["user"], a["keep"]
    t = walk_for(s, mode, vpn)
    allowed = z3.And(z3.Implies(write, t.writable), z3.Implies(user_mode, t.user))
    post = with_fields(
        s,
        tlb_valid=w.lam(w.SlotS, "fx", lambda x: z3.Or(x == slot, z3.And(s.tlb_valid[x], keep[x]))),
        tlb_vpid=z3.Store(s.tlb_vpid, slot, s.vcpu_vpid[v]),
        tlb_pcid=z3.Store(s.tlb_pcid, slot, s.vcpu_pcid[v]),
        tlb_vpn=z3.Store(s.tlb_vpn, slot, vpn),
        tlb_frame=z3.Store(s.tlb_frame, slot, t.frame),
        tlb_w=z3.Store(s.tlb_w, slot, t.writable),
        tlb_u=z3.Store(s.tlb_u, slot, t.user),
        tlb_g=z3.Store(s.tlb_g, slot, z3.And(t.glob, s.vcpu_pge[v])),
        tlb_vcpu=z3.Store(s.tlb_vcpu, slot, v),
    )
    return Step(ok=z3.And(s.is_mode(v, mode), t.ok, allowed), post=post)


def tlb_fill_pv(s: State, a: dict[str, Expr]) -> Step:
    """A TLB fill from a walk of a PV guest's own page tables (validated by Xen,
    walked by the processor directly)."""
    return fill(s, a, DomMode.PV)


def tlb_fill_shadow(s: State, a: dict[str, Expr]) -> Step:
    """A TLB fill from a walk of the shadow tables Xen built for a shadow-mode guest."""
    return fill(s, a, DomMode.SHADOW)


def tlb_fill_hap(s: State, a: dict[str, Expr]) -> Step:
    """A TLB fill from a 2-D walk: the HAP guest's tables through the EPT, and the
    final guest frame through the EPT (SDM Vol. 3C 29.3); writable only if both
    the guest and the EPT allow it."""
    return fill(s, a, DomMode.HAP)


def ad_update(s: State, a: dict[str, Expr]) -> Step:
    """The processor sets the Accessed flag — and the Dirty flag, if ``dirty`` — in
    a present paging-structure entry at entry address ``key`` (SDM 4.8: a walk
    does this to every entry it uses, as a locked update of the entry in memory).
    Any present entry anywhere qualifies: this over-approximates every walk."""
    k = a["key"]
    e = s.mem[k]
    flags = z3.If(a["dirty"], w.word(A_FLAG | D_FLAG), w.word(A_FLAG))
    return Step(ok=w.present(e), post=with_fields(s, mem=z3.Store(s.mem, k, e | flags)))


def usable_hit(s: State, x: Expr) -> Expr:
    """The running vCPU hits slot ``x``: its VPID, and its current PCID or a global
    entry (SDM 4.10.2.4)."""
    v = s.cur
    return z3.And(s.hits(x, v), z3.Or(s.tlb_pcid[x] == s.vcpu_pcid[v], s.tlb_g[x]))


def guest_store(s: State, a: dict[str, Expr]) -> Step:
    """A guest store of ``value`` to word ``index`` of a page, served by a TLB hit
    in ``slot`` whose cached rights allow writing: the processor writes the machine
    frame the entry caches, whatever the paging structures say now (SDM 4.10.2.3,
    4.10.4.3). A store that misses is a :func:`tlb_fill` followed by this."""
    x = a["slot"]
    ok = z3.And(usable_hit(s, x), s.tlb_w[x])
    return Step(ok=ok, post=with_fields(s, mem=z3.Store(s.mem, w.key(s.tlb_frame[x], a["index"]), a["value"])))


# -- invalidations -----------------------------------------------------------------------------


def invlpg(s: State, a: dict[str, Expr]) -> Step:
    """INVLPG (SDM 4.10.4.1): the entries for the page of the running vCPU's VPID
    whose PCID is the current one, and global entries for the page whatever their
    PCID."""
    v = s.cur
    vpn = a["vpn"]

    def doomed(x: Expr) -> Expr:
        return z3.And(
            same_vpid(s, x, s.vcpu_vpid[v]), s.tlb_vpn[x] == vpn, z3.Or(s.tlb_pcid[x] == s.vcpu_pcid[v], s.tlb_g[x])
        )

    return Step(ok=z3.BoolVal(True), post=drop(s, doomed))


def mov_cr3(s: State, a: dict[str, Expr]) -> Step:
    """MOV to CR3 by a HAP guest (no VM exit with EPT): the new base (a guest frame)
    and PCID; unless bit 63 (no-flush, CR4.PCIDE = 1) is set, the non-global entries
    of the new PCID of this VPID are invalidated (SDM 4.10.4.1). The guest's CR3
    register changes as the guest itself asked."""
    v = s.cur
    gfn, pcid, noflush = a["gfn"], a["pcid"], a["noflush"]
    value = z3.Concat(z3.BitVecVal(0, 12), gfn, pcid)

    def doomed(x: Expr) -> Expr:
        return z3.And(z3.Not(noflush), same_vpid(s, x, s.vcpu_vpid[v]), s.tlb_pcid[x] == pcid, z3.Not(s.tlb_g[x]))

    s1 = drop(s, doomed)
    post = with_fields(
        s1,
        vcpu_base=z3.Store(s.vcpu_base, v, gfn),
        vcpu_pcid=z3.Store(s.vcpu_pcid, v, pcid),
        regs=z3.Store(s.regs, REG_CR3, value),
        ghost=z3.Store(s.ghost, v, z3.Store(s.ghost[v], REG_CR3, value)),
    )
    return Step(ok=s.is_mode(v, DomMode.HAP), post=post)


def invpcid(s: State, a: dict[str, Expr]) -> Step:
    """INVPCID (SDM Vol. 2A) for the running vCPU's VPID: type 0, one page of one
    PCID (global entries kept); type 1, every non-global entry of one PCID; type 2,
    every entry; type 3, every non-global entry."""
    v = s.cur
    kind, pcid, vpn = a["kind"], a["pcid"], a["vpn"]

    def doomed(x: Expr) -> Expr:
        ng = z3.Not(s.tlb_g[x])
        by_kind = z3.If(
            kind == 0, z3.And(s.tlb_pcid[x] == pcid, s.tlb_vpn[x] == vpn, ng),
            z3.If(kind == 1, z3.And(s.tlb_pcid[x] == pcid, ng), z3.If(kind == 2, z3.BoolVal(True), ng)),
        )
        return z3.And(same_vpid(s, x, s.vcpu_vpid[v]), by_kind)

    return Step(ok=z3.BoolVal(True), post=drop(s, doomed))


def invvpid(s: State, a: dict[str, Expr]) -> Step:
    """INVVPID by the hypervisor (SDM Vol. 3C 28.3.3.3, 31.3): single-context
    invalidates every entry tagged with one VPID; all-context every entry of every
    VPID."""

    def doomed(x: Expr) -> Expr:
        return z3.Or(a["all"], s.tlb_vpid[x] == a["vpid"])

    return Step(ok=z3.BoolVal(True), post=drop(s, doomed))


def _p(name: str, sort: Expr, choice: bool = False) -> Param:
    return Param(name, sort, choice)


B = z3.BoolSort()
FILL_PARAMS = (
    _p("vpn", w.VpnS), _p("slot", w.SlotS), _p("write", B), _p("user", B), _p("keep", z3.ArraySort(w.SlotS, B), True),
)

TRANSITIONS: tuple[Transition, ...] = (
    *(
        Transition(f.__name__, "tlb", FILL_PARAMS, f)
        for f in (tlb_fill_pv, tlb_fill_shadow, tlb_fill_hap)
    ),
    Transition("ad_update", "tlb", (_p("key", w.KeyS), _p("dirty", B)), ad_update),
    Transition("guest_store", "tlb", (_p("slot", w.SlotS), _p("index", z3.BitVecSort(w.INDEX_BITS)), _p("value", w.Word)), guest_store),
    Transition("invlpg", "tlb", (_p("vpn", w.VpnS),), invlpg),
    Transition("mov_cr3", "tlb", (_p("gfn", w.FrameS), _p("pcid", w.PcidS), _p("noflush", B)), mov_cr3),
    Transition("invpcid", "tlb", (_p("kind", z3.BitVecSort(2)), _p("pcid", w.PcidS), _p("vpn", w.VpnS)), invpcid),
    Transition("invvpid", "tlb", (_p("all", B), _p("vpid", w.VpidS)), invvpid),
)
