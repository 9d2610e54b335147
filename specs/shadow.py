"""Shadow paging (Xen xen/arch/x86/mm/shadow/{common,multi,set}.c; the Python
counterpart is :mod:`refmodel.hv.shadow`), as three transitions:

- :func:`shadow_promote` — a guest table becomes shadowed at a level: a fresh
  hypervisor frame becomes its (empty) shadow, and the guest frame becomes a
  write-protected guest page table: every shadow L1 entry mapping it loses R/W and
  no writable TLB entry for it survives (``sh_remove_write_access`` and the flush);
- :func:`shadow_sync_entry` — one shadow entry is (re)computed from its guest entry
  (``_sh_propagate``; a hidden fault's fill, the population of a new shadow);
- :func:`shadow_emulate_write` — the trap-and-emulate of one guest page-table
  write: the store into the guest frame, then the same index re-propagated into
  every shadow of that frame (``sh_x86_emulate_write`` ->
  ``sh_validate_guest_entry``).

The engine's operations are sequences of these: it shadows a table eagerly (promote,
then the children's promotes and syncs, then the links), and links an upper-level
entry only to an existing shadow of the table it references (which it promotes
first).

Propagation follows :mod:`refmodel.hv.shadow.propagate` (Xen ``_sh_propagate``): a
shadow entry is present only if the guest entry is present, has no reserved bit, has
its Accessed flag set, and the P2M backs its target; it copies R/W, U/S, XD (and G in
a leaf) and presets A (and D); a leaf is writable only if the guest's D is set and
the target is not a write-protected guest page table; guest superpages are not
shadowed (a PS entry at L2 is a leaf, at L3 and L4 reserved: no shadow entry).
Out-of-sync L1 tables (``oos.c``) are not modelled.
"""

from collections.abc import Callable

import z3

from . import words as w
from .state import DomMode, State, with_fields
from .steps import Param, Step, Transition
from .words import Expr

_A, _D, _P = 1 << w.A, 1 << w.D, 1 << w.P
LEAF_COPIED = (1 << w.RW) | (1 << w.US) | (1 << w.XD) | (1 << w.G)
UPPER_COPIED = (1 << w.RW) | (1 << w.US) | (1 << w.XD)


def usable(ge: Expr) -> Expr:
    """``guest_entry_usable``: present, no reserved address bit (MAXPHYADDR), and
    Accessed already set."""
    return z3.And(w.present(ge), ge & w.word(w.RESERVED_ADDR_BITS) == 0, w.bit(ge, w.A))


def propagate_l1(s: State, dom: Expr, ge: Expr) -> Expr:
    """The shadow PTE for guest PTE ``ge`` (``shadow_leaf_entry``): the P2M's frame
    for its gfn, the guest's R/W, U/S, XD and G, P and A preset; R/W only if the
    guest's D is set, the P2M allows writes and the frame is not a write-protected
    guest page table; D preset when writable."""
    pe = s.p2m_entry(dom, w.target(ge))
    mfn = w.target(pe)
    rw = z3.And(w.writable(ge), w.bit(ge, w.D), w.ept_writable(pe), z3.Not(s.gpt[mfn]))
    flags = (ge & w.word(LEAF_COPIED & ~(1 << w.RW))) | w.word(_P | _A)
    flags = z3.If(rw, flags | w.word((1 << w.RW) | _D), flags)
    entry = z3.Concat(z3.Extract(63, 52, flags), mfn, z3.Extract(11, 0, flags))
    return z3.If(z3.And(usable(ge), w.ept_readable(pe)), entry, w.word(0))


def propagate_upper(s: State, dom: Expr, ge: Expr, level: Expr) -> Expr:
    """The shadow entry at ``level`` (2..4) for guest entry ``ge``
    (``shadow_upper_entry``): a link to the existing shadow of the guest table it
    references, one level down, with the guest's R/W, U/S and XD and P, A, D preset;
    not present if the guest entry is unusable or PS, the P2M does not back the
    table, or it has no shadow yet."""
    child = w.target(ge)
    shadow = s.sh_hash[w.sh_key(dom, child, level - 1)]
    ok = z3.And(usable(ge), z3.Not(w.large(ge)), w.ept_readable(s.p2m_entry(dom, child)), shadow != w.frame_val(0))
    flags = (ge & w.word(UPPER_COPIED)) | w.word(_P | _A | _D)
    return z3.If(ok, z3.Concat(z3.Extract(63, 52, flags), shadow, z3.Extract(11, 0, flags)), w.word(0))


