"""Build 4-level page tables in physical memory — for examples, tests and fixtures.

This is not hardware: it is what an OS's page-table code does, kept simple. Tables
are taken from a frame allocator the caller supplies (a list of free frames, used in
order), so the resulting layout is deterministic.
"""

from collections.abc import Iterator

from ..errors import RefmodelError
from .physmem import PhysicalMemory
from .pte import Level, PageSize, PteFlag, entry_frame_address, table_index
from .types import ENTRY_SIZE, PAGE_SHIFT

#: Flags given to intermediate entries: present, writable, user — so that the leaf
#: alone decides the rights unless a test narrows an upper level on purpose.
TABLE_FLAGS = PteFlag.P | PteFlag.RW | PteFlag.US


class PageTableBuilder:
    """Creates a PML4 and maps pages under it."""

    def __init__(self, mem: PhysicalMemory, free_frames: Iterator[int]) -> None:
        self.mem = mem
        self._free = free_frames
        self.tables: list[int] = []  #: frame numbers of every table created, in order
        self.root = self._new_table()

    def _new_table(self) -> int:
        try:
            frame = next(self._free)
        except StopIteration:
            raise RefmodelError("page-table builder ran out of free frames") from None
        self.mem.load_frame(frame, bytes(1 << PAGE_SHIFT))
        self.tables.append(frame)
        return frame

    @property
    def cr3(self) -> int:
        return self.root << PAGE_SHIFT

    def entry_addr(self, va: int, level: Level) -> int:
        """Physical address of the entry for ``va`` at ``level``, creating the tables
        above it (with :data:`TABLE_FLAGS`) if they are missing."""
        table = self.root
        for lvl in (Level.L4, Level.L3, Level.L2, Level.L1):
            addr = (table << PAGE_SHIFT) + table_index(va, lvl) * ENTRY_SIZE
            if lvl is level:
                return addr
            entry = self.mem.read_u64(addr)
            if not entry & PteFlag.P:
                new = self._new_table()
                entry = (new << PAGE_SHIFT) | int(TABLE_FLAGS)
                self.mem.write_u64(addr, entry)
            elif entry & PteFlag.PS and lvl is not Level.L4:
                raise RefmodelError(f"{va:#x}: a large page already maps this range at {lvl.name}")
            table = entry_frame_address(entry, self.mem.maxphyaddr) >> PAGE_SHIFT
        raise AssertionError("unreachable")

    def map(self, va: int, pa: int, flags: PteFlag | int, size: PageSize = PageSize.SIZE_4K) -> int:
        """Map one page; returns the physical address of the leaf entry."""
        if va % size.value or pa % size.value:
            raise RefmodelError(f"map {va:#x} -> {pa:#x}: not aligned to {size.name}")
        bits = int(flags) | int(PteFlag.P)
        if size is not PageSize.SIZE_4K:
            bits |= int(PteFlag.PS)
        addr = self.entry_addr(va, size.leaf_level)
        self.mem.write_u64(addr, pa | bits)
        return addr
