"""Shared pieces of the stateful tests (``tests/test_stateful_*.py``): how many
sequences each profile runs, guest programs as values, and the checks that must
hold after every step.

Guest programs
    A guest program is a list of :data:`GuestOp` values — map / unmap / protect /
    remap / fork / switch / touch — over a few fixed regions chosen to cross
    2 MiB, 1 GiB and 512 GiB table boundaries. :func:`apply_op` runs one on a
    :class:`~refmodel.guest.kernel.GuestKernel`, skipping an operation the kernel
    would refuse (an overlapping map) or could not afford (its frames are never
    reused); the decision depends only on the kernel's own bookkeeping, so every
    mode skips the same operations. A shrunk counterexample is therefore a plain
    list of ops that :func:`run_program` replays under any :class:`ModeSpec` — the
    form a kept regression test takes (docs/stateful.md).

Profiles
    :func:`machine_settings` sizes a state machine for the active Hypothesis profile
    (``HYPOTHESIS_PROFILE``, registered in tests/conftest.py): ``ci`` keeps every
    stateful test together within about three minutes on two cores; ``long`` runs
    many more and longer sequences.
"""

import os
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings

import refmodel.hv.pv.hypercall as pv_hypercall
import refmodel.hv.pv.multicall as pv_multicall
from refmodel.account.events import Event
from refmodel.arch.access import Access, AccessKind
from refmodel.arch.pte import Level, PteFlag
from refmodel.arch.tlb import Tlb
from refmodel.arch.vcpu import ArchState
from refmodel.arch.types import MFN, PAGE_SHIFT, PAGE_SIZE
from refmodel.arch.walk import EntryMemory, PagingContext, Rights, Translation, walk
from refmodel.guest.kernel import FaultLoop, GuestKernel, Observation, Process, Vma
from refmodel.guest.ops import MmuBackend
from refmodel.hv.hap import EptRights, HapBackend
from refmodel.hv.hap.mmu import CombinedTlbEntry
from refmodel.hv.machine import DOMID_SELF, Machine
from refmodel.hv.modes import ModeSpec, build_backend
from refmodel.hv.invariants import all_violations
from refmodel.hv.native import NativeBackend
from refmodel.hv.pv import BatchResult, FrameTable, MmuUpdate, PvBackend, PvVcpu
from refmodel.hv.shadow import ShadowBackend
from refmodel.hv.shadow.guest import GuestPhysMemory, hardware_state

# -- profiles -----------------------------------------------------------------------------------

#: Sequence budgets per profile: examples are multiplied, steps per sequence too.
PROFILE_SCALE = {"ci": (1, 1), "long": (25, 3)}


def profile_name() -> str:
    return os.environ.get("HYPOTHESIS_PROFILE", "ci")


def machine_settings(examples: int, steps: int) -> settings:
    """Settings for one state machine: ``examples`` sequences of up to ``steps`` steps
    under the ``ci`` profile, scaled up under ``long``. ``STATEFUL_EXAMPLES`` and
    ``STATEFUL_STEPS`` override both (the benchmark and bug hunts use them). One bug
    is reported at a time: shrinking several at once costs minutes."""
    scale_examples, scale_steps = PROFILE_SCALE.get(profile_name(), (1, 1))
    n = int(os.environ.get("STATEFUL_EXAMPLES", examples * scale_examples))
    k = int(os.environ.get("STATEFUL_STEPS", steps * scale_steps))
    return settings(
        max_examples=n, stateful_step_count=k, report_multiple_bugs=False,
        deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow],
    )


# -- guest programs ------------------------------------------------------------------------------

#: Where programs map memory: 4 pages each, placed to share and to cross table
#: boundaries (the second crosses a 2 MiB boundary, the third a 1 GiB one, the
#: fourth sits in another 512 GiB slot). Few pages, so that operations meet.
REGIONS = (0x0000_0000_0040_0000, 0x0000_0000_005F_E000, 0x0000_0000_7FFF_E000, 0x0000_6000_0000_0000,
           0x0000_0000_0080_0000)
