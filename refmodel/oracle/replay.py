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
import enum
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..account.events import Counters, Event
from ..arch.access import Access, AccessKind
from ..arch.control import CR3_NOFLUSH, Cr4, Rflags
from ..arch.fault import GeneralProtection, PageFault
from ..arch.mmu import LoadResult, Mmu, usable
from ..arch.physmem import PhysicalMemory
from ..arch.pte import Level
from ..arch.tlb import Tlb, TlbEntry
from ..arch.types import ENTRY_SIZE, GFN, MFN, PAGE_SHIFT, DomId
from ..arch.vcpu import ArchState
from ..arch.walk import Translation, access_denial, is_canonical, page_fault
from ..errors import RefmodelError
from ..guest.ops import MmuBackend, Mode
from ..hv.machine import Domain, Machine
from ..hv.native import TLB_CAPACITY, TLB_WAYS
from ..hv.sched import Scheduler
from .trace import (
    DomainInit,
    Fetch,
    Header,
    Hypercall,
    Invlpg,
    Invpcid,
    MachineInit,
    MmuextOp,
    MmuUpdate,
    Multicall,
    Observation,
    Op,
    PhysWrite,
    PteWrite,
    Read,
    Register,
    RegWrite,
    Result,
    Step,
    Switch,
    Trace,
    TraceError,
    UpdateVaMapping,
    Write,
    gp_obs,
    ok,
    op_name,
    page_fault_obs,
)

if TYPE_CHECKING:
    from ..hv.pv.abi import MmuextOp as PvMmuextOp
    from ..hv.pv.abi import MmuUpdate as PvMmuUpdate
    from ..hv.pv.abi import MulticallEntry

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

    def may_branch(self, op: Op) -> bool:
        """Whether ``op`` can have more than one allowed outcome: only an access to a
        canonical address, whose translation the TLB may or may not supply."""
        return isinstance(op, (Read, Write, Fetch)) and is_canonical(op.va)

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


def mmu_access(mmu: Mmu, op: AccessOp) -> Observation:
    """One access on a processor at the op's CPL (the vCPU's if none is given; the
    vCPU's own CPL is left as it was). A #PF loads CR2 (SDM 4.7)."""
    cpl = mmu.state.cpl
    if op.cpl is not None:
        mmu.state = replace(mmu.state, cpl=op.cpl)
    try:
        if isinstance(op, Read):
            out: LoadResult | Translation | PageFault | GeneralProtection = mmu.load(op.va, op.size, op.implicit)
        elif isinstance(op, Write):
            out = mmu.store(op.va, op.value, op.size, op.implicit)
        else:
            out = mmu.fetch(op.va)
    finally:
        mmu.state = replace(mmu.state, cpl=cpl)
    if isinstance(out, PageFault):
        mmu.state = replace(mmu.state, cr2=out.cr2)
    return observe(out, with_value=True)


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
        obs = mmu_access(self.mmu, op)
        if obs.vector == PageFault.VECTOR and obs.cr2 is not None:
            self.cacheable.invlpg(obs.cr2, self.mmu.vpid, self.state.pcid)
        return obs

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
        obs = own.step(op)
        result = [Outcome(obs, own, own_source(op, obs))]
        if isinstance(op, (Read, Write, Fetch)) and self.may_branch(op):
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


def own_source(op: Op, obs: Observation) -> str:
    """Where the model's own outcome of ``op`` came from, for a divergence report:
    its TLB only when an access hit a translation it had cached; an access that
    missed walked the paging structures; any other operation is the model's rules."""
    if not isinstance(op, (Read, Write, Fetch)):
        return "the model"
    counts = dict(obs.counters or ())
    if counts.get(Event.TLB_HIT.value, 0):
        return "the model's TLB, a translation it had cached"
    if counts.get(Event.TLB_MISS.value, 0):
        return "the model's walk of the paging structures, its TLB holding no translation for the page"
    return "the model"


def _describe(e: TlbEntry) -> str:
    flags = ("W" if e.rights.writable else "R") + ("U" if e.rights.user else "S") + ("X" if not e.rights.execute_disable else "")
    return (
        f"{e.vpn << e.size.shift:#x} -> {e.frame:#x} ({e.size.name[5:]}, {flags}"
        f"{', G' if e.global_page else ''}{', D' if e.dirty else ''}, PCID {e.pcid:#x})"
    )


# ---------------------------------------------------------------------------------
# Hypervisor modes
# ---------------------------------------------------------------------------------


