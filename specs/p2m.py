"""The hypervisor's P2M / EPT update (Xen ``p2m_set_entry``, ``ept_set_entry`` in
xen/arch/x86/mm/p2m-ept.c; for a shadow-mode domain ``shadow_write_p2m_entry`` in
xen/arch/x86/mm/shadow/hvm.c). The EPT tree is abstracted as the leaf function it
computes; :mod:`refmodel.hv.hap` builds the tree.
"""

import z3

from . import words as w
from .state import DomMode, State, with_fields
from .steps import Param, Step, Transition
from .words import Expr


def zap_shadow_l1_mappings(s: State, dom: Expr, old: Expr) -> Expr:
    """Memory with every present shadow L1 entry of ``dom`` that maps the frame of
    the present P2M entry ``old`` cleared (Xen ``sh_remove_all_mappings``): a P2M
    change must not leave a shadow granting the old frame."""
    return w.lam(
        w.KeyS, "zk",
        lambda k: z3.If(
            z3.And(
                w.ept_present(old), s.sh_level[w.key_frame(k)] == 1, s.sh_dom[w.key_frame(k)] == dom,
                w.present(s.mem[k]), w.target(s.mem[k]) == w.target(old),
            ),
            w.word(0), s.mem[k],
        ),
    )


def ept_update(s: State, a: dict[str, Expr]) -> Step:
    """Set domain ``dom``'s P2M entry for ``gfn`` to ``entry``. Refused unless the
    domain is an ordinary HAP or shadow-mode domain and a present entry maps a frame
    that domain owns (Xen adds only pages allocated to the domain,
    ``guest_physmap_add_page``). Remapping a gfn whose frame is a shadowed guest
    page table (Xen first removes its shadows) is not modelled: refused. The old
    frame's shadow L1 mappings are removed, and at least every TLB entry caching the
    old frame is invalidated (INVEPT, and Xen's flush of the domain's TLBs);
    ``keep`` lets the implementation flush more."""
    dom, gfn, entry, keep = a["dom"], a["gfn"], a["entry"], a["keep"]
    old = s.p2m_entry(dom, gfn)
    mode = s.dom_mode[dom]
    ok = z3.And(
        z3.ULT(dom, w.DOMID_FIRST_RESERVED),
        z3.Or(mode == int(DomMode.HAP), mode == int(DomMode.SHADOW)),
        z3.Implies(w.ept_present(entry), s.owner[w.target(entry)] == dom),
        z3.Not(z3.And(w.ept_present(old), s.gpt[w.target(old)])),
    )

    def stale(x: Expr) -> Expr:
        return z3.And(w.ept_present(old), s.tlb_frame[x] == w.target(old))

    post = with_fields(
        s,
        p2m=z3.Store(s.p2m, w.p2m_key(dom, gfn), entry),
        mem=zap_shadow_l1_mappings(s, dom, old),
        tlb_valid=w.lam(w.SlotS, "ex", lambda x: z3.And(s.tlb_valid[x], keep[x], z3.Not(stale(x)))),
    )
    return Step(ok=ok, post=post)


TRANSITIONS: tuple[Transition, ...] = (
    Transition(
        "ept_update", "hap",
        (
            Param("dom", w.DomS), Param("gfn", w.FrameS), Param("entry", w.Word),
            Param("keep", z3.ArraySort(w.SlotS, z3.BoolSort()), True),
        ),
        ept_update,
    ),
)
