"""Native with PCIDs (refmodel/hv/native.py): address spaces keep their TLB entries
across switches, but never a translation that went stale while they were away."""

from refmodel.account.events import Event
from refmodel.arch.access import AccessKind
from refmodel.guest.kernel import GuestKernel
from refmodel.hv.native import NativeBackend

VA = 0x40_0000


def kernel(pcids: bool) -> tuple[NativeBackend, GuestKernel, int, int]:
    backend = NativeBackend(256, pcids=pcids)
    k = GuestKernel(backend, 256)
    a, b = k.create_process(), k.create_process()
    for pid in (a, b):
        k.switch_to(pid)
        k.map_range(pid, VA, 2, populate=True)
        k.touch(VA, AccessKind.WRITE, pid)
    return backend, k, a, b


def test_switching_back_keeps_the_tlb_with_pcids_only() -> None:
    for pcids, misses in ((False, 2), (True, 0)):
        backend, k, a, b = kernel(pcids)
        k.switch_to(a)
        k.touch(VA)
        k.switch_to(b)
        k.touch(VA)
        before = backend.counters.copy()
        k.switch_to(a)
        k.touch(VA)
        k.switch_to(b)
        k.touch(VA)
        assert backend.counters.since(before)[Event.TLB_MISS] == misses, pcids
        assert [o.value for o in k.observations[-2:]] == [a, b]


def test_a_mapping_removed_while_away_is_not_used_after_switching_back() -> None:
    for pcids in (False, True):
        _, k, a, b = kernel(pcids)
        k.switch_to(a)
        k.touch(VA)  # cached under A's PCID
        k.switch_to(b)
        k.unmap_range(a, VA, 1)  # A is not running: no INVLPG for it
        k.switch_to(a)
        k.touch(VA)
        assert k.observations[-1].event == "fault", pcids


def test_writes_to_another_address_space_leave_this_one_its_tlb() -> None:
    """Linux compares the *mm's* tlb_gen on a switch: populating B's tables does not
    make A's cached translations stale, so A keeps them (the switch table's native
    row once showed a full refill here because the generation was global)."""
    backend, k, a, b = kernel(True)
    k.switch_to(a)
    k.touch(VA)
    k.switch_to(b)
    k.map_range(b, VA + 0x10_0000, 4, populate=True)  # B's tables only
    before = backend.counters.copy()
    k.switch_to(a)
    k.touch(VA)
    assert backend.counters.since(before)[Event.TLB_MISS] == 0
    assert backend.counters.since(before)[Event.TLB_FLUSH_PCID] == 0


def test_a_write_to_this_address_space_while_away_still_flushes_it() -> None:
    backend, k, a, b = kernel(True)
    k.switch_to(a)
    k.touch(VA)
    k.switch_to(b)
    k.protect(a, VA, 1, writable=False)  # A's leaf changes while A is away
    before = backend.counters.copy()
    k.switch_to(a)
    k.touch(VA, AccessKind.WRITE, 1)
    assert k.observations[-1].event == "fault"
    assert backend.counters.since(before)[Event.TLB_MISS] == 1