REGION_PAGES = 4
#: The last region is where self-mapping programs map their page tables: ``Map``
#: never uses it, so :class:`MapTable` finds free pages there.
TABLE_REGION = len(REGIONS) - 1
#: Guest frames of every domain the stateful tests build (small: fast to create).
GUEST_FRAMES = 256
#: An operation that may allocate runs only if this many guest frames are left.
FRAME_RESERVE = 48
MAX_PROCESSES = 4


@dataclass(frozen=True)
class Map:
    region: int
    first: int
    npages: int
    writable: bool
    populate: bool


@dataclass(frozen=True)
class Unmap:
    region: int
    first: int
    npages: int


@dataclass(frozen=True)
class Protect:
    region: int
    first: int
    npages: int
    writable: bool


@dataclass(frozen=True)
class Remap:
    region: int
    first: int
    npages: int


@dataclass(frozen=True)
class Fork:
    pass


@dataclass(frozen=True)
class Switch:
    process: int  #: taken modulo the number of processes


@dataclass(frozen=True)
class Touch:
    region: int
    page: int
    offset: int  #: 8-byte aligned offset into the page
    kind: AccessKind
    value: int = 0


@dataclass(frozen=True)
class MapTable:
    """A raw PTE write: the guest maps one of its own page tables (``table`` indexes
    the current process's tables, root first) at a page of a region, for user mode —
    read-only or writable. Natively its stores then edit its page tables directly;
    a hypervisor must notice (shadow: write-protect and emulate). Not for PV guests,
    which Xen never lets map a page table writable and whose tables hold MFNs."""

    region: int
    page: int
    table: int
    writable: bool


GuestOp = Map | Unmap | Protect | Remap | Fork | Switch | Touch | MapTable

#: Kernels that run self-mapping programs (see :func:`allow_self_mapping`).
SELF_MAPPING: "weakref.WeakSet[GuestKernel]" = weakref.WeakSet()
#: Entry bits a self-mapping guest's stores keep: no reserved bit, no large page.
SAFE_ENTRY_FLAGS = int(PteFlag.P | PteFlag.RW | PteFlag.US | PteFlag.A | PteFlag.D | PteFlag.XD)


def allow_self_mapping(kernel: GuestKernel) -> None:
    """Let ``kernel`` run :class:`MapTable`. Call it before the program starts: every
    value the kernel stores is then made a plausible entry — a frame it has
    allocated, safe flags — because its stores may land in its page tables, and a
    table naming memory the guest does not have is where modes legitimately part (a
    HAP domain touching it is crashed). And, as a correct kernel must once a store
    may have edited a page table, it flushes its TLB after each one: what a stale
    entry shows is the TLB's choice, not the architecture's, and differs by mode.
    Its native reference must run without PCIDs, whose switches keep entries a
    store into another process's tables made stale."""
    SELF_MAPPING.add(kernel)


def stored_value(kernel: GuestKernel, value: int) -> int:
    if kernel not in SELF_MAPPING:
        return value
    frame = (value >> PAGE_SHIFT) % kernel._next_frame
    return (frame << PAGE_SHIFT) | (value & SAFE_ENTRY_FLAGS)


def region_range(region: int, first: int, npages: int) -> tuple[int, int]:
    """The page-aligned start and page count of a range inside a region."""
    first = min(first, REGION_PAGES - 1)
    return REGIONS[region] + first * PAGE_SIZE, max(1, min(npages, REGION_PAGES - first))


#: How often each kind of guest operation is drawn, in parts. Touches dominate, as in
#: real workloads, so that maps, writes, unmaps and reads meet on the same pages;
#: switches and forks (a CR3 load resynchronises and flushes everything) are rarer.
OP_WEIGHTS = {
    "touch": 8, "map": 3, "unmap": 2, "protect": 2, "remap": 2, "fork": 1, "switch": 1,
    "map_table": 2, "table_store": 3,  # self-mapping programs only
}


