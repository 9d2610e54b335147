"""The guest kernel's own bookkeeping: munmap and mprotect split mappings like
Linux, so a later mmap or fault sees exactly what is left."""

from refmodel.arch.access import AccessKind
from refmodel.arch.types import PAGE_SIZE
from refmodel.guest.kernel import GuestKernel, Vma
from refmodel.hv.native import NativeBackend

VA = 0x40_0000


def test_vma_without_splits_into_what_is_left() -> None:
    v = Vma(VA, 10, True)
    assert v.without(VA + 2 * PAGE_SIZE, 3) == [Vma(VA, 2, True), Vma(VA + 5 * PAGE_SIZE, 5, True)]
    assert v.without(VA, 10) == []
    assert v.without(VA + 10 * PAGE_SIZE, 1) == [v]
    assert v.without(VA - PAGE_SIZE, 2) == [Vma(VA + PAGE_SIZE, 9, True)]


def test_partial_unmap_keeps_the_rest_mapped_and_the_hole_free() -> None:
    k = GuestKernel(NativeBackend(128), 128)
    pid = k.create_process()
    k.map_range(pid, VA, 4, populate=True)
    k.unmap_range(pid, VA + PAGE_SIZE, 1)
    k.touch(VA + 2 * PAGE_SIZE, AccessKind.WRITE, 5)
    assert k.observations[-1].event == "write"  # still mapped, no fault
    k.touch(VA + PAGE_SIZE)
    assert k.observations[-1].event == "fault"  # the hole: SIGSEGV, not demand paging
    k.map_range(pid, VA + PAGE_SIZE, 1, populate=True)  # the hole can be mapped again
    k.touch(VA + PAGE_SIZE)
    assert k.observations[-1].event == "read"


def test_partial_mprotect_changes_only_the_range() -> None:
    k = GuestKernel(NativeBackend(128), 128)
    pid = k.create_process()
    k.map_range(pid, VA, 3)  # demand paged
    k.protect(pid, VA + PAGE_SIZE, 1, writable=False)
    k.touch(VA + 2 * PAGE_SIZE, AccessKind.WRITE, 1)
    assert [o.event for o in k.observations[-2:]] == ["fault", "write"]  # demand fault, then the write
    k.touch(VA + PAGE_SIZE, AccessKind.WRITE, 1)
    assert k.observations[-1].event == "fault"  # read-only part: the demand-mapped page is read-only
    k.touch(VA + PAGE_SIZE, AccessKind.WRITE, 1)
    assert k.observations[-1].event == "fault" and k.observations[-1].error_code == 7
