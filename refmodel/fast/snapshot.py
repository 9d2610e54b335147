"""A dense numpy snapshot of physical frames, for the batch walk.

:class:`~refmodel.arch.physmem.PhysicalMemory` keeps frames in a dict of
bytearrays, which is right for the slow path and hopeless for a gather over a
million addresses. :class:`FrameSnapshot` copies chosen frames into one
``(F + 1, 512)`` array of little-endian 64-bit words (one row per frame, frames
sorted by number) plus a map frame-number -> row (a binary search over the sorted
frame numbers). Row ``F`` is all zeros and stands for every frame the snapshot does
not hold: such a frame reads as zeros in ``PhysicalMemory`` too, so an entry read
from it is not present and the walk never writes to it.

A batch walk ORs Accessed/Dirty flags into the snapshot and remembers which rows
it changed; :meth:`FrameSnapshot.write_back` stores exactly those frames into the
memory the snapshot was taken from. The snapshot must be current when the batch
runs (no write to the memory between :meth:`FrameSnapshot.take` and
:meth:`FrameSnapshot.write_back`), as one would expect of any cache.
"""

from collections.abc import Iterable

import numpy as np
from numpy.typing import NDArray

from ..arch.physmem import PhysicalMemory
from ..arch.pte import PteFlag, phys_addr_mask
from ..arch.types import ENTRIES_PER_TABLE, PAGE_SHIFT, PAGE_SIZE
from ..arch.walk import PagingContext
from ..errors import RefmodelError

#: Little-endian unsigned 64-bit words: the byte order of PhysicalMemory.
LE_U64 = np.dtype("<u8")
WORDS_PER_FRAME = ENTRIES_PER_TABLE  #: 4096 / 8


