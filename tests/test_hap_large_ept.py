"""HAP with large EPT pages: domains populated in aligned 2 MiB runs, EPT built with
2 MiB and 1 GiB leaves where the P2M allows, split when one 4 KiB page changes, and
the 2-D walk's memory references for every combination of guest and EPT page size
(Bhargava et al., ASPLOS 2008: (n+1)(m+1) - 1 for an n-level guest walk on an
m-level EPT walk)."""

import pytest

from refmodel.account.events import Event, ExitReason
from refmodel.arch.access import Access, AccessKind
from refmodel.arch.builder import PageTableBuilder
from refmodel.arch.physmem import PhysicalMemory
from refmodel.arch.pte import PageSize, PteFlag
from refmodel.arch.types import GFN, MFN, PAGE_SHIFT, DomId
from refmodel.arch.walk import PagingContext
from refmodel.compare import run_workload, seed_workload
from refmodel.guest.kernel import GuestKernel
from refmodel.guest.ops import Mode
from refmodel.hv.hap import HapBackend, hap_isolated
from refmodel.hv.hap.ept import RWX, EptFlag, make_leaf
from refmodel.hv.hap.nested import CombinedTranslation, nested_walk
from refmodel.hv.hap.tables import Ept, leaf_size_at
from refmodel.hv.machine import RUN_FRAMES, Domain, Machine
from refmodel.hv.modes import ModeSpec

K4, M2, G1 = PageSize.SIZE_4K, PageSize.SIZE_2M, PageSize.SIZE_1G
USER_RW = int(PteFlag.P | PteFlag.RW | PteFlag.US)


# -- contiguous population -----------------------------------------------------------------------


def test_contiguous_domain_gets_aligned_runs_and_still_gfn_is_not_mfn() -> None:
    machine = Machine()
    dom = machine.create_domain(1, 3 * RUN_FRAMES + 7, contiguous=True)
    for run in range(3):
        first = dom.p2m[GFN(run * RUN_FRAMES)]
        assert first % RUN_FRAMES == 0 and first != run * RUN_FRAMES
        assert [dom.p2m[GFN(run * RUN_FRAMES + i)] for i in range(RUN_FRAMES)] == list(range(first, first + RUN_FRAMES))
    assert all(machine.owner_of(m) == 1 for m in dom.p2m.values())
    assert all(machine.m2p[m] == g for g, m in dom.p2m.items())
    assert len(set(dom.p2m.values())) == len(dom.p2m)
    # the 7 frames past the last whole run are single pages from the scrambled list
    tail = [dom.p2m[GFN(3 * RUN_FRAMES + i)] for i in range(7)]
    assert all(b != a + 1 for a, b in zip(tail, tail[1:]))


def test_scattered_domains_stay_scrambled_next_to_a_contiguous_one() -> None:
    machine = Machine()
    machine.create_domain(1, 2 * RUN_FRAMES, contiguous=True)
    other = machine.create_domain(2, 600)
    assert all(int(m) != int(g) for g, m in other.p2m.items())
    mfns = [other.p2m[GFN(g)] for g in range(600)]
    assert sum(b == a + 1 for a, b in zip(mfns, mfns[1:])) == 0
    assert leaf_size_at(other, 0) is K4


def test_contiguous_population_falls_back_to_single_frames_when_no_run_is_free() -> None:
    machine = Machine(nr_frames=2048, hypervisor_frames=64)
    machine.create_domain(1, 1400)  # scattered: every run below has a frame taken, 584 left
    dom = machine.create_domain(2, RUN_FRAMES, contiguous=True)
    assert len(dom.p2m) == RUN_FRAMES
    assert leaf_size_at(dom, 0) is K4


# -- building and splitting --------------------------------------------------------------------


def sizes(ept: Ept) -> list[PageSize]:
    return [m.size for m in ept.mappings()]


def test_ept_maps_a_contiguous_domain_with_2m_leaves_and_the_rest_with_4k() -> None:
    machine = Machine()
    dom = machine.create_domain(1, 2 * RUN_FRAMES + 5, contiguous=True)
    ept = Ept.from_p2m(machine, dom, largest=G1)
    assert sizes(ept) == [M2, M2] + [K4] * 5
    for m in ept.mappings():
        assert m.mfn == dom.p2m[m.gfn] and m.rights.write
    assert sizes(Ept.from_p2m(machine, dom)) == [K4] * (2 * RUN_FRAMES + 5)  # 4 KiB only, as asked


def test_scattered_domain_gets_4k_leaves_only() -> None:
    machine = Machine()
    dom = machine.create_domain(1, RUN_FRAMES)
    assert set(sizes(Ept.from_p2m(machine, dom, largest=G1))) == {K4}


def test_a_4k_change_splits_the_2m_leaf_counts_it_and_keeps_the_rest() -> None:
    machine = Machine()
    backend = HapBackend(machine, machine.create_domain(1, RUN_FRAMES, contiguous=True))
    dom = backend.domain
    assert sizes(backend.ept) == [M2]
    backend.ept_set_rights(GFN(5), EptFlag.R)
    assert machine.counters[Event.EPT_SPLIT] == 1
    assert machine.counters[Event.INVEPT] == 1  # the 4 KiB entry was present: INVEPT, as Xen's needs_sync
    maps = list(backend.ept.mappings())
    assert [m.size for m in maps] == [K4] * RUN_FRAMES
    assert all(m.mfn == dom.p2m[m.gfn] for m in maps)
    assert [m.gfn for m in maps if not m.rights.write] == [5]
    assert hap_isolated(backend) == []
    backend.ept_set_rights(GFN(6), EptFlag.R)  # already split: no second split
    assert machine.counters[Event.EPT_SPLIT] == 1


