"""The comparisons behind ``refmodel compare``: one guest workload, every mode.

The seed question — a classic xen-devel one: why is paravirtualization cheaper than
full virtualization, the vCPU context switch, the TLB flushes or the traps? Its
example: a process mallocs 4 MiB and touches every page — 1024 page-table entries
written. Under shadow paging each
write traps; a PV guest batches them into a few validated hypercalls; with nested
paging the writes are plain stores and the cost moves into longer TLB misses.

Each run builds a fresh machine, sets the workload up (process creation is not
counted), runs it, and reports what was counted while it ran. The guest-visible
record — values read, page faults seen, the guest's leaf entries with their A/D
bits — is compared across modes: it must be identical (Popek & Goldberg's
equivalence property), and the report says so only after checking it.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

from .account.costs import Cause, CostTable
from .account.events import Counters, Event, ExitReason
from .arch.access import AccessKind
from .arch.types import PAGE_SIZE
from .guest.kernel import GuestKernel, Observation, PageTableView, PteFlavour, as_stored_by
from .guest.ops import MmuBackend
from .hv.modes import GUEST_FRAMES, ModeSpec, build_backend

#: Where the scenarios map their buffer (an ordinary user address, 2 MiB aligned).
BUFFER_VA = 0x0000_0600_0000_0000


@dataclass(frozen=True)
class GuestRecord:
    """Everything the guest could observe."""

    observations: tuple[Observation, ...]
    page_tables: tuple[tuple[int, tuple[tuple[int, tuple[int, int]], ...]], ...]

    def as_stored_by(self, backend: MmuBackend) -> "GuestRecord":
        """This record's leaves as ``backend`` stores them (:func:`~refmodel.guest.kernel.as_stored_by`)."""
        return GuestRecord(self.observations, record_tables(as_stored_by(dict(self.page_tables_view()), backend)))

    def page_tables_view(self) -> PageTableView:
        return {pid: dict(leaves) for pid, leaves in self.page_tables}


def record_tables(view: PageTableView) -> tuple[tuple[int, tuple[tuple[int, tuple[int, int]], ...]], ...]:
    """A page-table view as a hashable, ordered record."""
    return tuple((pid, tuple(sorted(leaves.items()))) for pid, leaves in sorted(view.items()))


@dataclass(frozen=True)
class RunResult:
    spec: ModeSpec
    counters: Counters
    record: GuestRecord
    #: The backend the record came from: it says how its mode stores entries.
    backend: MmuBackend | None = field(default=None, compare=False)


Workload = Callable[[GuestKernel, int], None]


def seed_workload(pages: int) -> Workload:
    """malloc(pages * 4 KiB) populated at once, then one write and one read per page."""

    def run(kernel: GuestKernel, pid: int) -> None:
        kernel.map_range(pid, BUFFER_VA, pages, writable=True, populate=True)
        for i in range(pages):
            kernel.touch(BUFFER_VA + i * PAGE_SIZE, AccessKind.WRITE, i + 1)
        for i in range(pages):
            kernel.touch(BUFFER_VA + i * PAGE_SIZE, AccessKind.READ)

    return run


def remap_workload(pages: int) -> Workload:
    """Move ``pages`` live, touched pages to new frames (a page-table write and an
    INVLPG per page), then read them all back. Only the remap and the reads are
    counted: the set-up (populate and first touch) happens in :func:`remap_setup`."""

    def run(kernel: GuestKernel, pid: int) -> None:
        kernel.remap(pid, BUFFER_VA, pages)
        for i in range(pages):
            kernel.touch(BUFFER_VA + i * PAGE_SIZE, AccessKind.READ)

    return run


def remap_setup(pages: int) -> Workload:
    def setup(kernel: GuestKernel, pid: int) -> None:
        kernel.map_range(pid, BUFFER_VA, pages, writable=True, populate=True)
        for i in range(pages):
            kernel.touch(BUFFER_VA + i * PAGE_SIZE, AccessKind.WRITE, i + 1)

    return setup


def run_workload(
    spec: ModeSpec, workload: Workload, setup: Workload | None = None, flavour: PteFlavour = PteFlavour.LINUX
) -> RunResult:
    """Run one workload under one mode on a fresh machine, the guest writing the
    A/D flags of ``flavour``."""
    backend = build_backend(spec)
    kernel = GuestKernel(backend, GUEST_FRAMES, flavour=flavour)
    pid = kernel.create_process()
    if setup is not None:
        setup(kernel, pid)
    kernel.observations.clear()
    before = backend.counters.copy()
    workload(kernel, pid)
    counted = backend.counters.since(before)
    view = kernel.page_table_view()
    record = GuestRecord(tuple(kernel.observations), record_tables(view))
    return RunResult(spec, counted, record, backend)


def equivalent(results: list[RunResult]) -> list[str]:
    """Modes whose guest-visible record differs from the first one's (empty: all
    agree), the first one's leaves taken as each mode stores them (Xen PV adds bits,
    :mod:`refmodel.hv.pv.adjust`). The first result must be of a mode that stores
    entries as written (native)."""
    first = results[0].record
    return [r.spec.label for r in results[1:] if r.record != (first if r.backend is None else first.as_stored_by(r.backend))]


@dataclass(frozen=True)
class Row:
    """One line of the comparison table."""

    label: str
    vm_exits: int
    pt_write_exits: int
    hypercalls: int
    hypercall_entries: int
    emulated_writes: int
    tlb_flushes: int
    tlb_misses: int
    walk_refs: int
    guest_faults: int
    cycles: float
    by_cause: dict[Cause, float]


