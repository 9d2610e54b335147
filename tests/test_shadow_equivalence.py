"""Popek & Goldberg's equivalence property for shadow paging: the same guest
workload gives the same observations and the same page tables (A/D included) under
shadow paging — with and without out-of-sync L1s, with and without VPIDs — as on
bare metal, and the shadow audits hold after every step."""

import os
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from refmodel.arch.access import AccessKind
from refmodel.errors import RefmodelError
from refmodel.guest.kernel import GuestKernel
from refmodel.hv.native import NativeBackend
from refmodel.hv.shadow import ShadowBackend
from test_shadow_support import GUEST_FRAMES, PAGE, Record, assert_sound, new_shadow, record

#: The workload's window of user pages; it straddles a 1 GiB boundary (page 600), so
#: workloads build several L1 and L2 tables.
WINDOW_PAGES = 1100
WINDOW_VA = 5 * (1 << 30) - 600 * PAGE
EXAMPLES = 25 if os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci" else settings().max_examples


@dataclass(frozen=True)
class Op:
    """One workload step: ``name`` and its arguments (pages are window indices)."""

    name: str
    page: int = 0
    npages: int = 1
    flag: bool = False
    value: int = 0
    kind: AccessKind = AccessKind.READ
    target: int = 0  #: 0: the current process; k: process k mod n + 1 (maybe not running)


#: mostly a hot spot around the 1 GiB boundary, so that touches hit mapped pages
pages = st.one_of(st.integers(585, 625), st.integers(0, WINDOW_PAGES - 1))
counts = st.one_of(st.integers(1, 12), st.integers(1, 40), st.integers(1, 40), st.just(300))
targets = st.one_of(st.just(0), st.integers(1, 7))
touches = st.builds(
    Op, st.just("touch"), pages, value=st.integers(0, (1 << 64) - 1),
    kind=st.sampled_from([AccessKind.READ, AccessKind.WRITE, AccessKind.FETCH]), npages=st.integers(0, 511),
)
ops = st.one_of(
    st.builds(Op, st.just("map"), pages, counts, st.booleans(), value=st.sampled_from([0, 1])),
    st.builds(Op, st.just("unmap"), pages, counts, target=targets),
    st.builds(Op, st.just("protect"), pages, counts, st.booleans(), target=targets),
    st.builds(Op, st.just("remap"), pages, st.integers(1, 40), target=targets),
    st.builds(Op, st.just("fork")),
    st.builds(Op, st.just("switch"), st.integers(0, 7)),
    touches,
    touches,
    touches,
    touches,
)
#: every workload starts by mapping part of the hot spot, so that later steps find pages
first_map = st.builds(Op, st.just("map"), st.integers(585, 600), st.integers(10, 40), st.just(True), value=st.sampled_from([0, 1]))
workloads = st.builds(lambda first, rest: [first, *rest], first_map, st.lists(ops, min_size=3, max_size=16))


def whole_mappings(kernel: GuestKernel, pid: int, va: int, npages: int) -> tuple[int, int]:
    """Widen an unmap to every mapping it overlaps. GuestKernel.unmap_range forgets
    each overlapping VMA whole but clears only the requested pages, so a later
    populating map_range could rewrite live PTEs without an INVLPG — a guest bug
    whose outcome depends on what the TLB still holds (legal either way on hardware),
    which no equivalence test can judge."""
    end = va + npages * PAGE
    for v in kernel.process(pid).vmas:
        v_end = v.start + v.npages * PAGE
        if v.start < end and va < v_end:
            va, end = min(va, v.start), max(end, v_end)
    return va, (end - va) // PAGE


