"""Equivalence: the same guest workload under PV (batched or not) and on bare
metal gives the same observations and the same leaf entries, A/D bits included —
only the accounting differs. After every workload the frame table is audited
against the page tables (:func:`test_pv_support.audit`).
"""

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refmodel.account.events import Event
from refmodel.arch.access import AccessKind
from refmodel.arch.types import PAGE_SIZE
from refmodel.errors import RefmodelError
from refmodel.guest.kernel import GuestKernel, as_stored_by
from refmodel.guest.ops import MmuBackend
from refmodel.hv.machine import Machine
from refmodel.hv.native import NativeBackend
from refmodel.hv.pv import PvBackend
from test_pv_support import audit

GUEST_FRAMES = 1800
#: Region r starts 30 pages below a 2 MiB boundary, so ranges cross L1 tables.
REGION_BASE = 0x0000_1000_0000_0000
REGION_STRIDE = 0x40_0000
REGIONS = 3
MAX_PAGES = 40  #: above Linux's 33-page flush ceiling, to reach full flushes


def region_va(region: int, page: int = 0) -> int:
    return REGION_BASE + region * REGION_STRIDE + 0x1E_0000 + page * PAGE_SIZE


@dataclass(frozen=True)
class Op:
    """One workload step; fields unused by a kind are ignored."""

    kind: str
    proc: int = 0
    region: int = 0
    first: int = 0
    npages: int = 1
    flag: bool = True
    access: AccessKind = AccessKind.READ
    value: int = 0


ops = st.one_of(
    st.builds(Op, st.just("map"), st.integers(0, 3), st.integers(0, REGIONS - 1), st.just(0),
              st.integers(1, MAX_PAGES), st.booleans(), value=st.integers(0, 1)),
    st.builds(Op, st.just("unmap"), st.integers(0, 3), st.integers(0, REGIONS - 1), st.integers(0, 12),
              st.integers(1, MAX_PAGES)),
    st.builds(Op, st.just("protect"), st.integers(0, 3), st.integers(0, REGIONS - 1), st.integers(0, 12),
              st.integers(1, MAX_PAGES), st.booleans()),
    st.builds(Op, st.just("remap"), st.integers(0, 3), st.integers(0, REGIONS - 1), st.integers(0, 12),
              st.integers(1, MAX_PAGES)),
    st.builds(Op, st.just("fork"), st.integers(0, 3)),
    st.builds(Op, st.just("switch"), st.integers(0, 3)),
    st.builds(Op, st.just("touch"), st.just(0), st.integers(0, REGIONS - 1), st.integers(0, MAX_PAGES + 2),
              access=st.sampled_from(list(AccessKind)), value=st.integers(0, (1 << 64) - 1)),
    st.builds(Op, st.just("touch_range"), st.just(0), st.integers(0, REGIONS - 1), st.integers(0, 12),
              st.integers(1, MAX_PAGES), access=st.sampled_from([AccessKind.READ, AccessKind.WRITE]),
              value=st.integers(0, (1 << 64) - 1)),
)


def apply(kernel: GuestKernel, op: Op) -> None:
    """Run one step on a kernel; a step the kernel refuses (an overlapping map)
    raises RefmodelError, identically under every backend."""
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
    elif op.kind == "touch_range":  # fills the TLB, so that a missed flush shows
        for page in range(op.first, op.first + op.npages):
            kernel.touch(region_va(op.region, page), op.access, op.value + page)
    else:
        kernel.touch(region_va(op.region, op.first) + 8 * (op.value % 512), op.access, op.value)


def run(backend: MmuBackend, workload: list[Op]) -> tuple[GuestKernel, list[str]]:
    """The workload on a fresh kernel; the outcome of each step (ok / refused)."""
    kernel = GuestKernel(backend, GUEST_FRAMES)
    kernel.create_process()
    outcomes = []
    for op in workload:
        try:
            apply(kernel, op)
            outcomes.append("ok")
        except RefmodelError as e:
            outcomes.append(f"refused: {e}")
    return kernel, outcomes