class FrameSnapshot:
    """Frames of a :class:`PhysicalMemory`, as rows of 512 64-bit words."""

    def __init__(self, maxphyaddr: int, frames: NDArray[np.uint64], words: NDArray[np.uint64]) -> None:
        if frames.ndim != 1 or words.shape != (frames.size + 1, WORDS_PER_FRAME):
            raise RefmodelError(
                f"snapshot: need frames (F,) and words (F+1, {WORDS_PER_FRAME}), "
                f"got {frames.shape} and {words.shape}"
            )
        if frames.size > 1 and not bool(np.all(frames[1:] > frames[:-1])):
            raise RefmodelError("snapshot: frame numbers must be strictly increasing")
        self.maxphyaddr = maxphyaddr
        self.frames = frames
        self.words = words
        #: rows the batch walk has changed since the snapshot was taken
        self.touched = np.zeros(frames.size + 1, dtype=np.bool_)
        #: per address mask: the row of the frame each word references, for rows done
        self._child: dict[int, tuple[NDArray[np.intp], NDArray[np.bool_]]] = {}

    # -- construction ----------------------------------------------------------------
    @classmethod
    def take(cls, mem: PhysicalMemory, frames: Iterable[int] | None = None) -> "FrameSnapshot":
        """Copy ``frames`` (default: every populated frame) out of ``mem``."""
        wanted = sorted(set(mem.populated_frames() if frames is None else frames))
        nums = np.array(wanted, dtype=np.uint64)
        words = np.zeros((len(wanted) + 1, WORDS_PER_FRAME), dtype=np.uint64)
        for row, frame in enumerate(wanted):
            words[row] = np.frombuffer(mem.frame_bytes(frame), dtype=LE_U64)
        return cls(mem.maxphyaddr, nums, words)

    @classmethod
    def for_walks(cls, mem: PhysicalMemory, ctx: PagingContext) -> "FrameSnapshot":
        """Snapshot only the frames a walk under ``ctx`` can read (see
        :func:`paging_structure_frames`): for a large memory this is far smaller than
        :meth:`take` of every populated frame, and the batch walk gives the same
        results on either."""
        return cls.take(mem, paging_structure_frames(mem, ctx))

    # -- addressing ------------------------------------------------------------------
    @property
    def zero_row(self) -> int:
        """The all-zero row that stands for every frame not in the snapshot."""
        return int(self.frames.size)

    def rows(self, frame_numbers: NDArray[np.uint64]) -> NDArray[np.intp]:
        """Row of each frame number; :attr:`zero_row` for frames not held."""
        nf = self.frames.size
        if nf == 0:
            return np.zeros(frame_numbers.shape, dtype=np.intp)
        idx = np.searchsorted(self.frames, frame_numbers)
        np.minimum(idx, nf - 1, out=idx)
        found = self.frames[idx] == frame_numbers
        return np.where(found, idx, nf).astype(np.intp, copy=False)

    def child_rows(self, rows_in_use: NDArray[np.intp], addr_mask: int) -> NDArray[np.intp]:
        """A flat ``(F + 1) * 512`` array: for each word of the rows in
        ``rows_in_use``, the row of the frame its bits ``addr_mask`` reference
        (other rows' entries are stale). Cached per mask: the walk only ORs A/D
        into words, which never changes an address field."""
        cache = self._child.get(addr_mask)
        if cache is None:
            cache = (np.zeros(self.words.size, dtype=np.intp), np.zeros(self.frames.size + 1, dtype=np.bool_))
            self._child[addr_mask] = cache
        child, done = cache
        todo = rows_in_use[~done[rows_in_use]]
        if todo.size:
            frames = (self.words[todo] & np.uint64(addr_mask)) >> np.uint64(PAGE_SHIFT)
            child.reshape(self.words.shape)[todo] = self.rows(frames)
            done[todo] = True
        return child

    def row(self, frame: int) -> int:
        return int(self.rows(np.array([frame], dtype=np.uint64))[0])

    def read_u64(self, pa: int) -> int:
        """One entry, as :meth:`PhysicalMemory.read_u64` reads it (for tests)."""
        if pa % 8 or not 0 <= pa < (1 << self.maxphyaddr):
            raise RefmodelError(f"snapshot read at {pa:#x}: not an aligned entry address")
        return int(self.words[self.row(pa >> PAGE_SHIFT), (pa % PAGE_SIZE) // 8])

    # -- write-back --------------------------------------------------------------------
    def write_back(self, mem: PhysicalMemory) -> int:
        """Store every row changed since the snapshot into ``mem``; returns how many
        frames were written. The rows are marked clean again."""
        if mem.maxphyaddr != self.maxphyaddr:
            raise RefmodelError("snapshot: write-back to a memory of another MAXPHYADDR")
        rows = np.flatnonzero(self.touched)
        for r in rows.tolist():
            if r == self.zero_row:
                raise AssertionError("the zero row is never written")
            mem.load_frame(int(self.frames[r]), self.words[r].astype(LE_U64, copy=False).tobytes())
        self.touched[:] = False
        return int(rows.size)


def paging_structure_frames(mem: PhysicalMemory, ctx: PagingContext) -> list[int]:
    """Every populated frame a 4-level walk under ``ctx`` may read: the PML4 table,
    and, level by level, every frame referenced by an entry that is present, has no
    bits set at or above MAXPHYADDR and has PS = 0 — a superset of the entries a
    walk follows (a followed entry has no reserved bit, and PS = 1 makes an entry
    a leaf or a reserved-bit fault). A table reachable at several levels (a
    recursive mapping) is expanded at each of them."""
    populated = set(mem.populated_frames())
    addr_mask = np.uint64(phys_addr_mask(ctx.maxphyaddr))
    high = np.uint64(((1 << 64) - 1) & ~((1 << ctx.maxphyaddr) - 1) & ((1 << 52) - 1))
    follow_bits = np.uint64(int(PteFlag.P) | int(PteFlag.PS))
    present = np.uint64(int(PteFlag.P))
    level_frames = {ctx.pml4_base >> PAGE_SHIFT} & populated
    found = set(level_frames)
    for _ in range(3):  # PML4 -> PDPT -> PD -> PT
        children: set[int] = set()
        for frame in sorted(level_frames):
            e = np.frombuffer(mem.frame_bytes(frame), dtype=LE_U64)
            follow = ((e & follow_bits) == present) & ((e & high) == 0)
            kids = np.unique((e[follow] & addr_mask) >> np.uint64(PAGE_SHIFT))
            children.update(int(k) for k in kids.tolist())
        level_frames = children & populated
        found |= level_frames
    return sorted(found)