def guest_ops(self_mapping: bool = False) -> st.SearchStrategy[GuestOp]:
    """One guest operation, drawn by :data:`OP_WEIGHTS`. ``self_mapping`` adds
    :class:`MapTable` (for kernels that allow it)."""
    # Half the operations land in the first region; mmap never in the table region.
    map_region = st.sampled_from((0, 0, 0, 1, 2, 3))
    region = st.sampled_from((0, 0, 0, 1, 2, 3, TABLE_REGION) if self_mapping else (0, 0, 0, 1, 2, 3))
    page = st.integers(0, REGION_PAGES - 1)
    count = st.integers(1, REGION_PAGES)
    offset = st.sampled_from((0, 8, PAGE_SIZE - 8))
    value = st.integers(0, (1 << 64) - 1)
    table_page = st.integers(0, 1)  # two pages, so that mappings and stores meet
    kinds: dict[str, st.SearchStrategy[GuestOp]] = {
        "touch": st.builds(
            Touch, region, page, offset,
            st.sampled_from((AccessKind.READ, AccessKind.WRITE, AccessKind.WRITE, AccessKind.FETCH)), value,
        ),
        "map": st.builds(Map, map_region, page, count, st.booleans(), st.booleans()),
        "unmap": st.builds(Unmap, region, page, count),
        "protect": st.builds(Protect, region, page, count, st.booleans()),
        "remap": st.builds(Remap, region, page, count),
        "fork": st.just(Fork()),
        "switch": st.builds(Switch, st.integers(0, MAX_PROCESSES - 1)),
        "map_table": st.builds(MapTable, st.just(TABLE_REGION), table_page, st.integers(0, 15), st.booleans()),
        "table_store": st.builds(
            Touch, st.just(TABLE_REGION), table_page, offset, st.sampled_from((AccessKind.WRITE, AccessKind.READ)), value
        ),
    }
    if not self_mapping:
        del kinds["map_table"], kinds["table_store"]
    weighted = [name for name in kinds for _ in range(OP_WEIGHTS[name])]
    return st.sampled_from(weighted).flatmap(lambda name: kinds[name])


def frames_left(kernel: GuestKernel) -> int:
    """Guest frames the kernel has not handed out yet (it never reuses one)."""
    return kernel.nr_frames - kernel._next_frame


def apply_op(kernel: GuestKernel, op: GuestOp) -> bool:
    """Run ``op`` on the kernel's current process; False if it was skipped."""
    proc = kernel.current
    assert proc is not None, "boot the kernel (create a process) first"
    if isinstance(op, Switch):
        kernel.switch_to(1 + op.process % len(kernel.processes))
        return True
    if isinstance(op, Touch):
        if frames_left(kernel) < 8:
            return False
        va = REGIONS[op.region] + op.page * PAGE_SIZE + op.offset
        try:
            kernel.touch(va, op.kind, stored_value(kernel, op.value))
        except FaultLoop:
            if kernel not in SELF_MAPPING:
                raise
            # The guest's own stores rewrote its tables under its bookkeeping (an
            # upper entry it believes present is not): every mode loops alike, and
            # the faults it took are in the record.
            return True
        if kernel in SELF_MAPPING and op.kind is AccessKind.WRITE:
            kernel.mmu.flush_tlb()  # the store may have edited a page table
        return True
    if isinstance(op, MapTable):
        return map_table(kernel, proc, op)
    if frames_left(kernel) < FRAME_RESERVE:
        return False
    if isinstance(op, Fork):
        if len(kernel.processes) >= MAX_PROCESSES:
            return False
        kernel.fork(proc.pid)
        return True
    va, npages = region_range(op.region, op.first, op.npages)
    if isinstance(op, Map):
        if any(proc.vma_for(va + i * PAGE_SIZE) for i in range(npages)):
            return False
        kernel.map_range(proc.pid, va, npages, op.writable, op.populate)
    elif isinstance(op, Unmap):
        kernel.unmap_range(proc.pid, va, npages)
    elif isinstance(op, Protect):
        kernel.protect(proc.pid, va, npages, op.writable)
    else:
        kernel.remap(proc.pid, va, npages)
    return True


