"""Equivalence: the same guest workload on HAP (tagged or not) and on bare metal gives
the same observations and the same leaf entries, A/D bits included.

HAP's workloads are interleaved with hypervisor EPT updates the guest cannot see —
narrowing a GFN's EPT rights, as log-dirty tracking does — so EPT violations, their
handling, INVEPT and (untagged) the flush on every exit all happen along the way
and must change nothing the guest observes. After each run the isolation predicate
must hold.
"""

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refmodel.account.events import Event
from refmodel.arch.access import AccessKind
from refmodel.arch.types import GFN, PAGE_SIZE
from refmodel.errors import RefmodelError
from refmodel.guest.kernel import GuestKernel
from refmodel.guest.ops import MmuBackend
from refmodel.hv.hap import EptFlag, HapBackend, hap_isolated
from refmodel.hv.machine import Machine
from refmodel.hv.native import NativeBackend

GUEST_FRAMES = 1200
REGIONS = 3
MAX_PAGES = 40  #: above Linux's 33-page flush ceiling, so full flushes happen too
R, W, X = EptFlag.R, EptFlag.W, EptFlag.X
#: EPT rights the hypervisor may narrow a GFN to: none, read-only, read/execute
#: (log-dirty), execute-only.
NARROWED = [0, int(R), int(R | X), int(X)]


def region_va(region: int, page: int = 0) -> int:
    """Region 0 and 1 sit 20 pages below a 2 MiB boundary (ranges cross L1 tables);
    region 2 is in another PML4 slot."""
    base = (0x0000_0100_0000_0000, 0x0000_0100_0080_0000, 0x0000_7F00_0000_0000)[region]
    return base + 0x1EC000 + page * PAGE_SIZE


@dataclass(frozen=True)
class Op:
    """One workload step; fields a kind does not use are ignored. ``ept`` steps are
    the hypervisor's and run only under HAP."""

    kind: str
    proc: int = 0
    region: int = 0
    first: int = 0
    npages: int = 1
    flag: bool = True
    access: AccessKind = AccessKind.READ
    value: int = 0


procs = st.integers(0, 3)
regions = st.integers(0, REGIONS - 1)
firsts = st.integers(0, 12)
counts = st.integers(1, MAX_PAGES)
values = st.integers(0, (1 << 64) - 1)
ops = st.one_of(
    st.builds(Op, st.just("map"), procs, regions, st.just(0), counts, st.booleans(), value=st.integers(0, 1)),
    st.builds(Op, st.just("unmap"), procs, regions, firsts, counts),
    st.builds(Op, st.just("protect"), procs, regions, firsts, counts, st.booleans()),
    st.builds(Op, st.just("remap"), procs, regions, firsts, counts),
    st.builds(Op, st.just("fork"), procs),
    st.builds(Op, st.just("switch"), procs),
    st.builds(Op, st.just("touch"), st.just(0), regions, st.integers(0, MAX_PAGES + 2),
              access=st.sampled_from(list(AccessKind)), value=values),
    st.builds(Op, st.just("touch_range"), st.just(0), regions, firsts, counts,
              access=st.sampled_from([AccessKind.READ, AccessKind.WRITE]), value=values),
    st.builds(Op, st.just("ept"), first=st.integers(1, 200), npages=st.integers(1, 16),
              value=st.sampled_from(NARROWED)),
)


def apply(kernel: GuestKernel, op: Op) -> None:
    """Run one guest step; a step the kernel refuses raises RefmodelError (identically
    under every backend)."""
    pids = sorted(kernel.processes)
    pid = pids[op.proc % len(pids)]
    if op.kind == "map":
        kernel.map_range(pid, region_va(op.region), op.npages, writable=op.flag, populate=bool(op.value))
    elif op.kind == "unmap":
        kernel.unmap_range(pid, region_va(op.region, op.first), op.npages)
    elif op.kind == "protect":
        kernel.protect(pid, region_va(op.region, op.first), op.npages, op.flag)
    elif op.kind == "remap":
        kernel.remap(pid, region_va(op.region, op.first), op.npages)
    elif op.kind == "fork":
        kernel.fork(pid)
    elif op.kind == "switch":
        kernel.switch_to(pid)
    elif op.kind == "touch_range":  # fills the TLB, so that a missed flush would show
        for page in range(op.first, op.first + op.npages):
            kernel.touch(region_va(op.region, page), op.access, (op.value + page) % (1 << 64))
    else:
        kernel.touch(region_va(op.region, op.first) + 8 * (op.value % 512), op.access, op.value)


def narrow_ept(backend: HapBackend, op: Op) -> None:
    """The hypervisor narrows the EPT rights of a run of GFNs (page tables and data
    alike: the guest allocates frames from 1 upwards)."""
    for gfn in range(op.first, op.first + op.npages):
        backend.ept_set_rights(GFN(gfn), op.value)