def check_equivalent(workload: list[Op], batch_size: int) -> PvBackend:
    native, native_outcomes = run(NativeBackend(GUEST_FRAMES), workload)
    machine = Machine()
    pv = PvBackend(machine, machine.create_domain(1, GUEST_FRAMES), batch_size=batch_size)
    kernel, outcomes = run(pv, workload)
    assert outcomes == native_outcomes
    assert kernel.observations == native.observations
    assert kernel.page_table_view() == as_stored_by(native.page_table_view(), pv)
    assert machine.counters[Event.VM_EXIT] == 0
    problems = audit(pv.vcpu.frames, [pv.vcpu])
    assert not problems, "\n".join(problems[:10])
    return pv


#: Every generated workload starts with a populated, written region (a full TLB to
#: go stale) and ends by reading every page of every region (to see stale entries).
PROLOGUE = [Op("map", 0, 0, 0, MAX_PAGES, True, value=1),
            Op("touch_range", 0, 0, 0, MAX_PAGES, access=AccessKind.WRITE, value=1)]
EPILOGUE = [Op("touch_range", 0, r, 0, MAX_PAGES, access=AccessKind.READ) for r in range(REGIONS)]


@settings(max_examples=60)
@given(workload=st.lists(ops, min_size=1, max_size=12), batch_size=st.sampled_from([1, 2, 7, 32]))
def test_pv_is_equivalent_to_native(workload: list[Op], batch_size: int) -> None:
    check_equivalent(PROLOGUE + workload + EPILOGUE, batch_size)


FIXED: dict[str, list[Op]] = {
    "populate then write and read every page": [
        Op("map", 0, 0, 0, MAX_PAGES, True, value=1),
        *[Op("touch", 0, 0, i, access=AccessKind.WRITE, value=i + 7) for i in range(MAX_PAGES)],
        *[Op("touch", 0, 0, i, access=AccessKind.READ, value=i) for i in range(MAX_PAGES)],
    ],
    "demand paging, protect, write fault": [
        Op("map", 0, 1, 0, 8, True),
        Op("touch", 0, 1, 3, access=AccessKind.WRITE, value=99),
        Op("protect", 0, 1, 0, 8, False),
        Op("touch", 0, 1, 3, access=AccessKind.WRITE, value=100),
        Op("touch", 0, 1, 3, access=AccessKind.READ),
        Op("protect", 0, 1, 0, 8, True),
        Op("touch", 0, 1, 3, access=AccessKind.WRITE, value=101),
    ],
    "fork, copy-on-write in both processes, switch": [
        Op("map", 0, 0, 0, 36, True, value=1),
        *[Op("touch", 0, 0, i, access=AccessKind.WRITE, value=i) for i in range(0, 36, 5)],
        Op("fork", 0),
        Op("touch", 0, 0, 5, access=AccessKind.WRITE, value=555),
        Op("switch", 1),
        Op("touch", 0, 0, 5, access=AccessKind.READ),
        Op("touch", 0, 0, 10, access=AccessKind.WRITE, value=1010),
        Op("switch", 0),
        Op("touch", 0, 0, 10, access=AccessKind.READ),
    ],
    "remap and unmap live pages, then fault": [
        Op("map", 0, 2, 0, 40, True, value=1),
        *[Op("touch", 0, 2, i, access=AccessKind.WRITE, value=3 * i) for i in range(40)],
        Op("remap", 0, 2, 0, 40),
        *[Op("touch", 0, 2, i, access=AccessKind.READ) for i in range(0, 40, 3)],
        Op("unmap", 0, 2, 5, 30),
        *[Op("touch", 0, 2, i, access=AccessKind.READ) for i in range(0, 40, 3)],
        Op("touch", 0, 2, 0, access=AccessKind.FETCH),
    ],
}


@pytest.mark.parametrize("batch_size", [1, 8, 32])
@pytest.mark.parametrize("name", sorted(FIXED))
def test_fixed_workloads_are_equivalent(name: str, batch_size: int) -> None:
    check_equivalent(FIXED[name], batch_size)


def test_batching_changes_only_the_cost() -> None:
    """The same workload, unbatched and batched: identical guest record, far fewer
    hypercalls batched."""
    workload = FIXED["remap and unmap live pages, then fault"]
    traps: dict[int, int] = {}
    for batch_size in (1, 32):
        pv = check_equivalent(workload, batch_size)
        traps[batch_size] = pv.counters[Event.HYPERCALL]
    assert traps[32] * 4 < traps[1]
