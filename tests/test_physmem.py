"""Physical memory: sparse 4 KiB frames, little-endian, bounded by MAXPHYADDR
(Intel SDM Vol. 3A 4.1.4: the physical-address width, CPUID.80000008H:EAX[7:0]).

Errors here are the caller's (:class:`RefmodelError`): the walk itself never forms
an address at or above 2**MAXPHYADDR, because such entry bits are reserved.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from refmodel.arch.physmem import PhysicalMemory
from refmodel.errors import RefmodelError


def test_unwritten_memory_reads_as_zero_and_stays_sparse() -> None:
    """A frame that was never written reads as zeros and is not materialised."""
    mem = PhysicalMemory()
    assert mem.read(0x1234_5000, 16) == bytes(16)
    assert mem.read_u64(0x8) == 0
    assert mem.frame_bytes(0x999) == bytes(4096)
    assert list(mem.populated_frames()) == []


def test_little_endian_entries() -> None:
    """x86 is little-endian: an 8-byte entry's bit 0 (P) is in its lowest byte."""
    mem = PhysicalMemory()
    mem.write_u64(0x2000, 0x8000_0000_0000_0001)
    assert mem.read(0x2000, 8) == bytes([1, 0, 0, 0, 0, 0, 0, 0x80])
    assert mem.read_uint(0x2000, 1) == 1
    assert mem.read_uint(0x2007, 1) == 0x80


def test_write_u64_truncates_to_64_bits() -> None:
    """Entries are 64-bit: write_u64 keeps the low 64 bits of its value."""
    mem = PhysicalMemory()
    mem.write_u64(0x2000, (1 << 64) | 5)
    assert mem.read_u64(0x2000) == 5


@pytest.mark.parametrize("pa", [0x2001, 0x2004, 0x2FFF])
def test_entries_must_be_8_byte_aligned(pa: int) -> None:
    """SDM 4.5: paging-structure entries are 8 bytes at 8-byte-aligned addresses."""
    mem = PhysicalMemory()
    with pytest.raises(RefmodelError):
        mem.read_u64(pa)
    with pytest.raises(RefmodelError):
        mem.write_u64(pa, 0)


def test_access_may_not_cross_a_frame() -> None:
    mem = PhysicalMemory()
    with pytest.raises(RefmodelError):
        mem.read(0x1FFC, 8)
    with pytest.raises(RefmodelError):
        mem.write(0x1FFF, b"ab")
    mem.write(0x1FFE, b"ab")  # the last two bytes of the frame are fine
    assert mem.read(0x1FFE, 2) == b"ab"


@pytest.mark.parametrize("maxphyaddr", [36, 46, 52])
def test_addresses_are_bounded_by_maxphyaddr(maxphyaddr: int) -> None:
    """SDM 4.1.4: physical addresses have MAXPHYADDR bits; the last byte below
    2**MAXPHYADDR is usable, the first byte at it is a caller error."""
    mem = PhysicalMemory(maxphyaddr)
    top = 1 << maxphyaddr
    mem.write_uint(top - 1, 1, 0xAB)
    assert mem.read_uint(top - 1, 1) == 0xAB
    with pytest.raises(RefmodelError):
        mem.read(top, 1)
    with pytest.raises(RefmodelError):
        mem.read_u64(top - 4)
    with pytest.raises(RefmodelError):
        mem.read(-8, 8)


@pytest.mark.parametrize("maxphyaddr", [31, 53, 64])
def test_maxphyaddr_range(maxphyaddr: int) -> None:
    """SDM 4.1.4: with 4-level paging MAXPHYADDR is at most 52 (the model also asks
    for at least 32)."""
    with pytest.raises(RefmodelError):
        PhysicalMemory(maxphyaddr)


def test_write_uint_checks_the_value_fits() -> None:
    mem = PhysicalMemory()
    with pytest.raises(RefmodelError):
        mem.write_uint(0, 2, 0x1_0000)
    with pytest.raises(RefmodelError):
        mem.write_uint(0, 1, -1)


def test_load_frame_and_populated_frames() -> None:
    """load_frame replaces a whole frame; populated_frames lists written frames in
    ascending order."""
    mem = PhysicalMemory()
    mem.write_u64(0x5000, 1)
    mem.load_frame(0x3, bytes(range(256)) * 16)
    assert mem.read_uint(0x3000 + 0xFF, 1) == 0xFF
    assert list(mem.populated_frames()) == [0x3, 0x5]
    with pytest.raises(RefmodelError):
        mem.load_frame(0x4, bytes(100))
    with pytest.raises(RefmodelError):
        mem.load_frame(1 << 40, bytes(4096))  # beyond MAXPHYADDR = 46


def test_copy_is_deep() -> None:
    """A copy has its own frames: writing one leaves the other unchanged."""
    mem = PhysicalMemory(40)
    mem.write_u64(0x1000, 7)
    other = mem.copy()
    other.write_u64(0x1000, 8)
    other.write_u64(0x9000, 9)
    assert (mem.read_u64(0x1000), mem.read_u64(0x9000)) == (7, 0)
    assert other.maxphyaddr == 40


@given(
    frame=st.integers(min_value=0, max_value=(1 << 34) - 1),
    offset=st.integers(min_value=0, max_value=4095),
    data=st.binary(min_size=1, max_size=64),
)
def test_write_then_read_round_trips(frame: int, offset: int, data: bytes) -> None:
    """Bytes written anywhere inside one frame read back unchanged, and no other
    frame is touched."""
    data = data[: 4096 - offset]
    mem = PhysicalMemory()
    pa = (frame << 12) + offset
    mem.write(pa, data)
    assert mem.read(pa, len(data)) == data
    assert list(mem.populated_frames()) == [frame]


@given(value=st.integers(min_value=0, max_value=(1 << 64) - 1), slot=st.integers(min_value=0, max_value=511))
def test_u64_round_trip(value: int, slot: int) -> None:
    """Any 64-bit entry value written to any slot of a table reads back unchanged."""
    mem = PhysicalMemory()
    mem.write_u64(0x7000 + 8 * slot, value)
    assert mem.read_u64(0x7000 + 8 * slot) == value
    assert int.from_bytes(mem.frame_bytes(7)[8 * slot : 8 * slot + 8], "little") == value