def map_table(kernel: GuestKernel, proc: Process, op: MapTable) -> bool:
    """The raw PTE write of :class:`MapTable` into a page no mapping covers, with the
    INVLPG a kernel owes after it; the page becomes a one-page mapping of the process
    (so a later mmap cannot silently replace it, fork shares it, munmap clears it)."""
    if kernel not in SELF_MAPPING or frames_left(kernel) < FRAME_RESERVE:
        return False
    va = REGIONS[op.region] + op.page * PAGE_SIZE
    if proc.vma_for(va) is not None or va in proc.mapped:
        return False
    tables = [proc.root] + [t for _, t in sorted(proc.tables.items())]
    table = tables[op.table % len(tables)]
    flags = int(PteFlag.P | PteFlag.US | PteFlag.XD) | (int(PteFlag.RW) if op.writable else 0)
    kernel._set_leaf(proc, va, kernel.entry(table, flags))
    proc.vmas.append(Vma(va, 1, op.writable))
    proc.mapped.add(va)
    kernel.mmu.invlpg(va)
    return True


@dataclass(frozen=True)
class GuestRecord:
    """What the guest could observe: every access and fault, and its leaf entries."""

    observations: tuple[Observation, ...]
    page_tables: dict[int, dict[int, tuple[int, int]]]


def record_of(kernel: GuestKernel) -> GuestRecord:
    return GuestRecord(tuple(kernel.observations), kernel.page_table_view())


class GuestRun:
    """One guest kernel on a fresh backend of one mode, booted with one process."""

    def __init__(self, spec: ModeSpec, machine: Machine | None = None, domid: int = 1) -> None:
        self.spec = spec
        self.machine = machine if machine is not None or spec.mode.value == "native" else Machine()
        self.backend: MmuBackend = build_backend(spec, self.machine, domid=domid, nr_frames=GUEST_FRAMES)
        self.kernel = GuestKernel(self.backend, GUEST_FRAMES)
        self.kernel.create_process()

    def apply(self, op: GuestOp) -> bool:
        return apply_op(self.kernel, op)


def run_program(spec: ModeSpec, program: Sequence[GuestOp]) -> GuestRecord:
    """Run a whole guest program under ``spec`` and return what the guest saw."""
    run = GuestRun(spec)
    for op in program:
        run.apply(op)
    return record_of(run.kernel)


# -- invariants after every step ------------------------------------------------------------------


def backend_problems(backend: MmuBackend) -> list[str]:
    """Every violation of the isolation invariants (:mod:`refmodel.hv.invariants`:
    memory isolation, hypervisor integrity, PV page-table integrity, shadow
    soundness) for a backend alone on its machine, plus the EPT/TLB coherence of a
    HAP backend (:func:`hap_tlb_problems`). Empty: all hold."""
    if isinstance(backend, NativeBackend):
        return []
    machine: Machine = getattr(backend, "machine")
    problems = all_violations(machine, [backend], backend)
    if isinstance(backend, HapBackend):
        problems += hap_tlb_problems(backend)
    return problems


def leaving_state(regs: ArchState, guest: ArchState) -> ArchState:
    """What a vCPU leaves the CPU with: the register file, and the paging registers
    (CR0, CR2, CR3, CR4, EFER) as its backend keeps them for the guest."""
    return replace(regs, cr0=guest.cr0, cr2=guest.cr2, cr3=guest.cr3, cr4=guest.cr4, efer=guest.efer)


def hap_tlb_problems(backend: HapBackend) -> list[str]:
    """The hypervisor's side of EPT changes: a combined TLB entry of the domain's
    vCPU may only reach a machine frame its EPT still maps, with at least the EPT
    rights the entry cached — after narrowing or moving a mapping Xen must INVEPT
    (``ept_set_entry`` -> ``ept_sync_domain``; SDM Vol. 3C 29.4.3.1), or the guest
    keeps writing a frame it lost, or writes a log-dirty page unseen. (Memory
    isolation does not see this: the frame it lost is still its own.)"""
    problems = []
    for e in backend.machine.tlb.entries():
        if e.vpid != backend.vpid or not isinstance(e, CombinedTlbEntry):
            continue
        mfn = MFN(e.frame >> PAGE_SHIFT)
        gfn = backend.machine.m2p.get(mfn)
        mapping = backend.ept.lookup(gfn) if gfn is not None else None
        if mapping is None or mapping.mfn != mfn or not _covers(mapping.rights, e.ept):
            problems.append(f"TLB (vpid {e.vpid}, vpn {e.vpn:#x}) keeps mfn {mfn:#x} with EPT rights {e.ept}; "
                            f"the EPT now has {mapping}")
    return problems