def propagate(s: State, dom: Expr, ge: Expr, level: Expr) -> Expr:
    return z3.If(level == 1, propagate_l1(s, dom, ge), propagate_upper(s, dom, ge, level))


def guest_mfn(s: State, f: Expr) -> Expr:
    """The machine frame of the guest table shadow ``f`` shadows."""
    return w.target(s.p2m_entry(s.sh_dom[f], s.sh_back[f]))


def shadows_of(s: State, dom: Expr, mfn: Expr, f: Expr) -> Expr:
    """Frame ``f`` is a shadow, of ``dom``, of the guest table in machine frame ``mfn``."""
    return z3.And(s.sh_level[f] != 0, s.sh_dom[f] == dom, guest_mfn(s, f) == mfn)


def _keep_tlb(s: State, keep: Expr) -> Expr:
    return w.lam(w.SlotS, "ex", lambda x: z3.And(s.tlb_valid[x], keep[x]))


def shadow_emulate_write(s: State, a: dict[str, Expr]) -> Step:
    """The running shadow-mode vCPU stores ``value`` to entry ``index`` of its
    page table in guest frame ``gfn``. The frame is write-protected (a shadowed
    guest page table), so the store faults; Xen emulates it on the guest frame and
    re-propagates the new entry into the same index of every shadow of that frame.
    Xen may flush TLBs as well (``keep``)."""
    return emulate_write(s, a, propagate_l1)


LeafRule = Callable[[State, Expr, Expr], Expr]


def emulate_write(s: State, a: dict[str, Expr], leaf: LeafRule) -> Step:
    """:func:`shadow_emulate_write` with the leaf propagation rule ``leaf``."""
    dom = s.cur_dom
    gfn, index, value, keep = a["gfn"], a["index"], a["value"], a["keep"]
    pe = s.p2m_entry(dom, gfn)
    mfn = w.target(pe)
    ok = z3.And(s.is_mode(s.cur, DomMode.SHADOW), w.ept_present(pe), s.gpt[mfn])
    mem1 = z3.Store(s.mem, w.key(mfn, index), value)

    def new_word(k: Expr) -> Expr:
        f = w.key_frame(k)
        level = s.sh_level[f]
        fresh = z3.If(level == 1, leaf(s, dom, value), propagate_upper(s, dom, value, level))
        return z3.If(z3.And(shadows_of(s, dom, mfn, f), w.key_index(k) == index), fresh, mem1[k])

    return Step(ok=ok, post=with_fields(s, mem=w.lam(w.KeyS, "ek", new_word), tlb_valid=_keep_tlb(s, keep)))


def shadow_sync_entry(s: State, a: dict[str, Expr]) -> Step:
    """Entry ``index`` of the running domain's shadow in frame ``shadow`` is set to
    the propagation of the guest entry it shadows (a hidden fault's fill, or the
    population of a new shadow). Replacing an upper-level link may flush (``keep``)."""
    f, index, keep = a["shadow"], a["index"], a["keep"]
    dom = s.cur_dom
    ge = s.mem[w.key(guest_mfn(s, f), index)]
    ok = z3.And(s.is_mode(s.cur, DomMode.SHADOW), s.sh_level[f] != 0, s.sh_dom[f] == dom)
    post = with_fields(
        s, mem=z3.Store(s.mem, w.key(f, index), propagate(s, dom, ge, s.sh_level[f])), tlb_valid=_keep_tlb(s, keep)
    )
    return Step(ok=ok, post=post)