def apply(kernel: GuestKernel, op: Op) -> str:
    """Run one step; returns "ok" or the user error it raised (compared across modes)."""
    assert kernel.current is not None
    pid = kernel.current.pid if op.target == 0 else op.target % len(kernel.processes) + 1
    va = WINDOW_VA + op.page * PAGE
    npages = min(op.npages, WINDOW_PAGES - op.page)
    try:
        if op.name == "map":
            kernel.map_range(pid, va, npages, writable=op.flag, populate=bool(op.value))
        elif op.name == "unmap":
            kernel.unmap_range(pid, *whole_mappings(kernel, pid, va, npages))
        elif op.name == "protect":
            kernel.protect(pid, va, npages, writable=op.flag)
        elif op.name == "remap":
            kernel.remap(pid, va, npages)
        elif op.name == "fork":
            if len(kernel.processes) < 4:
                kernel.fork(kernel.current.pid)
        elif op.name == "switch":
            kernel.switch_to(op.page % len(kernel.processes) + 1)
        else:
            kernel.touch(va + (op.npages * 8) % PAGE, op.kind, op.value)
    except RefmodelError as e:
        return f"error: {e}"
    return "ok"


def sweep(kernel: GuestKernel, op: Op) -> None:
    """After every step, the running process reads across the hot spot and writes one
    page of it: most steps are then followed by hidden faults, A/D updates, TLB hits
    on possibly stale entries and copy-on-write breaks."""
    for page in range(585, 626, 8):
        kernel.touch(WINDOW_VA + page * PAGE, AccessKind.READ)
    kernel.touch(WINDOW_VA + (585 + op.page % 41) * PAGE + 8, AccessKind.WRITE, op.page)


def run(kernel: GuestKernel, workload: list[Op], shadow: ShadowBackend | None = None) -> tuple[Record, list[str]]:
    kernel.create_process()
    results = []
    for op in workload:
        results.append(apply(kernel, op))
        if op.name != "touch":
            sweep(kernel, op)
        if shadow is not None:
            assert_sound(shadow)
    return record(kernel), results


@settings(max_examples=EXAMPLES)
@given(workload=workloads, tagged=st.booleans())
def test_shadow_is_equivalent_to_native(workload: list[Op], tagged: bool) -> None:
    native = run(GuestKernel(NativeBackend(GUEST_FRAMES), GUEST_FRAMES), workload)
    backend = new_shadow(oos=False, tagged=tagged)
    assert run(GuestKernel(backend, GUEST_FRAMES), workload, backend) == native


@settings(max_examples=EXAMPLES)
@given(workload=workloads, tagged=st.booleans())
def test_shadow_oos_is_equivalent_to_native(workload: list[Op], tagged: bool) -> None:
    native = run(GuestKernel(NativeBackend(GUEST_FRAMES), GUEST_FRAMES), workload)
    backend = new_shadow(oos=True, tagged=tagged)
    assert run(GuestKernel(backend, GUEST_FRAMES), workload, backend) == native


def test_a_fixed_mixed_workload_is_equivalent() -> None:
    """Every operation once, in an order that exercises COW, protect and unmap on
    live pages, and switches while other processes' tables change."""
    workload = [
        Op("map", 590, 30, True, value=1),
        Op("touch", 595, kind=AccessKind.WRITE, value=5),
        Op("fork"),
        Op("touch", 595, kind=AccessKind.WRITE, value=6),
        Op("protect", 590, 8, False),
        Op("touch", 591, kind=AccessKind.WRITE, value=7),
        Op("switch", 1),
        Op("touch", 595, kind=AccessKind.READ),
        Op("touch", 596, kind=AccessKind.WRITE, value=8),
        Op("remap", 600, 10),
        Op("protect", 590, 4, True, target=2),
        Op("remap", 592, 4, target=2),
        Op("unmap", 598, 4),
        Op("touch", 599, kind=AccessKind.READ),
        Op("map", 10, 300, True, value=0),
        Op("touch", 20, kind=AccessKind.FETCH),
        Op("touch", 21, kind=AccessKind.WRITE, value=9),
        Op("switch", 1),
        Op("touch", 590, kind=AccessKind.WRITE, value=10),
        Op("touch", 593, kind=AccessKind.READ),
        Op("switch", 0),
        Op("unmap", 590, 300),
        Op("touch", 600, kind=AccessKind.READ),
    ]
    native = run(GuestKernel(NativeBackend(GUEST_FRAMES), GUEST_FRAMES), workload)
    for oos in (False, True):
        for tagged in (True, False):
            backend = new_shadow(oos=oos, tagged=tagged)
            assert run(GuestKernel(backend, GUEST_FRAMES), workload, backend) == native
