"""Shared set-up for the shadow-paging tests (no tests here).

Builds a guest kernel on native hardware and on a shadow backend, hand-builds page
tables for cases the kernel never produces, and checks the audits.
"""

from collections.abc import Callable

from refmodel.arch.access import AccessKind
from refmodel.arch.fault import PageFault
from refmodel.arch.pte import Level, PteFlag, table_index
from refmodel.arch.types import GFN, PAGE_SHIFT
from refmodel.guest.kernel import GuestKernel, Observation, PteFlavour
from refmodel.guest.ops import MmuBackend
from refmodel.hv.machine import Machine
from refmodel.hv.native import NativeBackend
from refmodel.hv.shadow import ShadowBackend, shadow_sound
from refmodel.hv.shadow.audit import shadow_in_sync

#: Guest memory for the tests, in frames (enough for 2 x 1024 pages and their tables).
GUEST_FRAMES = 2560
#: Where the tests map buffers (2 MiB aligned, like refmodel.compare.BUFFER_VA).
BUFFER_VA = 0x0000_0600_0000_0000
PAGE = 1 << PAGE_SHIFT
TABLE = int(PteFlag.P | PteFlag.RW | PteFlag.US)
USER_RW = int(PteFlag.P | PteFlag.RW | PteFlag.US)

Record = tuple[tuple[Observation, ...], dict[int, dict[int, tuple[int, int]]]]


def new_shadow(oos: bool, tagged: bool = True, frames: int = GUEST_FRAMES) -> ShadowBackend:
    machine = Machine()
    return ShadowBackend(machine, machine.create_domain(1, frames), tagged=tagged, oos=oos)


def assert_sound(backend: ShadowBackend) -> None:
    """Both audits hold: soundness, and in-sync shadows equal their propagation."""
    problems = shadow_sound(backend) + shadow_in_sync(backend)
    assert not problems, "\n".join(problems[:10])


def record(kernel: GuestKernel) -> Record:
    """What the guest could observe: its observations and its leaf entries."""
    return tuple(kernel.observations), kernel.page_table_view()


def run_kernel(
    backend: MmuBackend, workload: Callable[[GuestKernel, int], None], flavour: PteFlavour = PteFlavour.LINUX
) -> GuestKernel:
    kernel = GuestKernel(backend, GUEST_FRAMES, flavour=flavour)
    workload(kernel, kernel.create_process())
    return kernel


def native_record(workload: Callable[[GuestKernel, int], None], flavour: PteFlavour = PteFlavour.LINUX) -> Record:
    return record(run_kernel(NativeBackend(GUEST_FRAMES), workload, flavour))


def populate_and_touch(pages: int) -> Callable[[GuestKernel, int], None]:
    """The seed: map ``pages`` pages populated at once, then write and read each."""

    def workload(kernel: GuestKernel, pid: int) -> None:
        kernel.map_range(pid, BUFFER_VA, pages, writable=True, populate=True)
        for i in range(pages):
            kernel.touch(BUFFER_VA + i * PAGE, AccessKind.WRITE, i + 1)
        for i in range(pages):
            kernel.touch(BUFFER_VA + i * PAGE, AccessKind.READ)

    return workload


class HandGuest:
    """Page tables built entry by entry through any backend — a guest doing what
    the kernel never does (large pages, mapping its own tables, reserved bits)."""

    def __init__(self, backend: MmuBackend, first_frame: int = 1) -> None:
        self.mmu = backend
        self._next = first_frame
        self.root = self.alloc()
        self.tables: dict[tuple[Level, int], GFN] = {}
        backend.load_cr3(self.root)

    def alloc(self) -> GFN:
        gfn = GFN(self._next)
        self._next += 1
        return gfn

    def table(self, va: int, level: Level) -> GFN:
        """The table of ``level`` covering ``va``, created and linked if missing."""
        table = self.root
        for lvl in (Level.L4, Level.L3, Level.L2):
            if lvl is level:
                return table
            key = (Level(lvl - 1), va >> lvl.index_shift)
            child = self.tables.get(key)
            if child is None:
                child = self.tables[key] = self.alloc()
                self.mmu.new_table(child, Level(lvl - 1))
                self.mmu.write_pte(table, table_index(va, lvl), lvl, (child << PAGE_SHIFT) | TABLE)
            table = child
        return table

    def set(self, va: int, level: Level, value: int) -> tuple[GFN, int]:
        """Write the entry of ``level`` for ``va``; returns (table, index)."""
        table, index = self.table(va, level), table_index(va, level)
        self.mmu.write_pte(table, index, level, value)
        return table, index

    def map(self, va: int, gfn: int, flags: int = USER_RW) -> tuple[GFN, int]:
        return self.set(va, Level.L1, (gfn << PAGE_SHIFT) | flags)

    def read_entry(self, va: int, level: Level) -> int:
        return self.mmu.read_pte(self.table(va, level), table_index(va, level))


def outcome(result: int | PageFault) -> tuple[str, int]:
    """An access result as comparable data."""
    if isinstance(result, PageFault):
        return ("fault", int(result.error_code) | (result.cr2 << 8))
    return ("ok", result)
