"""The seed scenario under PV: "map me these 1024 pages" as batched, validated
hypercalls, with one TLB flush per batch — and the unbatched guest for contrast.
"""

import math

import pytest

from refmodel.account.events import Event
from refmodel.arch.access import AccessKind
from refmodel.guest.kernel import GuestKernel
from refmodel.hv.machine import Machine
from refmodel.hv.pv import Hypercall, MmuextCmd, PageType, PvBackend, frame_table_of

PAGES = 1024
GUEST_FRAMES = 2400
BUFFER_VA = 0x0000_0600_0000_0000  # 2 MiB aligned: 1024 pages use two L1 tables


def pv_kernel(batch_size: int) -> tuple[Machine, PvBackend, GuestKernel, int]:
    machine = Machine()
    domain = machine.create_domain(1, GUEST_FRAMES)
    backend = PvBackend(machine, domain, batch_size=batch_size)
    kernel = GuestKernel(backend, GUEST_FRAMES)
    return machine, backend, kernel, kernel.create_process()


@pytest.mark.parametrize("batch_size", [1, 8, 32, 64, 100])
def test_populating_1024_pages_costs_one_mmu_update_per_batch(batch_size: int) -> None:
    machine, backend, kernel, pid = pv_kernel(batch_size)
    calls_before, l1_before = machine.counters[Event.HYPERCALL], backend.l1_update_calls
    entries_before = machine.counters[Event.HYPERCALL_ENTRY]
    kernel.map_range(pid, BUFFER_VA, PAGES, populate=True)

    batches = math.ceil(PAGES / batch_size)
    assert backend.l1_update_calls - l1_before == batches
    # Tables first (L3, L2 and two L1s linked: 4 upper-level writes, one more
    # mmu_update each when unbatched), then the leaves; nothing else traps.
    table_calls = 4 if batch_size == 1 else math.ceil(4 / batch_size)
    assert machine.counters[Event.HYPERCALL] - calls_before == table_calls + batches
    assert machine.counters[Event.HYPERCALL_ENTRY] - entries_before == 4 + PAGES
    # A PV guest never leaves through a VM exit.
    assert machine.counters[Event.VM_EXIT] == 0 and not machine.counters.exits
    # Every page is mapped writable, so each data frame holds one writable type ref.
    ft = frame_table_of(machine)
    for va in (BUFFER_VA, BUFFER_VA + (PAGES - 1) * 4096):
        frame = kernel.frame_of(kernel._read_leaf(kernel.processes[pid], va))
        state = ft.state(backend._mfn(frame))
        assert (state.type, state.count) == (PageType.WRITABLE, 1)


def test_unbatched_guest_makes_one_hypercall_per_update() -> None:
    machine, backend, kernel, pid = pv_kernel(1)
    kernel.map_range(pid, BUFFER_VA, PAGES, populate=True)
    assert backend.l1_update_calls == PAGES
    assert backend.calls[Hypercall.MULTICALL] == 0


@pytest.mark.parametrize("batch_size", [8, 32, 64])
def test_remapping_1024_live_pages_costs_one_flush_per_batch(batch_size: int) -> None:
    machine, backend, kernel, pid = pv_kernel(batch_size)
    kernel.map_range(pid, BUFFER_VA, PAGES, populate=True)
    kernel.touch(BUFFER_VA, AccessKind.WRITE, 0x1234)
    calls, flushes = machine.counters[Event.HYPERCALL], dict(backend.mmuext_cmds)
    kernel.remap(pid, BUFFER_VA, PAGES)

    batches = math.ceil(PAGES / batch_size)
    new_flushes = {c: n - flushes.get(c, 0) for c, n in backend.mmuext_cmds.items() if n != flushes.get(c, 0)}
    assert new_flushes == {MmuextCmd.TLB_FLUSH_LOCAL: batches}
    # Each batch travels with its flush in one multicall: one trap per batch.
    assert machine.counters[Event.HYPERCALL] - calls == batches
    kernel.touch(BUFFER_VA)
    assert kernel.observations[-1].value == 0x1234  # the copy, through the new mapping


def test_unbatched_remap_flushes_page_by_page() -> None:
    machine, backend, kernel, pid = pv_kernel(1)
    kernel.map_range(pid, BUFFER_VA, PAGES, populate=True)
    calls, invlpgs = machine.counters[Event.HYPERCALL], backend.mmuext_cmds[MmuextCmd.INVLPG_LOCAL]
    kernel.remap(pid, BUFFER_VA, PAGES)
    assert backend.mmuext_cmds[MmuextCmd.INVLPG_LOCAL] - invlpgs == PAGES
    assert backend.mmuext_cmds[MmuextCmd.TLB_FLUSH_LOCAL] == 0
    assert machine.counters[Event.HYPERCALL] - calls == 2 * PAGES  # update + INVLPG each


def test_a_single_deferred_invlpg_stays_an_invlpg() -> None:
    machine, backend, kernel, pid = pv_kernel(32)
    kernel.map_range(pid, BUFFER_VA, 4, populate=True)
    before = dict(backend.mmuext_cmds)
    kernel.remap(pid, BUFFER_VA, 1)
    assert backend.mmuext_cmds[MmuextCmd.INVLPG_LOCAL] - before.get(MmuextCmd.INVLPG_LOCAL, 0) == 1
    assert backend.mmuext_cmds[MmuextCmd.TLB_FLUSH_LOCAL] == before.get(MmuextCmd.TLB_FLUSH_LOCAL, 0)


def test_upper_level_batch_makes_xen_flush_once() -> None:
    """After a batch that changed L2..L4 entries Xen flushes the domain's TLB once;
    after a batch of L1 changes it does not (the guest asks)."""
    machine, backend, kernel, pid = pv_kernel(32)
    full = machine.counters[Event.TLB_FLUSH_GLOBAL]  # Xen's flushes drop global entries too
    kernel.map_range(pid, BUFFER_VA, 600, populate=True)  # 4 links, 600 leaves
    assert machine.counters[Event.TLB_FLUSH_GLOBAL] - full == 1
