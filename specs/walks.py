"""Page walks as Z3 terms: the translation a vCPU's paging structures give one
linear page (SDM Vol. 3A 4.5), for each way the hypervisor virtualizes memory:

- :func:`machine_walk` — tables in machine frames: a PV guest's own tables (Xen
  validates them, the processor walks them directly) and the shadow tables Xen
  builds for a shadow-mode guest;
- :func:`hap_walk` — the guest's tables in guest-physical frames, each table read
  and the final page translated through the P2M/EPT (SDM Vol. 3C 29.3: the 2-D
  walk), so the walk reads only what the EPT lets the guest read.

A walk yields the reached machine frame of the 4 KiB page containing the linear
page number (inside a 2 MiB or 1 GiB page, the frame that linear page falls in),
the rights combined over the levels (4.6.1: granted only if every level grants
them), the G flag of the leaf, and the entries it used (for A/D updates, 4.8).
Reserved-bit checks other than PS in a PML4E are not modelled: a walk may succeed
where hardware would fault, so every statement proved for all walks also holds for
the walks hardware actually completes.
"""

from dataclasses import dataclass

import z3

from . import words as w
from .state import State
from .words import Expr


@dataclass(frozen=True)
class Used:
    """One paging-structure entry a walk used: where it is, its value, whether it is
    the leaf, and whether the walk got to it."""

    key: Expr
    entry: Expr
    leaf: Expr
    reached: Expr


@dataclass(frozen=True)
class Walk:
    """The result of a walk, as terms."""

    ok: Expr  #: every entry on the path present (and no PS in the PML4E)
    frame: Expr  #: machine frame reached
    writable: Expr
    user: Expr
    glob: Expr  #: G in the leaf
    used: tuple[Used, ...]
    tables: tuple[tuple[Expr, int], ...]  #: (table frame, level) read, when reached


def _leaf_frame(e3: Expr, e2: Expr, e1: Expr, vpn: Expr, leaf3: Expr, leaf2: Expr) -> Expr:
    """The 4 KiB frame reached: from a 1 GiB PDPTE, a 2 MiB PDE, or a PTE."""
    in_1g = z3.Concat(z3.Extract(39, 18, w.target(e3)), w.vpn_index(vpn, 2), w.vpn_index(vpn, 1))
    in_2m = z3.Concat(z3.Extract(39, 9, w.target(e2)), w.vpn_index(vpn, 1))
    return z3.If(leaf3, in_1g, z3.If(leaf2, in_2m, w.target(e1)))


def _combine(entries: tuple[Expr, Expr, Expr, Expr], leaf3: Expr, leaf2: Expr, flag: int) -> Expr:
    """A right granted only if every entry on the path grants it (SDM 4.6.1)."""
    e4, e3, e2, e1 = entries
    return z3.And(w.bit(e4, flag), w.bit(e3, flag), z3.Or(leaf3, z3.And(w.bit(e2, flag), z3.Or(leaf2, w.bit(e1, flag)))))


def _walk_from(read: "TableReader", base: Expr, vpn: Expr) -> Walk:
    e4 = read.entry(base, w.vpn_index(vpn, 4))
    t3 = w.target(e4)
    e3 = read.entry(t3, w.vpn_index(vpn, 3))
    k3 = w.key(read.machine(t3), w.vpn_index(vpn, 3))
    t2 = w.target(e3)
    e2 = read.entry(t2, w.vpn_index(vpn, 2))
    k2 = w.key(read.machine(t2), w.vpn_index(vpn, 2))
    t1 = w.target(e2)
    e1 = read.entry(t1, w.vpn_index(vpn, 1))
    k1 = w.key(read.machine(t1), w.vpn_index(vpn, 1))
    k4 = w.key(read.machine(base), w.vpn_index(vpn, 4))
    ok4 = z3.And(w.present(e4), z3.Not(w.large(e4)), read.ok(base))
    ok3 = z3.And(ok4, w.present(e3), read.ok(t3))
    leaf3 = z3.And(ok3, w.large(e3))
    ok2 = z3.And(ok3, z3.Not(leaf3), w.present(e2), read.ok(t2))
    leaf2 = z3.And(ok2, w.large(e2))
    ok1 = z3.And(ok2, z3.Not(leaf2), w.present(e1), read.ok(t1))
    ok = z3.Or(leaf3, leaf2, ok1)
    es = (e4, e3, e2, e1)
    return Walk(
        ok=ok,
        frame=_leaf_frame(e3, e2, e1, vpn, leaf3, leaf2),
        writable=_combine(es, leaf3, leaf2, w.RW),
        user=_combine(es, leaf3, leaf2, w.US),
        glob=z3.If(leaf3, w.global_(e3), z3.If(leaf2, w.global_(e2), w.global_(e1))),
        used=(
            Used(k4, e4, z3.BoolVal(False), read.ok(base)),
            Used(k3, e3, leaf3, ok4),
            Used(k2, e2, leaf2, z3.And(ok3, z3.Not(leaf3))),
            Used(k1, e1, ok1, z3.And(ok2, z3.Not(leaf2))),
        ),
        tables=((base, 4), (t3, 3), (t2, 2), (t1, 1)),
    )


class TableReader:
    """How a walk reads a table entry: directly from machine memory, or through the
    P2M for a HAP guest."""

    def __init__(self, s: State, dom: Expr | None = None) -> None:
        self.s = s
        self.dom = dom

    def machine(self, table: Expr) -> Expr:
        """The machine frame holding ``table``."""
        if self.dom is None:
            return table
        return w.target(self.s.p2m_entry(self.dom, table))

    def ok(self, table: Expr) -> Expr:
        """Whether the walk may read ``table`` (HAP: the EPT grants read access)."""
        if self.dom is None:
            return z3.BoolVal(True)
        return w.ept_readable(self.s.p2m_entry(self.dom, table))

    def entry(self, table: Expr, index: Expr) -> Expr:
        return self.s.mem[w.key(self.machine(table), index)]


def machine_walk(s: State, base: Expr, vpn: Expr) -> Walk:
    """Walk tables held in machine frames from the PML4 in ``base`` (PV guest tables,
    shadow tables)."""
    return _walk_from(TableReader(s), base, vpn)


@dataclass(frozen=True)
class HapWalk:
    """A 2-D walk: the guest walk in guest-physical space, then the P2M of its
    final guest frame."""

    guest: Walk  #: ``frame`` is the guest frame reached
    ok: Expr
    frame: Expr  #: machine frame
    writable: Expr
    user: Expr
    glob: Expr


def hap_walk(s: State, dom: Expr, cr3_gfn: Expr, vpn: Expr) -> HapWalk:
    """Walk the guest's tables from ``cr3_gfn`` through ``dom``'s P2M (SDM Vol. 3C
    29.3: every guest table read is a guest-physical access translated by the EPT,
    and so is the final page)."""
    g = _walk_from(TableReader(s, dom), cr3_gfn, vpn)
    final = s.p2m_entry(dom, g.frame)
    return HapWalk(
        guest=g,
        ok=z3.And(g.ok, w.ept_readable(final)),
        frame=w.target(final),
        writable=z3.And(g.writable, w.ept_writable(final)),
        user=g.user,
        glob=g.glob,
    )
