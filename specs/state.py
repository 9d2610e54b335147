"""The hypervisor state as Z3 terms.

One :class:`State` holds everything the isolation invariants talk about:

- **machine memory** ``mem``: 64-bit words indexed by entry address (frame ++ index);
  guest page tables, shadow tables and data all live there;
- **frame ownership** ``owner``: the domain (or ``DOMID_XEN``) each machine frame
  belongs to (Xen ``page_get_owner``);
- **PV page types** (xen/arch/x86/mm.c, ``struct page_info.u.inuse.type_info``):
  ``ptype`` (none, L1..L4 page table, writable), ``validated`` (PGT_validated: the
  type is in use, its type count is nonzero) and ``pinned`` (PGT_pinned). Type
  *counts* are abstracted: "count is zero" is the predicate "nothing holds a type
  reference" (:func:`specs.pv.unreferenced`), which is what Xen's count implements;
  the concrete twin checks the counts are exact;
- **the P2M / EPT** ``p2m``: for each (domain, gfn) the EPT leaf entry the
  hypervisor's tables resolve it to (the 4-level EPT tree itself is abstracted as
  the function it computes; its tables are DOMID_XEN frames no guest maps);
- **shadow metadata** (xen/arch/x86/mm/shadow/): each shadow table's level, domain and
  the guest table it shadows (``sh_level``, ``sh_dom``, ``sh_back``, Xen's
  ``backpointer``), the hash from (domain, gfn, level) to the shadow
  (``sh_hash``, Xen's ``shadow_hash_lookup``), and which machine frames are
  write-protected guest page tables (``gpt``, Xen's ``page->shadow_flags != 0``);
- **the TLB**: an unbounded array of slots, each valid or not, with its tags (VPID,
  PCID, global), the page it maps, the machine frame, the cached rights, and a ghost
  field ``tlb_vcpu`` recording which vCPU filled it (the domain it was filled for);
- **vCPUs**: which is running (``cur``), each one's domain, VPID, paging base
  (PV: the L4 MFN; shadow: the top-level shadow's MFN; HAP: the guest CR3's gfn),
  current PCID and CR4.PGE, the physical register file ``regs``, each vCPU's saved
  registers ``saved``, and a ghost ``ghost``: the register values each vCPU itself
  last had, which is what it must see when it runs again.

Symbolic states come from :func:`fresh`; concrete ones from :mod:`specs.concrete`,
which also fixes a finite :class:`Universe` so that quantifiers expand into finite
conjunctions and a concrete formula simplifies to true or false.
"""

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace

import z3

from . import words as w
from .words import Expr


class PageType(enum.IntEnum):
    """PV page types (Xen ``PGT_*`` in xen/arch/x86/include/asm/mm.h), as 3-bit codes.
    Segment-descriptor and shared pages are not modelled."""

    NONE = 0
    L1 = 1
    L2 = 2
    L3 = 3
    L4 = 4
    WRITABLE = 5


class DomMode(enum.IntEnum):
    """How a domain's memory is virtualized."""

    PV = 0
    SHADOW = 1
    HAP = 2


class Sort(enum.Enum):
    """The index sorts quantifiers range over (the finite universe of a concrete
    state names the members of each)."""

    KEY = "key"
    FRAME = "frame"
    SLOT = "slot"
    VCPU = "vcpu"
    REG = "reg"
    P2M = "p2m"
    SHKEY = "shkey"

    @property
    def z3sort(self) -> Expr:
        return {
            Sort.KEY: w.KeyS, Sort.FRAME: w.FrameS, Sort.SLOT: w.SlotS, Sort.VCPU: w.VcpuS,
            Sort.REG: w.RegS, Sort.P2M: w.P2mKeyS, Sort.SHKEY: w.ShKeyS,
        }[self]


@dataclass(frozen=True)
class Universe:
    """The finite support of a concrete state: every index outside it holds the
    array's default value, at which each quantified formula of the specs holds
    vacuously (an all-zero entry is not present, a default frame is not validated,
    a default slot is invalid, ...)."""

    members: dict[Sort, tuple[int, ...]] = field(default_factory=dict)

    def of(self, sort: Sort) -> tuple[int, ...]:
        return self.members.get(sort, ())