FLUSH_EVENTS = (
    Event.TLB_FLUSH_FULL, Event.TLB_FLUSH_SINGLE, Event.TLB_FLUSH_PCID, Event.TLB_FLUSH_VPID, Event.TLB_FLUSH_GLOBAL,
)


def row_for(result: RunResult, costs: CostTable) -> Row:
    c = result.counters
    return Row(
        label=result.spec.label,
        vm_exits=c[Event.VM_EXIT],
        pt_write_exits=c.exits[ExitReason.PT_WRITE],
        hypercalls=c[Event.HYPERCALL],
        hypercall_entries=c[Event.HYPERCALL_ENTRY],
        emulated_writes=c[Event.EMULATED_PT_WRITE],
        tlb_flushes=sum(c[e] for e in FLUSH_EVENTS),
        tlb_misses=c[Event.TLB_MISS],
        walk_refs=c[Event.WALK_REF] + c[Event.EPT_WALK_REF],
        guest_faults=c[Event.GUEST_PAGE_FAULT],
        cycles=costs.cycles(c),
        by_cause=costs.by_cause(c),
    )


HEADERS = (
    ("mode", "label"), ("VM exits", "vm_exits"), ("PT-write exits", "pt_write_exits"),
    ("hypercalls", "hypercalls"), ("hc entries", "hypercall_entries"), ("emulated", "emulated_writes"),
    ("TLB flushes", "tlb_flushes"), ("TLB misses", "tlb_misses"), ("walk refs", "walk_refs"),
    ("est. cycles", "cycles"),
)


def format_table(rows: list[Row]) -> str:
    """A plain-text table of counts, one row per mode, with cycles relative to the
    first row (native)."""
    cells = [[h for h, _ in HEADERS] + ["vs native"]]
    for r in rows:
        cells.append([_number(getattr(r, attr)) for _, attr in HEADERS] + [_ratio(r.cycles, rows[0].cycles)])
    return _grid(cells)


def format_causes(rows: list[Row]) -> str:
    """The same rows' estimated cycles split by :class:`Cause`, with each row's
    largest cause and its share: where the cycles go."""
    cells = [["cycles by cause"] + [c.value for c in Cause] + ["total", "largest"]]
    for r in rows:
        parts = [r.by_cause[c] for c in Cause]
        cells.append([r.label] + [_number(p) for p in parts] + [_number(r.cycles), _largest(r)])
    return _grid(cells)


def _largest(r: Row) -> str:
    if not r.cycles:
        return "-"
    cause, part = max(r.by_cause.items(), key=lambda kv: kv[1])
    return f"{cause.value} {100 * part / r.cycles:.0f}%"


def _number(v: object) -> str:
    return f"{v:,.0f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)


def _ratio(cycles: float, base: float) -> str:
    """``cycles`` as a multiple of ``base``; "-" when the base costs nothing."""
    return f"{cycles / base:.1f}x" if base else "-"


def _grid(cells: list[list[str]]) -> str:
    """Columns padded to their widest cell, the first left-aligned, a rule under the header."""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    out = []
    for n, row in enumerate(cells):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def run_switch(
    spec: ModeSpec, working_set: int = 256, rounds: int = 8, flavour: PteFlavour = PteFlavour.LINUX
) -> RunResult:
    """Two vCPUs of two domains take turns on one physical CPU; each reads its
    working set and checks its registers after every switch. Native stands in as
    two processes of one OS switching by CR3 (no PCIDs), the classic baseline.
    Only the rounds are counted, not the set-up."""
    from .guest.ops import Mode
    from .hv.machine import Machine
    from .hv.sched import Scheduler

    kernels: list[GuestKernel] = []
    pids: list[int] = []
    sched: Scheduler | None = None
    if spec.mode is Mode.NATIVE:
        backend = build_backend(spec)
        kernel = GuestKernel(backend, GUEST_FRAMES, flavour=flavour)
        kernels, pids = [kernel, kernel], [kernel.create_process(), kernel.create_process()]
        counters = backend.counters
    else:
        machine = Machine()
        sched = Scheduler(machine.tlb, machine.counters, spec.tagged)
        for domid in (1, 2):
            b = build_backend(spec, machine, domid)
            sched.add(domid, b)
            k = GuestKernel(b, GUEST_FRAMES, flavour=flavour)
            kernels.append(k)
            pids.append(k.create_process())
        counters = machine.counters
    for v, (k, pid) in enumerate(zip(kernels, pids)):
        if sched is not None:
            sched.switch_to(v)  # each domain's set-up runs on the CPU like everything else
        elif k.current is not None and k.current.pid != pid:
            k.switch_to(pid)
        k.map_range(pid, BUFFER_VA, working_set, writable=True, populate=True)
        for i in range(working_set):
            k.touch(BUFFER_VA + i * PAGE_SIZE, AccessKind.WRITE, (v << 32) | i)
    before = counters.copy()
    seen: list[Observation] = []
    for r in range(rounds):
        for v, (k, pid) in enumerate(zip(kernels, pids)):
            if sched is not None:
                sched.switch_to(v)
                expected = ((r - 1) << 8) | v if r else 0
                if sched.get_gpr(0) != expected:  # register confidentiality, checked every switch
                    seen.append(Observation("register-mismatch", v, sched.get_gpr(0)))
                sched.set_gpr(0, (r << 8) | v)
            else:
                k.switch_to(pid)
            mark = len(k.observations)
            for i in range(working_set):
                k.touch(BUFFER_VA + i * PAGE_SIZE, AccessKind.READ)
            seen.extend(k.observations[mark:])
    return RunResult(spec, counters.since(before), GuestRecord(tuple(seen), ()))
