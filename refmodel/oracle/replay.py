"""Run a trace on the model: the model's own observation of every operation
(:func:`replay`), and, for :mod:`refmodel.oracle.check`, every outcome the
architecture allows (:meth:`Model.outcomes`).

A :class:`Model` is the whole machine a trace runs on. :class:`NativeModel` is the
core: physical memory, one processor (:class:`~refmodel.arch.mmu.Mmu`) with its
TLB. Hypervisor modes wrap a backend of :mod:`refmodel.hv` (see
:class:`HypervisorModel`).

Allowed outcomes (SDM Vol. 3A 4.10.2, 4.10.4.3). The model's TLB is one legal TLB
among many: capacity, replacement and when to drop an entry are the processor's
choice. What the architecture fixes is which translations a processor *may* still
use. Every model keeps, next to its TLB, the set of translations any legal TLB may
hold at this point — :attr:`NativeModel.cacheable`: every translation a walk has
produced (SDM 4.10.2.1: a processor may cache what it used), minus those an
invalidation the SDM requires has removed (4.10.4.1: INVLPG, INVPCID, MOV to CR3,
MOV to CR4, a #PF for its page). An access may then

1. use any cacheable translation for its page and tag whose cached rights allow it
   (for a write: that was cached dirty, SDM 4.8) — a *stale* hit, no walk, no A/D;
2. fault on a cacheable translation whose cached rights refuse it — the
   "spurious" #PF of SDM 4.10.4.3 (P = 1); or
3. walk the paging structures as they are now (the entry may have been dropped at
   any time), setting A/D.

The model's own run is one of these; :meth:`Model.outcomes` returns them all, each
with the state it leads to. Not covered (the limits docs/oracle.md lists):
translations cached speculatively for addresses the trace never accessed (4.10.2.3)
and paging-structure caches (4.10.3), which let a walk combine stale upper-level
entries with current lower ones.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, replace

from ..account.events import Counters
from ..arch.access import Access, AccessKind
from ..arch.control import CR3_NOFLUSH, Cr4, Rflags
from ..arch.fault import GeneralProtection, PageFault
from ..arch.mmu import LoadResult, Mmu, usable
from ..arch.physmem import PhysicalMemory
from ..arch.tlb import Tlb, TlbEntry
from ..arch.types import ENTRY_SIZE, PAGE_SHIFT
from ..arch.vcpu import ArchState
from ..arch.walk import Translation, access_denial, is_canonical, page_fault
from ..errors import RefmodelError
from ..guest.ops import Mode
from .trace import (
    Fetch,
    Header,
    Invlpg,
    Invpcid,
    Observation,
    Op,
    PhysWrite,
    PteWrite,
    Read,
    Register,
    RegWrite,
    Step,
    Trace,
    TraceError,
    Write,
    gp_obs,
    ok,
    op_name,
    page_fault_obs,
)

#: The model's TLB when the header names none: the core's default geometry.
DEFAULT_TLB = (64, 4)
#: RFLAGS bits software can change (SDM Vol. 1 3.4.3): 0, 2, 4, 6-11, 14, 16-21.
RFLAGS_WRITABLE = 0x3F7FD5

AccessOp = Read | Write | Fetch


@dataclass
class Outcome:
    """One allowed outcome of an operation: what is observed, the state it leads to,
    and how the processor got there (for reports)."""

    obs: Observation
    model: Model
    how: str


class Model(ABC):
    """A machine a trace runs on."""

    @abstractmethod
    def step(self, op: Op) -> Observation:
        """Run ``op`` the model's way (deterministic); the observation includes the
        counters the operation added."""

    @abstractmethod
    def outcomes(self, op: Op) -> list[Outcome]:
        """Every outcome the architecture allows for ``op`` from this state, the
        model's own first; ``self`` is not changed."""

    @abstractmethod
    def fingerprint(self) -> Hashable:
        """Equal for two states no later operation can tell apart."""

    def clone(self) -> Model:
        return copy.deepcopy(self)


# ---------------------------------------------------------------------------------
# Cacheable translations (SDM 4.10.2, 4.10.4.1)
# ---------------------------------------------------------------------------------


def entry_maps(e: TlbEntry, va: int) -> bool:
    """The entry's page contains ``va`` (any page size)."""
    return e.vpn == va >> e.size.shift


def may_use(e: TlbEntry, va: int, vpid: int, pcid: int) -> bool:
    """SDM 4.10.2.4: an entry is used for its PCID, or for any PCID if global."""
    return e.matches(va, vpid, pcid)