class RecordingTlb(Tlb):
    """The machine's physical TLB that also keeps :class:`Cacheable`: every entry it
    was ever filled with, minus every invalidation the model performed. Under a
    hypervisor the required invalidations are the model's own — the guest's INVLPG
    and CR3 loads as the hypervisor carries them out, and the hypervisor's flushes
    (Xen's after an L2-L4 update or a type change, a VM exit without VPIDs)."""

    def __init__(self, capacity: int, ways: int, counters: Counters) -> None:
        super().__init__(capacity, ways, counters)
        self.cacheable = Cacheable()
        self.mirror = True  #: False while the oracle drops entries on its own account

    def fill(self, entry: TlbEntry) -> None:
        super().fill(entry)
        self.cacheable.add([entry])

    def _mirror(self, doomed: Callable[[TlbEntry], bool]) -> None:
        if self.mirror:
            self.cacheable.drop(doomed)

    def invalidate_page(
        self, va: int, vpid: int, pcid: int, include_global: bool = True, counted: bool = True
    ) -> int:
        self._mirror(
            lambda e: e.vpid == vpid and entry_maps(e, va)
            and (e.pcid == pcid or (include_global and e.global_page))
            and (include_global or not e.global_page)
        )
        return super().invalidate_page(va, vpid, pcid, include_global, counted)

    def invalidate_pcid(self, vpid: int, pcid: int) -> int:
        self._mirror(lambda e: e.vpid == vpid and e.pcid == pcid and not e.global_page)
        return super().invalidate_pcid(vpid, pcid)

    def invalidate_nonglobal(self, vpid: int) -> int:
        self._mirror(lambda e: e.vpid == vpid and not e.global_page)
        return super().invalidate_nonglobal(vpid)

    def invalidate_all(self, vpid: int) -> int:
        self._mirror(lambda e: e.vpid == vpid)
        return super().invalidate_all(vpid)

    def invalidate_vpid(self, vpid: int) -> int:
        self._mirror(lambda e: e.vpid == vpid)
        return super().invalidate_vpid(vpid)

    def flush_everything(self) -> int:
        self._mirror(lambda e: True)
        return super().flush_everything()


def install_domain(machine: Machine, init: DomainInit) -> Domain:
    """Give a domain exactly the P2M the trace names (owner, M2P, P2M). The machine
    allocates frames in its own order (:meth:`Machine.create_domain`); a trace may
    name any guest frames, so they are taken out of its free list here."""
    domain = Domain(DomId(init.domid), privileged=init.privileged)
    machine.domains[domain.domid] = domain
    taken = {mfn for _, mfn in init.p2m}
    machine._free = [m for m in machine._free if m not in taken]  # no public API adopts given frames
    for gfn, mfn in init.p2m:
        machine.owner[MFN(mfn)] = domain.domid
        machine.m2p[MFN(mfn)] = GFN(gfn)
        domain.p2m[GFN(gfn)] = MFN(mfn)
    return domain


def build_machine(header: Header) -> Machine:
    machine_init = header.machine
    assert machine_init is not None
    capacity, ways = header.tlb or (TLB_CAPACITY, TLB_WAYS)
    machine = Machine(machine_init.nr_frames, machine_init.hypervisor_frames, header.maxphyaddr, capacity, ways)
    machine.tlb = RecordingTlb(capacity, ways, machine.counters)
    for init in header.domains:
        install_domain(machine, init)
    for frame, data in header.memory:
        machine.mem.load_frame(frame, data)
    return machine


def build_backend(mode: Mode, machine: Machine, domain: Domain, machine_init: MachineInit) -> MmuBackend:
    tagged = machine_init.tagged
    if mode is Mode.PV:
        from ..hv.pv.backend import PvBackend

        return PvBackend(machine, domain, batch_size=machine_init.batch_size, tagged=tagged)
    if mode in (Mode.SHADOW, Mode.SHADOW_OOS):
        from ..hv.shadow.backend import ShadowBackend

        return ShadowBackend(machine, domain, tagged=tagged, oos=mode is Mode.SHADOW_OOS)
    from ..hv.hap.backend import HapBackend

    return HapBackend(machine, domain, tagged=tagged)


