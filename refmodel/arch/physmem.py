"""Physical memory: sparse 4 KiB frames, little-endian, with a configurable
MAXPHYADDR (SDM 4.1.4: the physical-address width reported by CPUID.80000008H:EAX).

Frames never written read as zeros. An address at or above ``2**maxphyaddr`` is a
caller error: the walk never produces one, because such bits in an entry are
reserved (SDM 4.5) and fault first.
"""

from collections.abc import Iterator

from ..errors import RefmodelError
from .types import ENTRY_SIZE, MAX_MAXPHYADDR, PAGE_SHIFT, PAGE_SIZE, U64_MASK, frame_of, page_offset


class PhysicalMemory:
    """Sparse byte-addressable physical memory."""

    def __init__(self, maxphyaddr: int = 46) -> None:
        if not 32 <= maxphyaddr <= MAX_MAXPHYADDR:
            raise RefmodelError(f"maxphyaddr must be in 32..{MAX_MAXPHYADDR}, got {maxphyaddr}")
        self.maxphyaddr = maxphyaddr
        self._frames: dict[int, bytearray] = {}

    # -- checks -----------------------------------------------------------------
    def _check(self, pa: int, size: int) -> None:
        if pa < 0 or pa + size > (1 << self.maxphyaddr):
            raise RefmodelError(
                f"physical address {pa:#x} (+{size}) is outside MAXPHYADDR={self.maxphyaddr}"
            )
        if page_offset(pa) + size > PAGE_SIZE:
            raise RefmodelError(f"access at {pa:#x} of {size} bytes crosses a 4 KiB frame")

    def _frame(self, pa: int) -> bytearray:
        fn = frame_of(pa)
        frame = self._frames.get(fn)
        if frame is None:
            frame = bytearray(PAGE_SIZE)
            self._frames[fn] = frame
        return frame

    # -- bytes -------------------------------------------------------------------
    def read(self, pa: int, size: int) -> bytes:
        """Read ``size`` bytes within one frame."""
        self._check(pa, size)
        frame = self._frames.get(frame_of(pa))
        if frame is None:
            return bytes(size)
        off = page_offset(pa)
        return bytes(frame[off : off + size])

    def write(self, pa: int, data: bytes) -> None:
        """Write bytes within one frame."""
        self._check(pa, len(data))
        off = page_offset(pa)
        self._frame(pa)[off : off + len(data)] = data

    def read_uint(self, pa: int, size: int) -> int:
        return int.from_bytes(self.read(pa, size), "little")

    def write_uint(self, pa: int, size: int, value: int) -> None:
        if not 0 <= value < (1 << (8 * size)):
            raise RefmodelError(f"value {value:#x} does not fit in {size} bytes")
        self.write(pa, value.to_bytes(size, "little"))

    # -- 8-byte paging-structure entries -----------------------------------------
    def read_u64(self, pa: int) -> int:
        """Read an 8-byte little-endian entry; ``pa`` must be 8-byte aligned."""
        if pa % ENTRY_SIZE:
            raise RefmodelError(f"entry address {pa:#x} is not 8-byte aligned")
        return self.read_uint(pa, ENTRY_SIZE)

    def write_u64(self, pa: int, value: int) -> None:
        """Write an 8-byte little-endian entry; ``pa`` must be 8-byte aligned."""
        if pa % ENTRY_SIZE:
            raise RefmodelError(f"entry address {pa:#x} is not 8-byte aligned")
        self.write_uint(pa, ENTRY_SIZE, value & U64_MASK)

    # -- frames ------------------------------------------------------------------
    def frame_bytes(self, frame: int) -> bytes:
        """The 4096 bytes of a frame (zeros if never written)."""
        f = self._frames.get(frame)
        return bytes(f) if f is not None else bytes(PAGE_SIZE)

    def load_frame(self, frame: int, data: bytes) -> None:
        """Replace a whole frame."""
        if len(data) != PAGE_SIZE:
            raise RefmodelError(f"frame {frame:#x}: need {PAGE_SIZE} bytes, got {len(data)}")
        self._check(frame << PAGE_SHIFT, PAGE_SIZE)
        self._frames[frame] = bytearray(data)

    def populated_frames(self) -> Iterator[int]:
        """Frames that have been written, in ascending order."""
        return iter(sorted(self._frames))

    def copy(self) -> "PhysicalMemory":
        other = PhysicalMemory(self.maxphyaddr)
        other._frames = {k: bytearray(v) for k, v in self._frames.items()}
        return other
