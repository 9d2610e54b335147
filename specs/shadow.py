"""Shadow paging: the trap-and-emulate of one guest page-table write, with its
shadow update (Xen xen/arch/x86/mm/shadow/multi.c: ``sh_page_fault`` finds the write
hit a write-protected guest page table, ``sh_x86_emulate_write`` performs it, and
``sh_validate_guest_entry`` re-propagates the entry into every shadow of that frame
with ``_sh_propagate``). The Python counterpart is :mod:`refmodel.hv.shadow`.
"""

import z3

from . import words as w
from .state import DomMode, State, with_fields
from .steps import Param, Step, Transition
from .words import Expr


def propagate_l1(s: State, dom: Expr, ge: Expr) -> Expr:
    """The shadow L1 entry for guest PTE ``ge`` (``_sh_propagate``): not present
    unless the guest entry is present and the P2M maps its gfn readable; otherwise
    the machine frame, the guest's flags, and R/W only if the guest grants it, the
    P2M grants it, and the frame is not itself a guest page table (write
    protection)."""
    pe = s.p2m_entry(dom, w.target(ge))
    mfn = w.target(pe)
    rw = z3.And(w.writable(ge), w.ept_writable(pe), z3.Not(s.gpt[mfn]))
    sl1e = w.with_bit(w.with_target(ge, mfn), w.RW, rw)
    return z3.If(z3.And(w.present(ge), w.ept_readable(pe)), sl1e, w.word(0))


def propagate_upper(s: State, dom: Expr, ge: Expr, level: Expr) -> Expr:
    """The shadow entry at ``level`` (2..4) for guest entry ``ge``: a link to the
    existing shadow of the guest table it references, one level down, with the
    guest's flags; not present if the guest entry is not present, maps a superpage
    (guest superpages are not shadowed here), or no such shadow exists yet (a later
    shadow fault fills it)."""
    shadow = s.sh_hash[w.sh_key(dom, w.target(ge), level - 1)]
    ok = z3.And(w.present(ge), z3.Not(w.large(ge)), shadow != w.frame_val(0))
    return z3.If(ok, w.with_target(ge, shadow), w.word(0))


def shadows_of(s: State, dom: Expr, mfn: Expr, f: Expr) -> Expr:
    """Frame ``f`` is a shadow, of ``dom``, of the guest table in machine frame ``mfn``."""
    return z3.And(
        s.sh_level[f] != 0, s.sh_dom[f] == dom, w.target(s.p2m_entry(dom, s.sh_back[f])) == mfn
    )


def shadow_emulate_write(s: State, a: dict[str, Expr]) -> Step:
    """The running shadow-mode vCPU stores ``value`` to entry ``index`` of its
    page table in guest frame ``gfn``. The frame is write-protected (a guest page
    table), so the store faults; Xen emulates it on the guest frame and
    re-propagates the new entry into the same index of every shadow of that frame.
    Xen may flush TLBs as well (``keep``)."""
    dom = s.cur_dom
    gfn, index, value, keep = a["gfn"], a["index"], a["value"], a["keep"]
    pe = s.p2m_entry(dom, gfn)
    mfn = w.target(pe)
    ok = z3.And(s.is_mode(s.cur, DomMode.SHADOW), w.ept_present(pe), s.gpt[mfn])
    mem1 = z3.Store(s.mem, w.key(mfn, index), value)

    def new_word(k: Expr) -> Expr:
        f = w.key_frame(k)
        level = s.sh_level[f]
        shadow_entry = z3.If(level == 1, propagate_l1(s, dom, value), propagate_upper(s, dom, value, level))
        return z3.If(z3.And(shadows_of(s, dom, mfn, f), w.key_index(k) == index), shadow_entry, mem1[k])

    post = with_fields(
        s,
        mem=w.lam(w.KeyS, "ek", new_word),
        tlb_valid=w.lam(w.SlotS, "ex", lambda x: z3.And(s.tlb_valid[x], keep[x])),
    )
    return Step(ok=ok, post=post)


TRANSITIONS: tuple[Transition, ...] = (
    Transition(
        "shadow_emulate_write", "shadow",
        (
            Param("gfn", w.FrameS), Param("index", z3.BitVecSort(w.INDEX_BITS)), Param("value", w.Word),
            Param("keep", z3.ArraySort(w.SlotS, z3.BoolSort()), True),
        ),
        shadow_emulate_write,
    ),
)