def shadow_promote(s: State, a: dict[str, Expr]) -> Step:
    """Guest table ``gfn`` of the running shadow-mode domain gets a shadow at
    ``level`` in ``smfn``, a hypervisor frame that is no shadow yet (Xen
    ``shadow_alloc``: zeroed). There was none at that level. The guest frame becomes a
    write-protected guest page table: every shadow L1 entry of the domain mapping it
    loses R/W (``sh_remove_write_access``) and no writable TLB entry mapping it
    survives (the flush when one was found; ``keep`` may flush more)."""
    gfn, level, smfn, keep = a["gfn"], a["level"], a["smfn"], a["keep"]
    dom = s.cur_dom
    pe = s.p2m_entry(dom, gfn)
    mfn = w.target(pe)
    hkey = w.sh_key(dom, gfn, level)
    ok = z3.And(
        s.is_mode(s.cur, DomMode.SHADOW), w.ept_readable(pe), z3.UGE(level, 1), z3.ULE(level, 4),
        s.sh_hash[hkey] == w.frame_val(0), smfn != w.frame_val(0),
        s.owner[smfn] == w.dom_val(w.DOMID_XEN), s.sh_level[smfn] == 0,
    )

    def word_after(k: Expr) -> Expr:
        f, e = w.key_frame(k), s.mem[k]
        maps_it = z3.And(s.sh_level[f] == 1, s.sh_dom[f] == dom, w.present(e), w.target(e) == mfn)
        return z3.If(f == smfn, w.word(0), z3.If(maps_it, e & w.word(~((1 << w.RW) | _D) & ((1 << 64) - 1)), e))

    post = with_fields(
        s,
        mem=w.lam(w.KeyS, "pk", word_after),
        sh_level=z3.Store(s.sh_level, smfn, level),
        sh_dom=z3.Store(s.sh_dom, smfn, dom),
        sh_back=z3.Store(s.sh_back, smfn, gfn),
        sh_hash=z3.Store(s.sh_hash, hkey, smfn),
        gpt=z3.Store(s.gpt, mfn, True),
        tlb_valid=w.lam(
            w.SlotS, "px",
            lambda x: z3.And(s.tlb_valid[x], keep[x], z3.Not(z3.And(s.tlb_w[x], s.tlb_frame[x] == mfn))),
        ),
    )
    return Step(ok=ok, post=post)


def shadow_new_cr3(s: State, a: dict[str, Expr]) -> Step:
    """MOV to CR3 by a shadow-mode guest, intercepted (``sh_update_cr3``): the
    shadow of its new root (which must exist: promoted first) becomes the hardware
    base, the guest's own CR3 register holds the gfn, and the hardware MOV CR3
    flushes this VPID's non-global entries of its PCID."""
    v, gfn = s.cur, a["gfn"]
    dom = s.cur_dom
    root = s.sh_hash[w.sh_key(dom, gfn, z3.BitVecVal(4, w.LEVEL_BITS))]
    ok = z3.And(s.is_mode(v, DomMode.SHADOW), root != w.frame_val(0))
    cr3 = z3.Concat(z3.BitVecVal(0, 12), gfn, z3.BitVecVal(0, 12))
    post = with_fields(
        s,
        vcpu_base=z3.Store(s.vcpu_base, v, root),
        regs=z3.Store(s.regs, 20, cr3),
        ghost=z3.Store(s.ghost, v, z3.Store(s.ghost[v], 20, cr3)),
        tlb_valid=w.lam(
            w.SlotS, "cx",
            lambda x: z3.And(
                s.tlb_valid[x],
                z3.Not(z3.And(s.tlb_vpid[x] == s.vcpu_vpid[v], s.tlb_pcid[x] == s.vcpu_pcid[v], z3.Not(s.tlb_g[x]))),
            ),
        ),
    )
    return Step(ok=ok, post=post)


_KEEP = Param("keep", z3.ArraySort(w.SlotS, z3.BoolSort()), True)
_IDX = z3.BitVecSort(w.INDEX_BITS)

TRANSITIONS: tuple[Transition, ...] = (
    Transition(
        "shadow_emulate_write", "shadow",
        (Param("gfn", w.FrameS), Param("index", _IDX), Param("value", w.Word), _KEEP),
        shadow_emulate_write,
    ),
    Transition("shadow_sync_entry", "shadow", (Param("shadow", w.FrameS), Param("index", _IDX), _KEEP), shadow_sync_entry),
    Transition(
        "shadow_promote", "shadow",
        (Param("gfn", w.FrameS), Param("level", w.LevelS), Param("smfn", w.FrameS), _KEEP),
        shadow_promote,
    ),
    Transition("shadow_new_cr3", "shadow", (Param("gfn", w.FrameS),), shadow_new_cr3),
)
