"""The guest kernel's own bookkeeping: munmap and mprotect split mappings like
Linux, so a later mmap or fault sees exactly what is left."""

from refmodel.arch.access import AccessKind
from refmodel.arch.pte import Level, PteFlag, table_index
from refmodel.arch.types import PAGE_SIZE
from refmodel.guest.kernel import GuestKernel, PteFlavour, Vma
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


# -- the flags Linux writes -------------------------------------------------------------------
A, D, RW, P, US, XD = (int(f) for f in (PteFlag.A, PteFlag.D, PteFlag.RW, PteFlag.P, PteFlag.US, PteFlag.XD))


def flags_of(k: GuestKernel, pid: int, va: int) -> int:
    return k.page_table_view()[pid][va][1]


def test_linux_flavour_writes_accessed_leaves_dirty_writable_ones_and_a_d_tables() -> None:
    backend = NativeBackend(128)
    k = GuestKernel(backend, 128)
    pid = k.create_process()
    k.map_range(pid, VA, 1, writable=True, populate=True)
    k.map_range(pid, VA + PAGE_SIZE, 1, writable=False, populate=True)
    assert flags_of(k, pid, VA) == P | US | XD | RW | A | D  # PAGE_SHARED + pte_mkdirty
    assert flags_of(k, pid, VA + PAGE_SIZE) == P | US | XD | A  # PAGE_COPY: A, no D
    root = k.process(pid).root
    l4e = backend.read_pte(root, table_index(VA, Level.L4))
    assert l4e & 0xFFF == P | RW | US | A | D  # _PAGE_TABLE


def test_linux_flavour_first_touch_changes_no_flag() -> None:
    """What makes hidden faults vanish under shadow paging: the processor finds
    nothing to set on the first write."""
    k = GuestKernel(NativeBackend(128), 128)
    pid = k.create_process()
    k.map_range(pid, VA, 1, populate=True)
    before = flags_of(k, pid, VA)
    k.touch(VA, AccessKind.WRITE, 1)
    assert flags_of(k, pid, VA) == before


def test_ad_clear_flavour_leaves_a_and_d_to_the_processor() -> None:
    backend = NativeBackend(128)
    k = GuestKernel(backend, 128, flavour=PteFlavour.AD_CLEAR)
    pid = k.create_process()
    k.map_range(pid, VA, 1, populate=True)
    assert flags_of(k, pid, VA) == P | US | XD | RW
    l4e = backend.read_pte(k.process(pid).root, table_index(VA, Level.L4))
    assert l4e & 0xFFF == P | RW | US  # the walk sets A in it below
    k.touch(VA, AccessKind.WRITE, 1)
    assert flags_of(k, pid, VA) == P | US | XD | RW | A | D


def test_linux_flavour_fork_makes_the_child_old_and_keeps_dirty_and_remap_keeps_both() -> None:
    k = GuestKernel(NativeBackend(256), 256)
    pid = k.create_process()
    k.map_range(pid, VA, 2, populate=True)
    child = k.fork(pid)
    assert flags_of(k, child, VA) == P | US | XD | D  # copy_present_pte: pte_mkold, D kept, RW gone (COW)
    k.remap(pid, VA + PAGE_SIZE, 1)
    assert flags_of(k, pid, VA + PAGE_SIZE) & (A | D) == A | D  # remove_migration_pte keeps young and dirty
    k.switch_to(child)
    k.touch(VA, AccessKind.WRITE, 7)  # COW break: wp_page_copy's entry is young and dirty
    assert flags_of(k, child, VA) == P | US | XD | RW | A | D
