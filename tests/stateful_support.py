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
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import hypothesis.strategies as st
from hypothesis import settings

from refmodel.arch.access import AccessKind
from refmodel.arch.pte import Level, PteFlag
from refmodel.arch.types import PAGE_SHIFT, PAGE_SIZE
from refmodel.guest.kernel import GuestKernel, Observation
from refmodel.guest.ops import MmuBackend
from refmodel.hv.hap import HapBackend, hap_isolated
from refmodel.hv.machine import DOMID_XEN, Machine
from refmodel.hv.modes import ModeSpec, build_backend
from refmodel.hv.pv import FrameTable, PvBackend, PvVcpu, frame_table_of
from refmodel.hv.pv.pagetype import guest_slots, is_guest_l4_slot
from refmodel.hv.pv.pteflags import entry_mfn
from refmodel.hv.shadow import ShadowBackend, shadow_sound

# -- profiles -----------------------------------------------------------------------------------

#: Sequence budgets per profile: examples are multiplied, steps per sequence too.
PROFILE_SCALE = {"ci": (1, 1), "long": (25, 3)}


def profile_name() -> str:
    return os.environ.get("HYPOTHESIS_PROFILE", "ci")


def machine_settings(examples: int, steps: int) -> settings:
    """Settings for one state machine: ``examples`` sequences of up to ``steps`` steps
    under the ``ci`` profile, scaled up under ``long``. ``STATEFUL_EXAMPLES`` and
    ``STATEFUL_STEPS`` override both (the benchmark and bug hunts use them)."""
    scale_examples, scale_steps = PROFILE_SCALE.get(profile_name(), (1, 1))
    n = int(os.environ.get("STATEFUL_EXAMPLES", examples * scale_examples))
    k = int(os.environ.get("STATEFUL_STEPS", steps * scale_steps))
    return settings(max_examples=n, stateful_step_count=k)


# -- guest programs ------------------------------------------------------------------------------

#: Where programs map memory: 8 pages each, placed to share and to cross table
#: boundaries (the second crosses a 2 MiB boundary, the third a 1 GiB one, the
#: fourth sits in another 512 GiB slot).
REGIONS = (0x0000_0000_0040_0000, 0x0000_0000_005F_C000, 0x0000_0000_7FFF_C000, 0x0000_6000_0000_0000)
REGION_PAGES = 8
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


GuestOp = Map | Unmap | Protect | Remap | Fork | Switch | Touch


def region_range(region: int, first: int, npages: int) -> tuple[int, int]:
    """The page-aligned start and page count of a range inside a region."""
    first = min(first, REGION_PAGES - 1)
    return REGIONS[region] + first * PAGE_SIZE, max(1, min(npages, REGION_PAGES - first))


def guest_ops() -> st.SearchStrategy[GuestOp]:
    """One guest operation; touches are the most frequent, as in real workloads."""
    region = st.integers(0, len(REGIONS) - 1)
    page = st.integers(0, REGION_PAGES - 1)
    count = st.integers(1, REGION_PAGES)
    touch = st.builds(
        Touch, region, page, st.sampled_from((0, 8, PAGE_SIZE - 8)),
        st.sampled_from((AccessKind.READ, AccessKind.WRITE, AccessKind.WRITE, AccessKind.FETCH)),
        st.integers(0, (1 << 64) - 1),
    )
    return st.one_of(
        st.builds(Map, region, page, count, st.booleans(), st.booleans()),
        touch,
        touch,
        st.builds(Unmap, region, page, count),
        st.builds(Protect, region, page, count, st.booleans()),
        st.builds(Remap, region, page, count),
        st.just(Fork()),
        st.builds(Switch, st.integers(0, MAX_PROCESSES - 1)),
    )


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
        kernel.touch(va, op.kind, op.value)
        return True
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
    """Every violation of the safety invariant of ``backend``'s mode (empty: holds)."""
    if isinstance(backend, ShadowBackend):
        return shadow_sound(backend)
    if isinstance(backend, HapBackend):
        return hap_isolated(backend)
    if isinstance(backend, PvBackend):
        return pv_problems(frame_table_of(backend.machine), [backend.vcpu])
    return []


def table_entries(machine: Machine, mfn: int) -> tuple[int, ...]:
    """The 512 entries of a frame, read in one go."""
    return struct.unpack("<512Q", machine.mem.frame_bytes(mfn))


def implied_type_counts(ft: FrameTable, vcpus: Sequence[PvVcpu]) -> dict[int, int]:
    """Every frame's type count recomputed from the tables: one per pin, per base
    pointer, per present L2..L4 entry of a validated table naming another table, per
    present RW entry of a validated L1 (Xen's ``get_page_from_lNe`` references)."""
    counts: dict[int, int] = {}
    for mfn, page in ft.pages.items():
        counts[mfn] = counts.get(mfn, 0) + int(page.pinned)
        level = page.type.level
        if level is None or not page.validated:
            continue
        entries = table_entries(ft.machine, mfn)
        for slot in guest_slots(level):
            entry = entries[slot]
            if not entry & 1:
                continue
            target = entry_mfn(entry)
            if (level is Level.L1 and entry & PteFlag.RW) or (level is not Level.L1 and target != mfn):
                counts[target] = counts.get(target, 0) + 1
    for v in vcpus:
        for base in (v.guest_table, v.guest_table_user):
            if base is not None:
                counts[base] = counts.get(base, 0) + 1
    return counts