class Cacheable:
    """The translations a legal TLB may hold: a set of :class:`TlbEntry`, with the
    invalidations SDM 4.10.4.1 *requires* (a processor may always drop more)."""

    def __init__(self, entries: Iterable[TlbEntry] = ()) -> None:
        self.entries: frozenset[TlbEntry] = frozenset(entries)

    def add(self, entries: Iterable[TlbEntry]) -> None:
        self.entries = self.entries | frozenset(entries)

    def drop(self, doomed: Callable[[TlbEntry], bool]) -> None:
        self.entries = frozenset(e for e in self.entries if not doomed(e))

    def for_access(self, va: int, vpid: int, pcid: int) -> list[TlbEntry]:
        """Entries an access to ``va`` may use, in a deterministic order."""
        found = [e for e in self.entries if may_use(e, va, vpid, pcid)]
        return sorted(found, key=_entry_key)

    # -- the invalidations the SDM requires (4.10.4.1) ----------------------------------
    def invlpg(self, va: int, vpid: int, pcid: int) -> None:
        """INVLPG, and a #PF for its page: the page's entries for the current PCID and
        global ones for the page whatever their PCID."""
        self.drop(lambda e: e.vpid == vpid and entry_maps(e, va) and (e.pcid == pcid or e.global_page))

    def pcid_nonglobal(self, vpid: int, pcid: int) -> None:
        """MOV to CR3 (without the no-flush bit), INVPCID type 1."""
        self.drop(lambda e: e.vpid == vpid and e.pcid == pcid and not e.global_page)

    def pcid_all(self, vpid: int, pcid: int) -> None:
        """MOV to CR4 setting SMEP (0 -> 1): every entry of the current PCID."""
        self.drop(lambda e: e.vpid == vpid and e.pcid == pcid)

    def individual(self, vpid: int, pcid: int, va: int) -> None:
        """INVPCID type 0: one page of one PCID, global entries kept."""
        self.drop(lambda e: e.vpid == vpid and e.pcid == pcid and entry_maps(e, va) and not e.global_page)

    def nonglobal(self, vpid: int) -> None:
        """INVPCID type 3."""
        self.drop(lambda e: e.vpid == vpid and not e.global_page)

    def everything(self, vpid: int) -> None:
        """INVPCID type 2; MOV to CR4 changing PGE or clearing PCIDE."""
        self.drop(lambda e: e.vpid == vpid)


def _entry_key(e: TlbEntry) -> tuple[int, int, int, int, int, bool, bool]:
    return (e.size.value, e.vpn, e.frame, e.pcid, e.vpid, e.global_page, e.dirty)


# ---------------------------------------------------------------------------------
# Bare metal
# ---------------------------------------------------------------------------------


def observe(out: LoadResult | Translation | PageFault | GeneralProtection, with_value: bool) -> Observation:
    """What an access outcome looks like to an observer."""
    if isinstance(out, PageFault):
        return page_fault_obs(out.cr2, int(out.error_code))
    if isinstance(out, GeneralProtection):
        return gp_obs(out.error_code)
    if with_value and isinstance(out, LoadResult):
        return ok(out.value)
    return ok()


def _counted(counters: Counters, before: Counters, obs: Observation) -> Observation:
    counted = tuple(counters.since(before).as_dict().items())
    return replace(obs, counters=counted or None)


def access_of(op: AccessOp, cpl: int) -> Access:
    kind = AccessKind.READ if isinstance(op, Read) else AccessKind.WRITE if isinstance(op, Write) else AccessKind.FETCH
    return Access(kind, cpl, getattr(op, "implicit", False))


