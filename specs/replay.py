"""Concrete operation sequences, replayed on the Python model.

A negative control's counterexample becomes a list of :class:`Op` — set up a
machine and domains, issue hypercalls, guest stores, accesses, switches — which
:class:`Replay` runs on refmodel's machine, backends and scheduler. Frames are named
by role, not number: ``("frame", domid, gfn)`` is the machine frame backing a
domain's guest frame (resolved when the op runs), ``("xen", n)`` the hypervisor's
frame n. The replay records each op's return and which vCPU filled each TLB entry.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

from refmodel.arch.access import AccessKind
from refmodel.arch.fault import PageFault
from refmodel.arch.tlb import TlbEntry
from refmodel.arch.types import GFN, PAGE_SHIFT
from refmodel.errors import RefmodelError
from refmodel.guest.ops import MmuBackend, Mode
from refmodel.hv.machine import DOMID_XEN, Machine
from refmodel.hv.modes import ModeSpec, build_backend
from refmodel.hv.sched import Scheduler

from .concrete import World

#: A frame by role: ("frame", domid, gfn), ("xen", mfn), or ("free", 0): the first
#: frame nobody owns.
FrameRef = tuple[str, int] | tuple[str, int, int]
Arg = int | bool | str | FrameRef


@dataclass(frozen=True)
class Op:
    """One operation: its kind and arguments (see :meth:`Replay.apply`)."""

    kind: str
    args: tuple[tuple[str, Arg], ...] = ()

    def arg(self, name: str) -> Arg:
        for k, v in self.args:
            if k == name:
                return v
        raise RefmodelError(f"op {self.kind}: no argument {name!r}")

    def __str__(self) -> str:
        def show(v: Arg) -> str:
            if isinstance(v, tuple):
                if v[0] == "xen":
                    return f"xen frame {v[1]:#x}"
                return "a free frame" if v[0] == "free" else f"d{v[1]}:gfn {v[2]:#x}"  # type: ignore[misc]
            if isinstance(v, bool) or isinstance(v, str):
                return str(v)
            return f"{v:#x}" if v > 9 else str(v)

        return f"{self.kind}(" + ", ".join(f"{k}={show(v)}" for k, v in self.args) + ")"


def op(kind: str, **args: Arg) -> Op:
    return Op(kind, tuple(args.items()))


MODES = {"pv": Mode.PV, "shadow": Mode.SHADOW, "hap": Mode.HAP}


@dataclass
class Replay:
    """The model a sequence of ops builds and drives."""

    machine: Machine | None = None
    backends: dict[int, MmuBackend] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)  #: domids in vCPU order
    sched: Scheduler | None = None
    results: list[object] = field(default_factory=list)
    filled_by: dict[TlbEntry, int] = field(default_factory=dict)
    running: int = 0

    # -- names --------------------------------------------------------------------------------
    def mfn(self, ref: Arg) -> int:
        assert self.machine is not None
        if not isinstance(ref, tuple):
            raise RefmodelError(f"{ref!r} is not a frame reference")
        if ref[0] == "xen":
            return int(ref[1])
        if ref[0] == "free":
            return next(f for f in range(self.machine.nr_frames) if self.machine.owner_of(f) is None)
        domid, gfn = int(ref[1]), int(ref[2])  # type: ignore[misc]
        mfn = self.machine.domain(domid).mfn_of(gfn)
        if mfn is None:
            raise RefmodelError(f"domain {domid} has no gfn {gfn:#x}")
        return int(mfn)

    def backend(self, domid: Arg) -> MmuBackend:
        b = self.backends.get(int(domid))  # type: ignore[arg-type]
        if b is None:
            raise RefmodelError(f"no backend for domain {domid}")
        return b

    def world(self) -> World:
        assert self.machine is not None
        return World(self.machine, [self.backends[d] for d in self.order], self.sched, self.running, self.filled_by)

    def vcpu_index(self, domid: int) -> int:
        return self.order.index(domid)

    def filled_for(self) -> dict[TlbEntry, int]:
        """TLB entry -> the domain it was filled for."""
        return {e: self.order[i] for e, i in self.filled_by.items()}

    # -- running --------------------------------------------------------------------------------
    def run(self, ops: Sequence[Op]) -> "Replay":
        for o in ops:
            self.apply(o)
        return self

    def apply(self, o: Op) -> object:
        before = set(self.machine.tlb.entries()) if self.machine is not None else set()
        result = self._apply(o)
        self.results.append(result)
        if self.machine is not None:
            actor = o.args[0][1] if o.args and o.args[0][0] == "domid" else None
            who = self.vcpu_index(int(actor)) if isinstance(actor, int) and actor in self.order else self.running
            for e in self.machine.tlb.entries():
                if e not in before:
                    self.filled_by[e] = who
        return result

    def _apply(self, o: Op) -> object:
        a = o.arg
        if o.kind == "machine":
            self.machine = Machine(nr_frames=int(a("frames")), hypervisor_frames=int(a("xen_frames")))  # type: ignore[arg-type]
            return None
        assert self.machine is not None, "the first op must create the machine"
        if o.kind == "domain":
            spec = ModeSpec(MODES[str(a("mode"))], batch_size=1, tagged=bool(a("tagged")))
            b = build_backend(spec, self.machine, domid=int(a("domid")), nr_frames=int(a("pages")))  # type: ignore[arg-type]
            self.backends[int(a("domid"))] = b  # type: ignore[arg-type]
            self.order.append(int(a("domid")))  # type: ignore[arg-type]
            return None
        if o.kind == "scheduler":
            self.sched = Scheduler(self.machine.tlb, self.machine.counters, bool(a("tagged")))
            for d in self.order:
                self.sched.add(d, self.backends[d])
            return None
        if o.kind == "switch":
            assert self.sched is not None
            self.sched.switch_to(self.vcpu_index(int(a("domid"))))  # type: ignore[arg-type]
            self.running = self.vcpu_index(int(a("domid")))  # type: ignore[arg-type]
            return None
        if o.kind == "set_gpr":
            assert self.sched is not None
            self.sched.set_gpr(int(a("index")), int(a("value")))  # type: ignore[arg-type]
            return None
        return self._guest_op(o)

    def _guest_op(self, o: Op) -> object:
        from refmodel.hv.pv.abi import MmuextOp, MmuUpdate
        from refmodel.hv.pv.hypercall import mmu_update, mmuext_op

        a = o.arg
        b = self.backend(a("domid"))
        if o.kind == "pv_mmu_update":
            ptr = (self.mfn(a("table")) << PAGE_SHIFT) + 8 * int(a("index"))  # type: ignore[arg-type]
            val = (self.mfn(a("target")) << PAGE_SHIFT) | int(a("flags")) if a("flags") else 0  # type: ignore[arg-type]
            return mmu_update(getattr(b, "vcpu"), [MmuUpdate.pt_update(ptr, val)]).rc
        if o.kind == "pv_mmuext":
            return mmuext_op(getattr(b, "vcpu"), [MmuextOp(int(a("cmd")), self.mfn(a("frame")))]).rc  # type: ignore[arg-type]
        if o.kind == "write_pte":
            value = (int(a("target_gfn")) << PAGE_SHIFT) | int(a("flags")) if a("flags") else 0  # type: ignore[arg-type]
            from refmodel.arch.pte import Level

            b.write_pte(GFN(int(a("gfn"))), int(a("index")), Level(int(a("level"))), value)  # type: ignore[arg-type]
            return None
        if o.kind == "load_cr3":
            b.load_cr3(GFN(int(a("gfn"))))  # type: ignore[arg-type]
            return None
        if o.kind == "new_table":
            from refmodel.arch.pte import Level

            b.new_table(GFN(int(a("gfn"))), Level(int(a("level"))))  # type: ignore[arg-type]
            return None
        if o.kind == "touch":
            kind = AccessKind.WRITE if a("write") else AccessKind.READ
            out = b.access(int(a("va")), kind, 3, int(a("value")) if kind is AccessKind.WRITE else 0)  # type: ignore[arg-type]
            return out if isinstance(out, PageFault) else 0
        if o.kind == "ept_map":
            getattr(b, "ept_remap")(GFN(int(a("gfn"))), self.mfn(a("target")))  # type: ignore[arg-type]
            return None
        raise RefmodelError(f"unknown op {o.kind!r}")


def replay(ops: Sequence[Op]) -> Replay:
    return Replay().run(ops)


XEN_REF: FrameRef = ("xen", 5)
assert DOMID_XEN == 0x7FF2