def pv_problems(ft: FrameTable, vcpus: Sequence[PvVcpu]) -> list[str]:
    """PV page-table integrity and isolation (Xen's type system, xen/arch/x86/mm.c):

    - type counts are exactly what the tables, pins and base pointers imply;
    - a table in use is validated;
    - a validated L1 maps only its owner's frames, and never a page table writable;
    - a validated L2..L4 entry names a validated table of the level below that the
      domain owns (or, read-only, one of its own level: a linear page table);
    - Xen's L4 slots stay empty; no entry names a DOMID_XEN frame;
    - each vCPU's CR3 is its base pointer, a validated L4;
    - no TLB entry of a PV vCPU reaches a frame its domain does not own, or writes
      a page table.
    """
    machine = ft.machine
    problems: list[str] = []
    counts = implied_type_counts(ft, vcpus)
    for mfn in sorted(set(counts) | set(ft.pages)):
        page = ft.info(mfn)
        if page.count != counts.get(mfn, 0):
            problems.append(f"mfn {mfn:#x}: type count {page.count}, the tables imply {counts.get(mfn, 0)}")
        if page.count and not page.validated:
            problems.append(f"mfn {mfn:#x}: {page.type.value} in use but not validated")
    for mfn, page in list(ft.pages.items()):
        if page.type.level is not None and page.validated:
            problems += _pv_table_problems(ft, mfn, page.type.level)
    for v in vcpus:
        base = v.guest_table
        if base is not None:
            if v.mmu.state.cr3 >> PAGE_SHIFT != base:
                problems.append(f"domain {v.domain.domid}: CR3 {v.mmu.state.cr3:#x} is not its base {base:#x}")
            if ft.info(base).type.level is not Level.L4 or not ft.info(base).validated:
                problems.append(f"domain {v.domain.domid}: base {base:#x} is not a validated L4")
    problems += tlb_problems(machine, {v.vpid: v.domain.domid for v in vcpus})
    for e in machine.tlb.entries():
        page = ft.info(e.frame >> PAGE_SHIFT)
        if e.vpid in {v.vpid for v in vcpus} and e.rights.writable and page.count and page.type.is_page_table:
            problems.append(f"TLB lets vpid {e.vpid} write page table mfn {e.frame >> PAGE_SHIFT:#x}")
    return problems


def _pv_table_problems(ft: FrameTable, mfn: int, level: Level) -> list[str]:
    machine = ft.machine
    owner = machine.owner_of(mfn)
    problems: list[str] = []
    entries = table_entries(machine, mfn)
    if level is Level.L4:
        problems += [f"L4 {mfn:#x}: Xen slot {s} is present" for s in range(512)
                     if not is_guest_l4_slot(s) and entries[s] & 1]
    for slot in guest_slots(level):
        entry = entries[slot]
        if not entry & 1:
            continue
        target = entry_mfn(entry)
        where = f"{level.name} {mfn:#x}[{slot}] -> {target:#x}"
        if machine.owner_of(target) == DOMID_XEN:
            problems.append(f"{where}: a hypervisor frame")
        elif machine.owner_of(target) != owner:
            problems.append(f"{where}: owned by {machine.owner_of(target)}, not the table's owner {owner}")
        page = ft.info(target)
        if level is Level.L1:
            if entry & PteFlag.RW and page.type.is_page_table and page.count:
                problems.append(f"{where}: a writable mapping of a {page.type.value}")
            continue
        below = page.type.level
        linear = below is level and not entry & PteFlag.RW
        if not page.validated or (below is None or (below != level - 1 and not linear)):
            problems.append(f"{where}: target is {page.type.value} (validated={page.validated})")
    return problems


def tlb_problems(machine: Machine, owners: dict[int, int]) -> list[str]:
    """TLB isolation: an entry tagged with a vCPU's VPID reaches only frames of that
    vCPU's domain. ``owners`` maps each tag to the one domain that uses it."""
    problems = []
    for e in machine.tlb.entries():
        domid = owners.get(e.vpid)
        if domid is None:
            continue
        first = e.frame >> PAGE_SHIFT
        for mfn in range(first, first + (e.size.value >> PAGE_SHIFT)):
            if machine.owner_of(mfn) != domid:
                problems.append(f"TLB (vpid {e.vpid}, vpn {e.vpn:#x}) reaches mfn {mfn:#x} of {machine.owner_of(mfn)}, not domain {domid}")
                break
    return problems