class HypervisorModel(Model):
    """A machine running guests under Xen PV, shadow paging or HAP: one backend per
    vCPU (one vCPU per domain), a scheduler switching them on the one physical CPU."""

    def __init__(self, header: Header) -> None:
        assert header.machine is not None
        self.mode = header.mode
        self.machine = build_machine(header)
        tlb = self.machine.tlb
        assert isinstance(tlb, RecordingTlb)
        self.tlb: RecordingTlb = tlb
        self.sched = Scheduler(self.tlb, self.machine.counters, header.machine.tagged)
        self.backends: list[MmuBackend] = []
        self.cpls: list[int] = []
        for vcpu in header.vcpus:
            assert vcpu.domid is not None
            backend = build_backend(self.mode, self.machine, self.machine.domain(vcpu.domid), header.machine)
            setattr(backend, "guest_state", vcpu.arch_state())
            init = next(d for d in header.domains if d.domid == vcpu.domid)
            if init.pv_base is not None:
                from ..hv.pv.backend import PvBackend
                from ..hv.pv.dom0 import adopt_built_base

                assert isinstance(backend, PvBackend)
                adopt_built_base(backend.vcpu, MFN(init.pv_base))
            self.backends.append(backend)
            self.cpls.append(vcpu.cpl)
            self.sched.add(vcpu.domid, backend)
        self.sched.switch_to(0)
        self.current = 0
        #: weak references to the machine inside the backends' state (Xen's frame
        #: table refers to its machine weakly): a clone must point them at its copy
        self.machine_refs = weak_references_to(self, self.machine)

    def clone(self) -> Model:
        """A deep copy whose weak references to the machine follow the copy (a plain
        deepcopy would share the original's)."""
        memo: dict[int, object] = {}
        machine = copy.deepcopy(self.machine, memo)
        for ref in self.machine_refs:
            memo[id(ref)] = weakref.ref(machine)
        twin = copy.deepcopy(self, memo)
        assert twin.machine is machine
        return twin

    @property
    def backend(self) -> MmuBackend:
        return self.backends[self.current]

    def hardware(self) -> Mmu:
        """The processor the current vCPU runs on (the backend's MMU)."""
        mmu = getattr(self.backend, "mmu")
        assert isinstance(mmu, Mmu)
        return mmu

    # -- the model's run ------------------------------------------------------------------
    def step(self, op: Op) -> Observation:
        before = self.machine.counters.copy()
        obs = self._run(op)
        return _counted(self.machine.counters, before, obs)

    def _run(self, op: Op) -> Observation:
        if isinstance(op, (Read, Write, Fetch)):
            return self._access(op)
        if isinstance(op, Switch):
            self.sched.switch_to(op.vcpu)
            self.current = op.vcpu
            return ok()
        if isinstance(op, (MmuUpdate, MmuextOp, UpdateVaMapping, Multicall)):
            return self._hypercall(op)
        if isinstance(op, PteWrite) and op.level is not None:
            self.backend.write_pte(GFN(op.table), op.index, Level(op.level), op.value)
            return ok()
        if isinstance(op, RegWrite) and op.reg is Register.CR3:
            self.backend.load_cr3(GFN(op.value >> PAGE_SHIFT))
            return ok()
        if isinstance(op, Invlpg):
            self.backend.invlpg(op.va)
            return ok()
        raise RefmodelError(f"'{op_name(op)}' is not an operation of mode {self.mode.value}")

    def _access(self, op: AccessOp) -> Observation:
        if not is_canonical(op.va):
            return gp_obs(0)  # SDM Vol. 1 3.3.7.1: delivered to the guest, no exit
        if self.mode is Mode.PV:
            return mmu_access(self.hardware(), op)  # a PV guest runs on the real MMU
        backend = self.backend
        cpl = self.cpls[self.current] if op.cpl is None else op.cpl
        kind = AccessKind.READ if isinstance(op, Read) else AccessKind.WRITE if isinstance(op, Write) else AccessKind.FETCH
        out = backend.access(op.va, kind, cpl, op.value if isinstance(op, Write) else 0)
        state: ArchState = getattr(backend, "guest_state")
        setattr(backend, "guest_state", replace(state, cpl=self.cpls[self.current]))
        if isinstance(out, PageFault):
            return page_fault_obs(out.cr2, int(out.error_code))
        return ok() if isinstance(op, Write) else ok(out)

    def _hypercall(self, op: Hypercall) -> Observation:
        """One hypercall by the current vCPU (xen/include/public/xen.h ABI): what the
        guest sees is the return value and the done count (mmu_update, mmuext_op) or
        each entry's result (multicall)."""
        from ..hv.pv import hypercall

        vcpu = getattr(self.backend, "vcpu")
        if isinstance(op, MmuUpdate):
            batch = hypercall.mmu_update(vcpu, pv_requests(op), op.foreigndom)
            return Observation(Result.OK, ret=batch.rc, done=batch.done)
        if isinstance(op, MmuextOp):
            batch = hypercall.mmuext_op(vcpu, pv_mmuext_ops(op), op.foreigndom)
            return Observation(Result.OK, ret=batch.rc, done=batch.done)
        if isinstance(op, UpdateVaMapping):
            return Observation(Result.OK, ret=hypercall.update_va_mapping(vcpu, op.va, op.val, op.flags))
        result = hypercall.multicall(vcpu, pv_multicall_entries(op))
        return Observation(Result.OK, ret=result.rc, results=tuple(e.result for e in result.entries))

    # -- every allowed outcome ----------------------------------------------------------------
    def may_branch(self, op: Op) -> bool:
        """An access branches only if some legal TLB may hold a translation for its
        page (the model's own TLB holds a subset of those): with none, every
        processor walks the tables as they are, as the model does. Out-of-sync
        shadows always branch: the hypervisor may resync them first."""
        if not super().may_branch(op) or self.mode is Mode.SHADOW_OOS:
            return super().may_branch(op)
        assert isinstance(op, (Read, Write, Fetch))
        mmu = self.hardware()
        return bool(self.tlb.cacheable.for_access(op.va, mmu.vpid, mmu.state.pcid))

    def outcomes(self, op: Op) -> list[Outcome]:
        own = self.clone()
        obs = own.step(op)
        result = [Outcome(obs, own, own_source(op, obs))]
        if not isinstance(op, (Read, Write, Fetch)) or not self.may_branch(op):
            return result
        mmu = self.hardware()
        vpid, pcid = mmu.vpid, mmu.state.pcid
        fresh = self.clone()
        assert isinstance(fresh, HypervisorModel)
        fresh._resync()
        fresh._forget(op.va, vpid, pcid)
        result.append(Outcome(fresh.step(op), fresh, "a walk of the guest's page tables as they are now"))
        for entry in self.tlb.cacheable.for_access(op.va, vpid, pcid):
            stale = self.clone()
            assert isinstance(stale, HypervisorModel)
            stale._forget(op.va, vpid, pcid)
            stale.tlb.fill(entry)
            result.append(Outcome(stale.step(op), stale, f"the cached translation {_describe(entry)}"))
        return result

    def _resync(self) -> None:
        """Out-of-sync shadow tables: bring them in sync, as the hypervisor may at
        any time (Xen resyncs on its own schedule too), so that the guest's current
        entries are what the shadows say. Silent, like :meth:`_forget`."""
        resync_all = getattr(self.backend, "resync_all", None)
        if resync_all is None or not getattr(self.backend, "oos_enabled", False):
            return
        before = self.machine.counters.copy()
        resync_all()
        self.machine.counters.events = before.events
        self.machine.counters.exits = before.exits

    def _forget(self, va: int, vpid: int, pcid: int) -> None:
        """Drop the TLB's entries for ``va`` silently: the processor's choice, not an
        invalidation anyone required."""
        before = self.machine.counters.copy()
        self.tlb.mirror = False
        try:
            self.tlb.invalidate_page(va, vpid, pcid, include_global=True)
        finally:
            self.tlb.mirror = True
        self.machine.counters.events = before.events
        self.machine.counters.exits = before.exits

    def fingerprint(self) -> Hashable:
        return structural_key(self, {})