def test_splitting_a_1g_leaf_goes_through_2m() -> None:
    """A 1 GiB leaf written by hand (no machine here has 1 GiB free): a 4 KiB change
    splits it into 512 2 MiB leaves, and the one covering the page into 4 KiB ones."""
    machine = Machine()
    ept = Ept(machine)
    base = 0x40000  # 1 GiB-aligned machine frame
    ept.write_large_leaf(0, G1, make_leaf(base, RWX) | int(EptFlag.PS))
    assert ept.lookup(0x12345) is not None and ept.lookup(0x12345).size is G1  # type: ignore[union-attr]
    ept.write_leaf(0x12345, make_leaf(0x999, EptFlag.R))
    assert machine.counters[Event.EPT_SPLIT] == 2
    got = ept.lookup(0x12345)
    assert got is not None and (got.size, got.mfn) == (K4, 0x999)
    neighbour = ept.lookup(0x12346)
    assert neighbour is not None and (neighbour.size, neighbour.mfn, neighbour.rights.write) == (K4, base + 0x12346, True)
    far = ept.lookup(0x30000)
    assert far is not None and (far.size, far.gfn, far.mfn) == (M2, 0x30000, base + 0x30000)


def test_hap_guest_on_large_ept_pages_sees_what_it_sees_on_4k_ones() -> None:
    """The default compare row against the 4 KiB one: the same guest-visible record,
    fewer references per miss (19 instead of 24), no exits."""
    big = run_workload(ModeSpec(Mode.HAP), seed_workload(64))
    small = run_workload(ModeSpec(Mode.HAP, large_ept=False), seed_workload(64))
    assert big.record == small.record
    for r, per_miss in ((big, 19), (small, 24)):
        c = r.counters
        assert c[Event.VM_EXIT] == 0 and c[Event.TLB_MISS] == 64
        assert c[Event.WALK_REF] + c[Event.EPT_WALK_REF] == per_miss * 64


def test_log_dirty_on_a_large_page_splits_and_exits_once() -> None:
    machine = Machine()
    backend = HapBackend(machine, machine.create_domain(1, RUN_FRAMES, contiguous=True))
    kernel = GuestKernel(backend, RUN_FRAMES)
    pid = kernel.create_process()
    va = 0x7000_0000
    kernel.map_range(pid, va, 1, populate=True)
    data = kernel.frame_of(backend.read_pte(kernel.l1_table(kernel.process(pid), va), (va >> 12) & 511))
    backend.ept_set_rights(data, EptFlag.R | EptFlag.X)
    kernel.touch(va, AccessKind.WRITE, 9)
    assert machine.counters.exits[ExitReason.EPT_VIOLATION] == 1 and backend.dirty_log == {data}
    assert machine.counters[Event.EPT_SPLIT] == 1
    assert backend.read_frame_u64(data, 0) == 9


# -- the five 2-D walk counts ---------------------------------------------------------------------


def two_d_refs(guest: PageSize, ept_page: PageSize) -> int:
    """Cold 2-D walk of one read through a guest page of ``guest`` size on an EPT built
    with pages of ``ept_page`` size: guest entries read + EPT entries read."""
    frames = max(guest.value, ept_page.value, M2.value) >> PAGE_SHIFT
    machine = Machine(nr_frames=2048, hypervisor_frames=64)
    base = G1.value >> PAGE_SHIFT  # machine frame 1 GiB-aligned: any EPT page size fits
    dom = Domain(DomId(1), {GFN(g): MFN(base + g) for g in range(frames)})
    ept = Ept.from_p2m(machine, dom, largest=ept_page)
    assert {m.size for m in ept.mappings()} == {ept_page}
    guest_memory = PhysicalMemory(machine.mem.maxphyaddr)
    builder = PageTableBuilder(guest_memory, iter(range(16, 32)))
    va = 0x7F80_0000_0000
    builder.map(va, 0, USER_RW, guest)  # guest page at GPA 0: aligned for every size
    for gfn in guest_memory.populated_frames():
        machine.mem.load_frame(base + gfn, guest_memory.frame_bytes(gfn))
    ctx = PagingContext(cr3=builder.cr3, maxphyaddr=machine.mem.maxphyaddr)
    result = nested_walk(machine.mem, ept.eptp, ctx, va + 0x238, Access(AccessKind.READ, 3))
    assert isinstance(result.outcome, CombinedTranslation)
    assert result.outcome.pa == (base << PAGE_SHIFT) + 0x238
    assert result.outcome.size is min(guest, ept_page, key=lambda s: s.value)
    return result.refs


def levels(size: PageSize) -> int:
    """Entries a walk reads to reach a leaf of this size: 4, 3 or 2."""
    return {K4: 4, M2: 3, G1: 2}[size]


@pytest.mark.parametrize(
    ("guest", "ept_page", "refs"), [(K4, K4, 24), (K4, M2, 19), (M2, K4, 19), (M2, M2, 15), (G1, G1, 8)]
)
def test_two_dimensional_walk_references(guest: PageSize, ept_page: PageSize, refs: int) -> None:
    assert (levels(guest) + 1) * (levels(ept_page) + 1) - 1 == refs  # Bhargava et al.'s count
    assert two_d_refs(guest, ept_page) == refs
