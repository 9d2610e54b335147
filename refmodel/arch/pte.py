"""Paging-structure entry formats for 4-level paging (SDM Vol. 3A 4.5, Tables 4-14
to 4-20).

Every level (PML4E, PDPTE, PDE, PTE) shares the low flag layout; the meaning of bit 7
differs (PS in PDPTE/PDE, PAT in a PTE, reserved in a PML4E) and so does the width of
the address field of a large-page entry.
"""

import enum
from dataclasses import dataclass

from .types import PAGE_SHIFT, U64_MASK


class PteFlag(enum.IntFlag):
    """Flag bits of a paging-structure entry (SDM 4.5, Tables 4-15..4-20)."""

    P = 1 << 0  #: present
    RW = 1 << 1  #: read/write (0: writes may be disallowed, SDM 4.6)
    US = 1 << 2  #: user/supervisor (0: user-mode accesses disallowed)
    PWT = 1 << 3  #: page-level write-through
    PCD = 1 << 4  #: page-level cache disable
    A = 1 << 5  #: accessed (SDM 4.8)
    D = 1 << 6  #: dirty, leaf entries only (SDM 4.8)
    PS = 1 << 7  #: page size in PDPTE/PDE; PAT in a PTE; reserved in a PML4E
    G = 1 << 8  #: global, leaf entries only, honoured when CR4.PGE = 1 (SDM 4.10.2.4)
    PAT_LARGE = 1 << 12  #: PAT bit of a 2 MiB / 1 GiB leaf
    XD = 1 << 63  #: execute-disable, honoured when IA32_EFER.NXE = 1 (SDM 4.6)


#: Bits 11:9 and 62:52 are ignored by the walk (software may use them; Xen calls
#: bits 9-11 "AVAIL"). Bits 62:59 are protection keys when CR4.PKE = 1 (not modelled).
AVAIL_LOW_MASK = 0x7 << 9
IGNORED_HIGH_MASK = ((1 << 63) - 1) & ~((1 << 52) - 1)


class Level(enum.IntEnum):
    """Paging-structure level, numbered as Xen does (L4 = PML4 ... L1 = page table)."""

    L1 = 1  #: page table, entries are PTEs
    L2 = 2  #: page directory, entries are PDEs
    L3 = 3  #: page-directory-pointer table, entries are PDPTEs
    L4 = 4  #: PML4 table, entries are PML4Es

    @property
    def entry_name(self) -> str:
        """The SDM's name for an entry of this level."""
        return {4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"}[self.value]

    @property
    def index_shift(self) -> int:
        """Lowest linear-address bit that indexes a table of this level (SDM Fig. 4-8)."""
        return PAGE_SHIFT + 9 * (self.value - 1)


class PageSize(enum.IntEnum):
    """Page sizes of 4-level paging (SDM 4.5): the value is the size in bytes."""

    SIZE_4K = 1 << 12
    SIZE_2M = 1 << 21
    SIZE_1G = 1 << 30

    @property
    def shift(self) -> int:
        return self.value.bit_length() - 1

    @property
    def leaf_level(self) -> Level:
        """The level whose entry maps a page of this size."""
        return {12: Level.L1, 21: Level.L2, 30: Level.L3}[self.shift]

    @staticmethod
    def for_leaf_level(level: Level) -> "PageSize":
        """Page size mapped by a leaf entry of ``level`` (L1: 4 KiB, L2: 2 MiB, L3: 1 GiB)."""
        return {Level.L1: PageSize.SIZE_4K, Level.L2: PageSize.SIZE_2M, Level.L3: PageSize.SIZE_1G}[
            level
        ]


def table_index(va: int, level: Level) -> int:
    """The 9-bit index of ``va`` into a table of ``level`` (SDM 4.5, Figure 4-8)."""
    return (va >> level.index_shift) & 0x1FF


def phys_addr_mask(maxphyaddr: int) -> int:
    """Bits M-1:12 — the address field of an entry that references a 4 KiB frame."""
    return ((1 << maxphyaddr) - 1) & ~((1 << PAGE_SHIFT) - 1)


def entry_frame_address(entry: int, maxphyaddr: int, size: PageSize = PageSize.SIZE_4K) -> int:
    """Physical address an entry references: a table (or 4 KiB page), or the base of
    a large page whose low address bits are taken as zero (SDM Tables 4-15..4-20)."""
    return int(entry) & phys_addr_mask(maxphyaddr) & ~(size.value - 1)


def make_entry(addr: int, flags: PteFlag | int) -> int:
    """Build an entry from a frame address and flags (helper for tests and guests)."""
    return int((addr & ~0xFFF & U64_MASK) | int(flags))


@dataclass(frozen=True)
class Entry:
    """A decoded entry value, for display: ``Entry(0x...).describe()``."""

    value: int

    def has(self, flag: PteFlag) -> bool:
        return bool(self.value & flag)

    def describe(self) -> str:
        names = [f.name or "" for f in PteFlag if f is not PteFlag.PAT_LARGE and self.value & f]
        return f"{self.value:#018x} [{' '.join(names)}]"