@dataclass(frozen=True)
class State:
    """The whole machine as Z3 terms (see the module docstring)."""

    mem: Expr
    owner: Expr
    ptype: Expr
    validated: Expr
    pinned: Expr
    p2m: Expr
    dom_mode: Expr
    sh_level: Expr
    sh_dom: Expr
    sh_back: Expr
    sh_hash: Expr
    gpt: Expr
    tlb_valid: Expr
    tlb_vpid: Expr
    tlb_pcid: Expr
    tlb_vpn: Expr
    tlb_frame: Expr
    tlb_w: Expr
    tlb_u: Expr
    tlb_g: Expr
    tlb_vcpu: Expr
    tagged: Expr
    cur: Expr
    vcpu_dom: Expr
    vcpu_vpid: Expr
    vcpu_base: Expr
    vcpu_pcid: Expr
    vcpu_pge: Expr
    regs: Expr
    saved: Expr
    ghost: Expr
    universe: Universe | None = None

    # -- quantifiers -------------------------------------------------------------------------
    def forall(self, sort: Sort, name: str, body: Callable[[Expr], Expr]) -> Expr:
        """``ForAll x: sort. body(x)``; over a concrete state, the finite conjunction
        over the universe's members of ``sort``."""
        if self.universe is None:
            return w.forall(sort.z3sort, name, body)
        size = sort.z3sort.size()
        return w.conj(*(body(z3.BitVecVal(m, size)) for m in self.universe.of(sort)))

    def forall2(self, s1: Sort, n1: str, s2: Sort, n2: str, body: Callable[[Expr, Expr], Expr]) -> Expr:
        return self.forall(s1, n1, lambda a: self.forall(s2, n2, lambda b: body(a, b)))

    # -- derived views ----------------------------------------------------------------------
    def dom_of(self, vcpu: Expr) -> Expr:
        return self.vcpu_dom[vcpu]

    @property
    def cur_dom(self) -> Expr:
        return self.vcpu_dom[self.cur]

    def mode_of(self, vcpu: Expr) -> Expr:
        return self.dom_mode[self.vcpu_dom[vcpu]]

    def is_mode(self, vcpu: Expr, mode: DomMode) -> Expr:
        return self.mode_of(vcpu) == z3.BitVecVal(int(mode), w.MODE_BITS)

    def ptype_is(self, frame: Expr, t: PageType) -> Expr:
        return self.ptype[frame] == z3.BitVecVal(int(t), w.PTYPE_BITS)

    def is_pt_type(self, frame: Expr) -> Expr:
        """Typed as a page table of some level (L1..L4), in use or not."""
        t = self.ptype[frame]
        return z3.And(z3.UGE(t, int(PageType.L1)), z3.ULE(t, int(PageType.L4)))

    def p2m_entry(self, dom: Expr, gfn: Expr) -> Expr:
        return self.p2m[w.p2m_key(dom, gfn)]

    def hits(self, slot: Expr, vcpu: Expr) -> Expr:
        """Whether ``vcpu`` can hit the TLB entry in ``slot`` when it runs: the entry
        is valid and carries its VPID (the PCID it may change at will, and a global
        entry matches every PCID, SDM 4.10.2.4)."""
        return z3.And(self.tlb_valid[slot], self.tlb_vpid[slot] == self.vcpu_vpid[vcpu])

    def filled_for(self, slot: Expr) -> Expr:
        """The domain the TLB entry in ``slot`` was filled for (ghost provenance)."""
        return self.vcpu_dom[self.tlb_vcpu[slot]]


def _sorts() -> dict[str, Expr]:
    A = z3.ArraySort
    B = z3.BoolSort()
    return {
        "mem": A(w.KeyS, w.Word),
        "owner": A(w.FrameS, w.DomS),
        "ptype": A(w.FrameS, w.PtypeS),
        "validated": A(w.FrameS, B),
        "pinned": A(w.FrameS, B),
        "p2m": A(w.P2mKeyS, w.Word),
        "dom_mode": A(w.DomS, w.ModeS),
        "sh_level": A(w.FrameS, w.LevelS),
        "sh_dom": A(w.FrameS, w.DomS),
        "sh_back": A(w.FrameS, w.FrameS),
        "sh_hash": A(w.ShKeyS, w.FrameS),
        "gpt": A(w.FrameS, B),
        "tlb_valid": A(w.SlotS, B),
        "tlb_vpid": A(w.SlotS, w.VpidS),
        "tlb_pcid": A(w.SlotS, w.PcidS),
        "tlb_vpn": A(w.SlotS, w.VpnS),
        "tlb_frame": A(w.SlotS, w.FrameS),
        "tlb_w": A(w.SlotS, B),
        "tlb_u": A(w.SlotS, B),
        "tlb_g": A(w.SlotS, B),
        "tlb_vcpu": A(w.SlotS, w.VcpuS),
        "tagged": B,
        "cur": w.VcpuS,
        "vcpu_dom": A(w.VcpuS, w.DomS),
        "vcpu_vpid": A(w.VcpuS, w.VpidS),
        "vcpu_base": A(w.VcpuS, w.FrameS),
        "vcpu_pcid": A(w.VcpuS, w.PcidS),
        "vcpu_pge": A(w.VcpuS, B),
        "regs": A(w.RegS, w.Word),
        "saved": A(w.VcpuS, A(w.RegS, w.Word)),
        "ghost": A(w.VcpuS, A(w.RegS, w.Word)),
    }


#: Field name -> Z3 sort, in declaration order.
SORTS: dict[str, Expr] = _sorts()
FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(State) if f.name != "universe")


def fresh(tag: str) -> State:
    """A fully symbolic state whose components are named ``tag.field``."""
    return State(**{name: z3.Const(f"{tag}.{name}", SORTS[name]) for name in FIELD_NAMES})


def changed_fields(pre: State, post: State) -> list[str]:
    """The components a transition rewrote (by term identity)."""
    return [n for n in FIELD_NAMES if not getattr(pre, n).eq(getattr(post, n))]


def with_fields(s: State, **changes: Expr) -> State:
    return replace(s, **changes)


def frame_universe(frames: Sequence[int]) -> tuple[int, ...]:
    return tuple(sorted(set(frames)))