def _covers(have: EptRights, cached: EptRights) -> bool:
    """``have`` grants every right ``cached`` does."""
    return (have.read or not cached.read) and (have.write or not cached.write) and (have.execute or not cached.execute)


# -- accounting of every PV batch ------------------------------------------------------------------
MmuUpdateFn = Callable[[PvVcpu, Sequence[MmuUpdate], "int | None", int], BatchResult]
#: The name both the hypercall entry points and the multicall dispatcher call.
PATCHED = "do_mmu_update"


class PvBatchMonitor:
    """Watches every ``mmu_update`` batch Xen runs — the guest kernel's, multicall
    entries and the test's own — while installed (between a machine's set-up and its
    teardown), and checks its accounting the moment it returns:

    - it read at least as many requests as it reports done, and no more than exist;
    - if a completed request changed an L2..L4 table, the batch ended with a flush of
      the domain's TLB ("flush_linear_pt", xen/arch/x86/mm.c ``do_mmu_update``): the
      full-flush counter moved and no non-global entry of the vCPU's tag is left.

    It wraps ``do_mmu_update`` where the hypercall entry points and the multicall
    dispatcher look it up; :meth:`uninstall` puts the original back."""

    def __init__(self) -> None:
        self.batches = 0
        self._saved: tuple[MmuUpdateFn, MmuUpdateFn] | None = None

    def install(self) -> None:
        assert self._saved is None, "monitor installed twice"
        self._saved = (getattr(pv_hypercall, PATCHED), getattr(pv_multicall, PATCHED))
        original = self._saved[0]

        def checked(v: PvVcpu, reqs: Sequence[MmuUpdate], count: int | None = None,
                    foreigndom: int = DOMID_SELF) -> BatchResult:
            return self._check(original, v, reqs, count, foreigndom)

        setattr(pv_hypercall, PATCHED, checked)
        setattr(pv_multicall, PATCHED, checked)

    def uninstall(self) -> None:
        if self._saved is not None:
            setattr(pv_hypercall, PATCHED, self._saved[0])
            setattr(pv_multicall, PATCHED, self._saved[1])
            self._saved = None

    def _check(self, original: MmuUpdateFn, v: PvVcpu, reqs: Sequence[MmuUpdate], count: int | None,
               foreigndom: int) -> BatchResult:
        ft, counters = v.frames, v.machine.counters
        upper = [_is_upper_table(ft, r.maddr >> PAGE_SHIFT) for r in reqs]
        flushes, entries = counters[Event.TLB_FLUSH_GLOBAL], counters[Event.HYPERCALL_ENTRY]
        result = original(v, reqs, count, foreigndom)
        self.batches += 1
        read = counters[Event.HYPERCALL_ENTRY] - entries
        assert result.done <= read <= len(reqs), f"mmu_update read {read} entries, did {result.done} of {len(reqs)}"
        if any(upper[: result.done]):
            assert counters[Event.TLB_FLUSH_GLOBAL] > flushes, (
                f"domain {v.domain.domid}: a batch changed an L2..L4 entry and went without its flush"
            )
            stale = [e for e in v.machine.tlb.entries() if e.vpid == v.vpid and not e.global_page]
            assert not stale, f"domain {v.domain.domid}: TLB entries survived the flush after an L2..L4 change"
        return result


def _is_upper_table(ft: FrameTable, mfn: int) -> bool:
    page = ft.pages.get(MFN(mfn))
    return page is not None and page.validated and page.type.level not in (None, Level.L1)


# -- what the hardware may use, against the guest's own tables ---------------------------------------


class Overlay:
    """Read-only view of entry memory for a side-effect-free walk: the walk's A/D
    writes land in a private overlay, never in the model."""

    def __init__(self, base: EntryMemory) -> None:
        self.base = base
        self.written: dict[int, int] = {}

    def read_u64(self, pa: int) -> int:
        return self.written.get(pa, self.base.read_u64(pa))

    def write_u64(self, pa: int, value: int) -> None:
        self.written[pa] = value