class NativeModel(Model):
    """Bare metal: physical memory, one processor, its TLB (VPID 0)."""

    def __init__(self, mmu: Mmu) -> None:
        self.mmu = mmu
        self.cacheable = Cacheable()

    @staticmethod
    def from_header(header: Header) -> NativeModel:
        mem = PhysicalMemory(header.maxphyaddr)
        for frame, data in header.memory:
            mem.load_frame(frame, data)
        counters = Counters()
        capacity, ways = header.tlb or DEFAULT_TLB
        tlb = Tlb(capacity, ways, counters)
        state = header.vcpus[0].arch_state()
        return NativeModel(Mmu(mem, state, tlb, counters, vpid=0, page1gb=header.page1gb))

    @property
    def state(self) -> ArchState:
        return self.mmu.state

    # -- the model's run ----------------------------------------------------------------
    def step(self, op: Op) -> Observation:
        before = self.mmu.counters.copy()
        obs = self._run(op)
        self.cacheable.add(self.mmu.tlb.entries())
        return _counted(self.mmu.counters, before, obs)

    def _run(self, op: Op) -> Observation:
        if isinstance(op, (Read, Write, Fetch)):
            return self._access(op)
        if isinstance(op, PhysWrite):
            self.mmu.mem.write_uint(op.pa, op.size, op.value)
            return ok()
        if isinstance(op, PteWrite):
            self.mmu.mem.write_u64((op.table << PAGE_SHIFT) + op.index * ENTRY_SIZE, op.value)
            return ok()
        if isinstance(op, RegWrite):
            return self._register(op)
        if isinstance(op, Invlpg):
            return self._privileged(lambda: self._invlpg(op.va))
        if isinstance(op, Invpcid):
            return self._privileged(lambda: self._invpcid(op))
        raise RefmodelError(f"'{op_name(op)}' is not an operation of the bare processor")

    def _access(self, op: AccessOp) -> Observation:
        """One access at the op's CPL (the vCPU's if none is given); the vCPU's own
        CPL is left as it was."""
        cpl = self.state.cpl
        if op.cpl is not None:
            self.mmu.state = replace(self.mmu.state, cpl=op.cpl)
        try:
            return self._access_at_cpl(op)
        finally:
            self.mmu.state = replace(self.mmu.state, cpl=cpl)

    def _access_at_cpl(self, op: AccessOp) -> Observation:
        if isinstance(op, Read):
            out: LoadResult | Translation | PageFault | GeneralProtection = self.mmu.load(op.va, op.size, op.implicit)
        elif isinstance(op, Write):
            out = self.mmu.store(op.va, op.value, op.size, op.implicit)
        else:
            out = self.mmu.fetch(op.va)
        if isinstance(out, PageFault):
            self._page_fault(out)
        return observe(out, with_value=True)

    def _page_fault(self, fault: PageFault) -> None:
        """SDM 4.7: CR2 := the linear address; 4.10.4.1: the page's entries go."""
        self.mmu.state = replace(self.mmu.state, cr2=fault.cr2)
        self.cacheable.invlpg(fault.cr2, self.mmu.vpid, self.state.pcid)

    def _privileged(self, run: Callable[[], GeneralProtection | None]) -> Observation:
        """MOV to CR, WRMSR, INVLPG and INVPCID are privileged: #GP(0) unless CPL = 0
        (SDM Vol. 2A/2B, "Protected Mode Exceptions" of each instruction)."""
        if self.state.cpl != 0:
            return gp_obs(0)
        fault = run()
        return ok() if fault is None else gp_obs(fault.error_code)

    def _register(self, op: RegWrite) -> Observation:
        if op.reg is Register.RFLAGS:
            self.mmu.state = replace(self.mmu.state, rflags=(op.value & RFLAGS_WRITABLE) | int(Rflags.FIXED1))
            return ok()
        writes: dict[Register, Callable[[], GeneralProtection | None]] = {
            Register.CR0: lambda: self.mmu.mov_cr0(op.value),
            Register.CR3: lambda: self._mov_cr3(op.value),
            Register.CR4: lambda: self._mov_cr4(op.value),
            Register.EFER: lambda: self.mmu.wrmsr_efer(op.value),
        }
        return self._privileged(writes[op.reg])

    def _mov_cr3(self, value: int) -> GeneralProtection | None:
        """SDM 4.10.4.1: MOV to CR3 invalidates the non-global entries of the new
        PCID, unless CR4.PCIDE = 1 and bit 63 of the source is set."""
        fault = self.mmu.mov_cr3(value)
        if fault is None and not (self.state.cr4 & Cr4.PCIDE and value & CR3_NOFLUSH):
            self.cacheable.pcid_nonglobal(self.mmu.vpid, self.state.pcid)
        return fault

    def _mov_cr4(self, value: int) -> GeneralProtection | None:
        """SDM 4.10.4.1: changing PGE or clearing PCIDE invalidates everything;
        setting SMEP invalidates the current PCID's entries."""
        old = self.state.cr4
        old_pcid = self.state.pcid
        fault = self.mmu.mov_cr4(value)
        if fault is None:
            changed = old ^ value
            if changed & Cr4.PGE or (old & Cr4.PCIDE and not value & Cr4.PCIDE):
                self.cacheable.everything(self.mmu.vpid)
            elif value & Cr4.SMEP and not old & Cr4.SMEP:
                self.cacheable.pcid_all(self.mmu.vpid, old_pcid)
        return fault

    def _invlpg(self, va: int) -> None:
        self.mmu.invlpg(va)
        if is_canonical(va):
            self.cacheable.invlpg(va, self.mmu.vpid, self.state.pcid)

    def _invpcid(self, op: Invpcid) -> GeneralProtection | None:
        fault = self.mmu.invpcid(op.type, op.pcid, op.va)
        if fault is None:
            vpid = self.mmu.vpid
            if op.type == 0:
                self.cacheable.individual(vpid, op.pcid, op.va)
            elif op.type == 1:
                self.cacheable.pcid_nonglobal(vpid, op.pcid)
            elif op.type == 2:
                self.cacheable.everything(vpid)
            else:
                self.cacheable.nonglobal(vpid)
        return fault

    # -- every allowed outcome ----------------------------------------------------------
    def outcomes(self, op: Op) -> list[Outcome]:
        own = self.clone()
        result = [Outcome(own.step(op), own, "the model's TLB")]
        if isinstance(op, (Read, Write, Fetch)) and is_canonical(op.va):
            result.extend(self._alternatives(op))
        return result

    def _alternatives(self, op: AccessOp) -> list[Outcome]:
        """A fresh walk, each usable cached translation, and each spurious #PF."""
        out: list[Outcome] = []
        fresh = self.clone()
        assert isinstance(fresh, NativeModel)
        fresh._forget(op.va)
        out.append(Outcome(fresh.step(op), fresh, "a walk of the paging structures in memory"))
        access = access_of(op, self.state.cpl if op.cpl is None else op.cpl)
        ctx = self.mmu.ctx
        for entry in self.cacheable.for_access(op.va, self.mmu.vpid, ctx.pcid):
            if usable(entry, access, ctx):
                stale = self.clone()
                assert isinstance(stale, NativeModel)
                stale._forget(op.va)
                stale.mmu.tlb.fill(entry)
                out.append(Outcome(stale.step(op), stale, f"the cached translation {_describe(entry)}"))
            elif access_denial(entry.rights, access, ctx) is not None:
                out.append(self._spurious_fault(op, entry, access))
        return out

    def _forget(self, va: int) -> None:
        """Drop the model TLB's entries for ``va`` without counting it: a processor
        may drop any entry at any time (SDM 4.10.4.3)."""
        before = self.mmu.counters.copy()
        self.mmu.tlb.invalidate_page(va, self.mmu.vpid, self.state.pcid, include_global=True)
        self.mmu.counters.events = before.events
        self.mmu.counters.exits = before.exits

    def _spurious_fault(self, op: AccessOp, entry: TlbEntry, access: Access) -> Outcome:
        """A #PF decided on a cached translation's rights (SDM 4.10.4.3: relaxing
        rights without invalidating "may result in a spurious page-fault")."""
        model = self.clone()
        assert isinstance(model, NativeModel)
        before = model.mmu.counters.copy()
        cause = access_denial(entry.rights, access, model.mmu.ctx)
        assert cause is not None
        fault = page_fault(op.va, access, model.mmu.ctx, cause)
        model.mmu.tlb.invalidate_page(op.va, model.mmu.vpid, model.state.pcid, include_global=True)
        model._page_fault(fault)
        obs = _counted(model.mmu.counters, before, observe(fault, with_value=False))
        return Outcome(obs, model, f"a #PF on the cached translation {_describe(entry)}")

    def fingerprint(self) -> Hashable:
        mem = self.mmu.mem
        frames = tuple((f, mem.frame_bytes(f)) for f in mem.populated_frames())
        return (frames, self.mmu.state, self.cacheable.entries, frozenset(self.mmu.tlb.entries()))


