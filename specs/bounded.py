"""A small symbolic state for finding counterexamples.

The proofs quantify over everything; a counterexample to a *broken* transition is
easiest found over a state whose arrays hold symbolic values at a few indices — a
handful of frames, two entries per frame, two TLB slots, two vCPUs, two domains —
and their default (empty) value everywhere else. Every quantifier then ranges over
those indices only (:meth:`State.forall` with a :class:`Universe`), the query is
quantifier-free, and Z3 answers it with a model. The defaults are chosen so that
every invariant holds vacuously outside the indices (a zero entry is not present, a
default frame is untyped and unshadowed, a default slot invalid), so a model is a
genuine state satisfying every invariant before the step and violating one after.
"""

from dataclasses import dataclass

import z3

from . import words as w
from .state import FIELD_NAMES, SORTS, Sort, State, Universe
from .words import Expr

NO_MODE = 3


@dataclass(frozen=True)
class Bounds:
    """The indices that hold symbolic values."""

    frames: tuple[int, ...] = (0x11, 0x12, 0x13, 0x14)
    indices: tuple[int, ...] = (0, 1)
    slots: tuple[int, ...] = (0, 1)
    vcpus: tuple[int, ...] = (0, 1)
    regs: tuple[int, ...] = (0, 1)
    doms: tuple[int, ...] = (1, 2)
    gfns: tuple[int, ...] = (0, 1)

    @property
    def keys(self) -> tuple[int, ...]:
        return tuple((f << w.INDEX_BITS) | i for f in self.frames for i in self.indices)

    @property
    def p2m_keys(self) -> tuple[int, ...]:
        return tuple((d << w.FRAME_BITS) | g for d in self.doms for g in self.gfns)

    @property
    def sh_keys(self) -> tuple[int, ...]:
        return tuple(
            (d << (w.FRAME_BITS + w.LEVEL_BITS)) | (g << w.LEVEL_BITS) | lvl
            for d in self.doms for g in self.gfns for lvl in (1, 2, 3, 4)
        )


def _symbolic(tag: str, name: str, key_sort: Expr, keys: tuple[int, ...], default: Expr) -> Expr:
    arr = z3.K(key_sort, default)
    value_sort = SORTS[name].range()
    for k in keys:
        arr = z3.Store(arr, z3.BitVecVal(k, key_sort.size()), z3.Const(f"{tag}.{name}[{k:#x}]", value_sort))
    return arr


def bounded(tag: str, b: Bounds = Bounds()) -> tuple[State, list[Expr]]:
    """A symbolic state over ``b`` and the side conditions that keep its defaults
    consistent with the symbolic part."""
    F, K, S, V, R = w.FrameS, w.KeyS, w.SlotS, w.VcpuS, w.RegS
    spec: dict[str, tuple[Expr, tuple[int, ...], Expr]] = {
        "mem": (K, b.keys, w.word(0)),
        "owner": (F, b.frames, w.dom_val(w.DOMID_INVALID)),
        "ptype": (F, b.frames, _zero(w.PTYPE_BITS)),
        "validated": (F, b.frames, z3.BoolVal(False)),
        "pinned": (F, b.frames, z3.BoolVal(False)),
        "p2m": (w.P2mKeyS, b.p2m_keys, w.word(0)),
        "dom_mode": (w.DomS, b.doms, z3.BitVecVal(NO_MODE, w.MODE_BITS)),
        "sh_level": (F, b.frames, _zero(w.LEVEL_BITS)),
        "sh_dom": (F, b.frames, w.dom_val(0)),
        "sh_back": (F, b.frames, w.frame_val(0)),
        "sh_hash": (w.ShKeyS, b.sh_keys, w.frame_val(0)),
        "gpt": (F, b.frames, z3.BoolVal(False)),
        "tlb_valid": (S, b.slots, z3.BoolVal(False)),
        "tlb_vpid": (S, b.slots, _zero(w.VPID_BITS)),
        "tlb_pcid": (S, b.slots, _zero(w.PCID_BITS)),
        "tlb_vpn": (S, b.slots, _zero(w.VPN_BITS)),
        "tlb_frame": (S, b.slots, w.frame_val(0)),
        "tlb_w": (S, b.slots, z3.BoolVal(False)),
        "tlb_u": (S, b.slots, z3.BoolVal(False)),
        "tlb_g": (S, b.slots, z3.BoolVal(False)),
        "tlb_vcpu": (S, b.slots, _zero(w.VCPU_BITS)),
        "vcpu_dom": (V, b.vcpus, w.dom_val(w.DOMID_FIRST_RESERVED - 1)),
        "vcpu_vpid": (V, b.vcpus, z3.BitVecVal((1 << w.VPID_BITS) - 1, w.VPID_BITS)),
        "vcpu_base": (V, b.vcpus, w.frame_val(0)),
        "vcpu_pcid": (V, b.vcpus, _zero(w.PCID_BITS)),
        "vcpu_pge": (V, b.vcpus, z3.BoolVal(False)),
        "regs": (R, b.regs, w.word(0)),
    }
    values = {n: _symbolic(tag, n, *spec[n]) for n in spec}
    zero_regs = z3.K(R, w.word(0))
    for name in ("saved", "ghost"):
        arr = z3.K(V, zero_regs)
        for v in b.vcpus:
            inner = _symbolic(f"{tag}.{name}[{v}]", "regs", R, b.regs, w.word(0))
            arr = z3.Store(arr, z3.BitVecVal(v, w.VCPU_BITS), inner)
        values[name] = arr
    values["tagged"] = z3.Bool(f"{tag}.tagged")
    values["cur"] = z3.Const(f"{tag}.cur", w.VcpuS)
    assert set(values) == set(FIELD_NAMES)
    universe = Universe({
        Sort.KEY: b.keys, Sort.FRAME: b.frames, Sort.SLOT: b.slots, Sort.VCPU: b.vcpus,
        Sort.REG: b.regs, Sort.P2M: b.p2m_keys, Sort.SHKEY: b.sh_keys,
    })
    s = State(**values, universe=universe)
    side = [
        one_of(s.cur, b.vcpus, w.VCPU_BITS),
        *[one_of(s.vcpu_dom[z3.BitVecVal(v, w.VCPU_BITS)], b.doms, w.DOM_BITS) for v in b.vcpus],
        *[z3.ULT(s.vcpu_vpid[z3.BitVecVal(v, w.VCPU_BITS)], (1 << w.VPID_BITS) - 1) for v in b.vcpus],
        *[one_of(s.tlb_vcpu[z3.BitVecVal(x, w.SLOT_BITS)], b.vcpus, w.VCPU_BITS) for x in b.slots],
        *[z3.ULE(s.dom_mode[w.dom_val(d)], 2) for d in b.doms],
    ]
    return s, side


def _zero(bits: int) -> Expr:
    return z3.BitVecVal(0, bits)


def one_of(e: Expr, options: tuple[int, ...], bits: int) -> Expr:
    return z3.Or(*[e == z3.BitVecVal(o, bits) for o in options])
