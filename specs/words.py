"""Z3 sorts and bit-field helpers shared by every spec.

Everything the hypervisor state holds is a bit-vector of its architectural width:

- a paging-structure entry (and an EPT entry) is a 64-bit word (SDM Vol. 3A 4.5,
  Vol. 3C 29.3.2);
- a machine or guest frame number is the 40-bit address field, bits 51:12 of an
  entry (MAXPHYADDR at its 4-level maximum of 52, SDM 4.1.4);
- memory is an array of 64-bit words indexed by *entry address*: a frame number
  followed by the 9-bit entry index (the machine address divided by 8);
- a domain id is 16 bits (Xen ``domid_t``), a VPID 16 bits (Vol. 3C 28.1), a PCID
  12 bits (SDM 4.10.1), a linear page number 36 bits (bits 47:12 of a canonical
  linear address).

The z3 module has no type stubs, so its values are ``Any`` to mypy; the helpers
here give them names and one place to read each bit's meaning.
"""

from collections.abc import Callable
from typing import Any

import z3

# -- widths ------------------------------------------------------------------------------
WORD_BITS = 64
FRAME_BITS = 40  #: bits 51:12 of an entry
INDEX_BITS = 9
KEY_BITS = FRAME_BITS + INDEX_BITS  #: an entry address: frame ++ index
DOM_BITS = 16
VPID_BITS = 16
PCID_BITS = 12
VPN_BITS = 36  #: linear address bits 47:12
SLOT_BITS = 20  #: TLB slots: any slot index (a sort of its own, apart from 16-bit domain ids and VPIDs)
VCPU_BITS = 8
REG_BITS = 5  #: 32 register slots (the model uses 24: 16 GPRs, RIP, RFLAGS, CR0, CR2, CR3, CR4, EFER, CPL)
PTYPE_BITS = 3
LEVEL_BITS = 3
MODE_BITS = 2

Word = z3.BitVecSort(WORD_BITS)
FrameS = z3.BitVecSort(FRAME_BITS)
KeyS = z3.BitVecSort(KEY_BITS)
DomS = z3.BitVecSort(DOM_BITS)
VpidS = z3.BitVecSort(VPID_BITS)
PcidS = z3.BitVecSort(PCID_BITS)
VpnS = z3.BitVecSort(VPN_BITS)
SlotS = z3.BitVecSort(SLOT_BITS)
VcpuS = z3.BitVecSort(VCPU_BITS)
RegS = z3.BitVecSort(REG_BITS)
PtypeS = z3.BitVecSort(PTYPE_BITS)
LevelS = z3.BitVecSort(LEVEL_BITS)
ModeS = z3.BitVecSort(MODE_BITS)
P2mKeyS = z3.BitVecSort(DOM_BITS + FRAME_BITS)  #: domain ++ gfn
ShKeyS = z3.BitVecSort(DOM_BITS + FRAME_BITS + LEVEL_BITS)  #: domain ++ gfn ++ level

#: A z3 expression. z3 ships no type stubs; this alias documents intent.
Expr = Any

#: MAXPHYADDR of the modelled machine (refmodel.hv.machine.Machine's default): entry
#: bits 51:40 are reserved (SDM 4.5). Only the shadow code's propagation reads it
#: (a guest entry with a reserved bit set is never shadowed).
MAXPHYADDR = 40
RESERVED_ADDR_BITS = ((1 << 52) - 1) & ~((1 << MAXPHYADDR) - 1)

# -- special values (xen/include/public/xen.h) ----------------------------------------------
DOMID_FIRST_RESERVED = 0x7FF0
DOMID_XEN = 0x7FF2
DOMID_INVALID = 0x7FF4


def bv(value: int, bits: int) -> Expr:
    """A bit-vector constant."""
    return z3.BitVecVal(value, bits)


def word(value: int) -> Expr:
    return z3.BitVecVal(value, WORD_BITS)


def frame_val(value: int) -> Expr:
    return z3.BitVecVal(value, FRAME_BITS)


def dom_val(value: int) -> Expr:
    return z3.BitVecVal(value, DOM_BITS)