def weak_references_to(root: object, target: object) -> list[weakref.ref[object]]:
    """Every ``weakref.ref`` to ``target`` in the object graph below ``root``."""
    found: list[weakref.ref[object]] = []
    seen: set[int] = set()
    todo: list[object] = [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or obj is None or isinstance(obj, (bool, int, str, bytes, bytearray, enum.Enum)):
            continue
        seen.add(id(obj))
        if isinstance(obj, weakref.ref):
            if obj() is target:
                found.append(obj)
        elif isinstance(obj, dict):
            todo.extend(obj.keys())
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            todo.extend(obj)
        elif hasattr(obj, "__dict__"):
            todo.extend(vars(obj).values())
    return found


#: Attributes that record what happened, not what can happen next.
HISTORY_ATTRIBUTES = frozenset({"counters", "exits", "calls", "mmuext_cmds", "l1_update_calls", "stats"})


def structural_key(obj: object, memo: dict[int, int]) -> Hashable:
    """A hashable value equal for two object graphs with the same contents: the
    fingerprint of a hypervisor model, whose state lives in many objects (page types,
    shadow tables, out-of-sync pages, EPT). Counters are history and left out;
    weak references are skipped."""
    if obj is None or isinstance(obj, (bool, int, str, bytes, enum.Enum)):
        return obj
    if isinstance(obj, bytearray):
        return bytes(obj)
    if isinstance(obj, (weakref.ref, weakref.WeakKeyDictionary, weakref.WeakValueDictionary, Counters)):
        return None
    if id(obj) in memo:
        return ("ref", memo[id(obj)])
    memo[id(obj)] = len(memo)
    numbers = _numbers_only(obj)
    if numbers is not None:
        return numbers
    if isinstance(obj, (list, tuple)):
        return tuple(structural_key(x, memo) for x in obj)
    if isinstance(obj, dict):
        items = sorted(obj.items(), key=lambda kv: repr(kv[0]))
        return ("dict",) + tuple((structural_key(k, memo), structural_key(v, memo)) for k, v in items)
    if isinstance(obj, (set, frozenset)):
        return ("set",) + tuple(sorted((structural_key(x, memo) for x in obj), key=repr))
    fields = getattr(obj, "__dict__", None)
    if fields is None:
        slots = getattr(type(obj), "__slots__", ())
        fields = {name: getattr(obj, name) for name in slots if hasattr(obj, name)}
    return (type(obj).__name__,) + tuple(
        (name, structural_key(value, memo)) for name, value in sorted(fields.items()) if name not in HISTORY_ATTRIBUTES
    )


def _numbers_only(obj: object) -> Hashable | None:
    """The key of a container of plain numbers (frame tables, P2Ms, free lists: the
    bulk of a machine), without visiting each number; None for anything else."""
    if isinstance(obj, (list, tuple)) and all(type(x) is int for x in obj):
        return ("list", tuple(obj))
    if isinstance(obj, dict) and all(type(k) is int and type(v) is int for k, v in obj.items()):
        return ("dict",) + tuple(sorted(obj.items()))
    return None


def pv_requests(op: MmuUpdate) -> tuple[PvMmuUpdate, ...]:
    from ..hv.pv.abi import MmuUpdate as PvMmuUpdate

    return tuple(PvMmuUpdate(r.ptr, r.val) for r in op.reqs)


def pv_mmuext_ops(op: MmuextOp) -> tuple[PvMmuextOp, ...]:
    from ..hv.pv.abi import MmuextOp as PvMmuextOp

    return tuple(PvMmuextOp(e.cmd, e.arg1, e.arg2) for e in op.ops)


def pv_multicall_entries(op: Multicall) -> tuple[MulticallEntry, ...]:
    """``struct multicall_entry`` for each call, its arguments as the C call takes
    them (refmodel.hv.pv.multicall: ``pdone`` NULL)."""
    from ..hv.pv.abi import Hypercall as Number
    from ..hv.pv.abi import MulticallEntry as Entry

    entries: list[MulticallEntry] = []
    for call in op.calls:
        if isinstance(call, MmuUpdate):
            reqs = pv_requests(call)
            entries.append(Entry(Number.MMU_UPDATE, args=(reqs, len(reqs), 0, call.foreigndom)))
        elif isinstance(call, MmuextOp):
            ops = pv_mmuext_ops(call)
            entries.append(Entry(Number.MMUEXT_OP, args=(ops, len(ops), 0, call.foreigndom)))
        elif isinstance(call, UpdateVaMapping):
            entries.append(Entry(Number.UPDATE_VA_MAPPING, args=(call.va, call.val, call.flags)))
        else:
            inner = pv_multicall_entries(call)
            entries.append(Entry(Number.MULTICALL, args=(inner, len(inner))))
    return tuple(entries)


# ---------------------------------------------------------------------------------
# Building a model, replaying a trace
# ---------------------------------------------------------------------------------


def build_model(header: Header) -> Model:
    """The model a trace's header describes."""
    if header.mode is Mode.NATIVE:
        return NativeModel.from_header(header)
    return HypervisorModel(header)


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
    try:
        model = build_model(trace.header)
        return [run_step(model, step) for step in trace.steps]
    except TraceError as err:
        raise err.with_source(trace.source) from None
    except RefmodelError as err:
        raise TraceError(1, None, f"the model cannot build this initial state: {err}", trace.source) from None


def annotate(trace: Trace, counters: bool = True) -> Trace:
    """The trace with every step's ``obs`` replaced by the model's."""
    observations = replay(trace)
    steps = tuple(
        replace(step, obs=obs if counters else obs.without_counters())
        for step, obs in zip(trace.steps, observations)
    )
    return replace(trace, steps=steps)