def run(backend: MmuBackend, workload: list[Op]) -> tuple[GuestKernel, list[str]]:
    """The workload on a fresh kernel; the outcome of each guest step."""
    kernel = GuestKernel(backend, GUEST_FRAMES)
    kernel.create_process()
    outcomes = []
    for op in workload:
        if op.kind == "ept":
            if isinstance(backend, HapBackend):
                narrow_ept(backend, op)
            continue
        try:
            apply(kernel, op)
            outcomes.append("ok")
        except RefmodelError as e:
            outcomes.append(f"refused: {e}")
    return kernel, outcomes


def check_equivalent(workload: list[Op], tagged: bool) -> HapBackend:
    native, native_outcomes = run(NativeBackend(GUEST_FRAMES), workload)
    machine = Machine(nr_frames=3072, hypervisor_frames=64)
    hap = HapBackend(machine, machine.create_domain(1, GUEST_FRAMES), tagged=tagged)
    kernel, outcomes = run(hap, workload)
    assert outcomes == native_outcomes
    assert kernel.observations == native.observations
    assert kernel.page_table_view() == native.page_table_view()
    assert machine.counters[Event.VM_EXIT] == len(hap.exits)
    problems = hap_isolated(hap)
    assert not problems, "\n".join(problems[:10])
    return hap


#: Every generated workload starts with a populated, written region (a full TLB to go
#: stale) and ends by reading every page of every region (to see stale entries).
PROLOGUE = [Op("map", 0, 0, 0, MAX_PAGES, True, value=1),
            Op("touch_range", 0, 0, 0, MAX_PAGES, access=AccessKind.WRITE, value=1)]
EPILOGUE = [Op("touch_range", 0, r, 0, MAX_PAGES, access=AccessKind.READ) for r in range(REGIONS)]


@settings(max_examples=60)
@given(workload=st.lists(ops, min_size=1, max_size=12), tagged=st.booleans())
def test_hap_is_equivalent_to_native(workload: list[Op], tagged: bool) -> None:
    check_equivalent(PROLOGUE + workload + EPILOGUE, tagged)


FIXED: dict[str, list[Op]] = {
    "demand paging, protect, write fault, under log-dirty": [
        Op("ept", first=1, npages=60, value=int(R | X)),
        Op("map", 0, 1, 0, 8, True),
        Op("touch", 0, 1, 3, access=AccessKind.WRITE, value=99),
        Op("protect", 0, 1, 0, 8, False),
        Op("touch", 0, 1, 3, access=AccessKind.WRITE, value=100),
        Op("ept", first=1, npages=60, value=int(R | X)),
        Op("touch", 0, 1, 3, access=AccessKind.READ),
        Op("protect", 0, 1, 0, 8, True),
        Op("touch", 0, 1, 3, access=AccessKind.WRITE, value=101),
    ],
    "fork, copy-on-write in both processes, switch, EPT entries removed": [
        Op("map", 0, 0, 0, 36, True, value=1),
        *[Op("touch", 0, 0, i, access=AccessKind.WRITE, value=i) for i in range(0, 36, 5)],
        Op("fork", 0),
        Op("ept", first=1, npages=120, value=0),
        Op("touch", 0, 0, 5, access=AccessKind.WRITE, value=555),
        Op("switch", 1),
        Op("touch", 0, 0, 5, access=AccessKind.READ),
        Op("touch", 0, 0, 10, access=AccessKind.WRITE, value=1010),
        Op("switch", 0),
        Op("touch", 0, 0, 10, access=AccessKind.READ),
    ],
    "remap and unmap live pages, execute-only EPT, then fault": [
        Op("map", 0, 2, 0, 40, True, value=1),
        *[Op("touch", 0, 2, i, access=AccessKind.WRITE, value=3 * i) for i in range(40)],
        Op("ept", first=1, npages=100, value=int(X)),
        Op("remap", 0, 2, 0, 40),
        *[Op("touch", 0, 2, i, access=AccessKind.READ) for i in range(0, 40, 3)],
        Op("unmap", 0, 2, 5, 30),
        *[Op("touch", 0, 2, i, access=AccessKind.READ) for i in range(0, 40, 3)],
        Op("touch", 0, 2, 0, access=AccessKind.FETCH),
    ],
}


@pytest.mark.parametrize("tagged", [True, False], ids=["tagged", "untagged"])
@pytest.mark.parametrize("name", sorted(FIXED))
def test_fixed_workloads_are_equivalent(name: str, tagged: bool) -> None:
    hap = check_equivalent(FIXED[name], tagged)
    assert hap.exits, "the hypervisor's EPT updates were meant to cause exits"


def test_untagged_pays_a_flush_per_exit_tagged_does_not() -> None:
    workload = FIXED["demand paging, protect, write fault, under log-dirty"]
    tagged = check_equivalent(workload, tagged=True)
    untagged = check_equivalent(workload, tagged=False)
    assert len(tagged.exits) == len(untagged.exits) > 0
    assert untagged.counters[Event.TLB_FLUSH_GLOBAL] == len(untagged.exits)
    assert tagged.counters[Event.TLB_FLUSH_GLOBAL] == 0