def _describe(e: TlbEntry) -> str:
    flags = ("W" if e.rights.writable else "R") + ("U" if e.rights.user else "S") + ("X" if not e.rights.execute_disable else "")
    return (
        f"{e.vpn << e.size.shift:#x} -> {e.frame:#x} ({e.size.name[5:]}, {flags}"
        f"{', G' if e.global_page else ''}{', D' if e.dirty else ''}, PCID {e.pcid:#x})"
    )


# ---------------------------------------------------------------------------------
# Building a model, replaying a trace
# ---------------------------------------------------------------------------------


def build_model(header: Header) -> Model:
    """The model a trace's header describes."""
    if header.mode is Mode.NATIVE:
        return NativeModel.from_header(header)
    raise RefmodelError(f"mode {header.mode.value} is not supported by the oracle yet")


def run_step(model: Model, step: Step) -> Observation:
    """Run one step; a model refusal becomes a :class:`TraceError` naming the line."""
    try:
        return model.step(step.op)
    except TraceError:
        raise
    except RefmodelError as err:
        raise TraceError(step.line, "op", f"'{op_name(step.op)}': {err}") from None


def step_outcomes(model: Model, step: Step) -> list[Outcome]:
    try:
        return model.outcomes(step.op)
    except TraceError:
        raise
    except RefmodelError as err:
        raise TraceError(step.line, "op", f"'{op_name(step.op)}': {err}") from None


def replay(trace: Trace) -> list[Observation]:
    """The model's observation of every step, in order (deterministic)."""
    model = build_model(trace.header)
    return [run_step(model, step) for step in trace.steps]


def annotate(trace: Trace, counters: bool = True) -> Trace:
    """The trace with every step's ``obs`` replaced by the model's."""
    observations = replay(trace)
    steps = tuple(
        replace(step, obs=obs if counters else obs.without_counters())
        for step, obs in zip(trace.steps, observations)
    )
    return replace(trace, steps=steps)