def bit(e: Expr, n: int) -> Expr:
    """Bit ``n`` of ``e`` as a Bool."""
    return z3.Extract(n, n, e) == 1


# -- paging-structure entries (SDM 4.5, Tables 4-14..4-20) -------------------------------------
P, RW, US, PWT, PCD, A, D, PS, G = 0, 1, 2, 3, 4, 5, 6, 7, 8
XD = 63


def present(e: Expr) -> Expr:
    return bit(e, P)


def writable(e: Expr) -> Expr:
    return bit(e, RW)


def user(e: Expr) -> Expr:
    return bit(e, US)


def large(e: Expr) -> Expr:
    """PS: a PDPTE or PDE that maps a 1 GiB / 2 MiB page."""
    return bit(e, PS)


def global_(e: Expr) -> Expr:
    return bit(e, G)


def no_exec(e: Expr) -> Expr:
    return bit(e, XD)


def target(e: Expr) -> Expr:
    """The frame an entry references: bits 51:12."""
    return z3.Extract(51, 12, e)


def with_bit(e: Expr, n: int, on: Expr) -> Expr:
    """``e`` with bit ``n`` set to the Bool ``on``."""
    mask = word(1 << n)
    return z3.If(on, e | mask, e & ~mask)


def set_bits(e: Expr, mask: int) -> Expr:
    return e | word(mask)


def with_target(e: Expr, frame: Expr) -> Expr:
    """``e`` with its address field (bits 51:12) replaced by ``frame``."""
    return z3.Concat(z3.Extract(63, 52, e), frame, z3.Extract(11, 0, e))


# -- EPT entries (SDM Vol. 3C 29.3.2) ----------------------------------------------------------
EPT_R, EPT_W, EPT_X = 0, 1, 2


def ept_present(e: Expr) -> Expr:
    """An EPT entry is present if any of bits 2:0 is set."""
    return z3.Extract(2, 0, e) != 0


def ept_readable(e: Expr) -> Expr:
    return bit(e, EPT_R)


def ept_writable(e: Expr) -> Expr:
    return bit(e, EPT_W)


# -- entry addresses ---------------------------------------------------------------------------
def key(frame: Expr, index: Expr) -> Expr:
    """The entry address of entry ``index`` of the table in ``frame``."""
    return z3.Concat(frame, index)


def key_frame(k: Expr) -> Expr:
    return z3.Extract(KEY_BITS - 1, INDEX_BITS, k)


def key_index(k: Expr) -> Expr:
    return z3.Extract(INDEX_BITS - 1, 0, k)


def vpn_index(vpn: Expr, level: int) -> Expr:
    """The 9-bit table index of a linear page number at ``level`` (4 = PML4)."""
    lo = 9 * (level - 1)
    return z3.Extract(lo + 8, lo, vpn)


def p2m_key(dom: Expr, gfn: Expr) -> Expr:
    return z3.Concat(dom, gfn)


def sh_key(dom: Expr, gfn: Expr, level: Expr) -> Expr:
    return z3.Concat(dom, gfn, level)


# -- quantifiers ---------------------------------------------------------------------------------
def forall(sort: Expr, name: str, body: Callable[[Expr], Expr]) -> Expr:
    """``ForAll x. body(x)`` with a deterministic bound-variable name, so that the
    same invariant built twice is the same term (used to see that a transition leaves
    an invariant syntactically untouched)."""
    x = z3.Const(name, sort)
    return z3.ForAll([x], body(x))


def lam(sort: Expr, name: str, body: Callable[[Expr], Expr]) -> Expr:
    """``Lambda x. body(x)``: an array defined pointwise (an update of every entry)."""
    x = z3.Const(name, sort)
    return z3.Lambda([x], body(x))


def implies(a: Expr, b: Expr) -> Expr:
    return z3.Implies(a, b)


def conj(*parts: Expr) -> Expr:
    return z3.And(*parts) if parts else z3.BoolVal(True)


def disj(*parts: Expr) -> Expr:
    return z3.Or(*parts) if parts else z3.BoolVal(False)