@dataclass(frozen=True)
class HardwareView:
    """How one backend's vCPU meets the hardware: the guest's tables (memory, paging
    context, and guest frame -> machine frame), the TLB and the tag its entries carry,
    and — shadow paging — the context of the shadow tables the processor walks."""

    guest_mem: EntryMemory
    guest_ctx: PagingContext
    to_machine: Callable[[int], int | None]
    tlb: Tlb
    vpid: int
    pcid: int
    hw_mem: EntryMemory | None = None
    hw_ctx: PagingContext | None = None


def hardware_view(backend: MmuBackend) -> HardwareView:
    if isinstance(backend, NativeBackend):
        return HardwareView(backend.mem, backend.mmu.ctx, lambda f: f, backend.mmu.tlb, backend.mmu.vpid, backend.mmu.state.pcid)
    if isinstance(backend, PvBackend):
        mmu = backend.vcpu.mmu
        return HardwareView(backend.machine.mem, mmu.ctx, lambda f: f, mmu.tlb, mmu.vpid, mmu.state.pcid)
    if isinstance(backend, HapBackend):
        p2m = GuestPhysMemory(backend.machine.mem, backend.domain)
        return HardwareView(p2m, backend.mmu.ctx, p2m.mfn, backend.mmu.tlb, backend.mmu.vpid, backend.mmu.state.pcid)
    assert isinstance(backend, ShadowBackend), f"no hardware view for {backend.mode}"
    hw_ctx = None
    if backend.root is not None:
        hw_ctx = hardware_state(backend.guest_state, backend.root.smfn).paging_context(backend.machine.mem.maxphyaddr)
    return HardwareView(backend.guest_mem, backend.guest_context(), backend.guest_mem.mfn, backend.mmu.tlb,
                        backend.mmu.vpid, 0, backend.machine.mem, hw_ctx)


def coherence_problems(backend: MmuBackend) -> list[str]:
    """After a guest-kernel operation the kernel has made every invalidation it owes
    (INVLPG after a change to a live mapping, a flush after fork): nothing the
    hardware can use for the current address space may grant more than the guest's
    own tables do now. Checked for every TLB entry of the vCPU's tag and current PCID,
    and — shadow paging — for the shadow translation of every address programs use
    (an out-of-sync L1 must have been resynced by the guest's INVLPG, oos.c rule 2).
    More restrictive is allowed (a shadow waits for the guest's A/D, a TLB entry may
    be older and narrower)."""
    view = hardware_view(backend)
    problems = []
    for e in view.tlb.entries():
        if e.vpid != view.vpid or not (e.pcid == view.pcid or e.global_page):
            continue
        va = e.vpn << e.size.shift
        problems += _exceeds(view, va, e.frame >> PAGE_SHIFT, e.rights, e.dirty, f"TLB entry for {va:#x}")
    if view.hw_mem is not None and view.hw_ctx is not None:
        for region in REGIONS:
            for i in range(REGION_PAGES):
                va = region + i * PAGE_SIZE
                shadow = walk(Overlay(view.hw_mem), view.hw_ctx, va, Access(AccessKind.READ, 3)).outcome
                if isinstance(shadow, Translation):
                    problems += _exceeds(view, va, shadow.pa >> PAGE_SHIFT, shadow.rights, shadow.dirty,
                                         f"shadow translation of {va:#x}")
    return problems


def _exceeds(view: HardwareView, va: int, mfn: int, rights: Rights, dirty: bool, what: str) -> list[str]:
    """What a hardware translation of ``va`` to ``mfn`` grants beyond the guest's."""
    guest = walk(Overlay(view.guest_mem), view.guest_ctx, va, Access(AccessKind.READ, 3)).outcome
    if not isinstance(guest, Translation):
        return [f"{what} maps mfn {mfn:#x}; the guest's tables map nothing there ({guest.cause.value})"]
    if view.to_machine(guest.pa >> PAGE_SHIFT) != mfn:
        return [f"{what} maps mfn {mfn:#x}; the guest's tables map gfn {guest.pa >> PAGE_SHIFT:#x}"]
    wider = [name for name, have, may in (
        ("writable", rights.writable, guest.rights.writable),
        ("user", rights.user, guest.rights.user),
        ("executable", not rights.execute_disable, not guest.rights.execute_disable),
        ("dirty", dirty, guest.dirty),
    ) if have and not may]
    return [f"{what} is {', '.join(wider)}; the guest's entry is not"] if wider else []
