"""vCPU context switches (refmodel/hv/sched.py): the whole register state is saved
and restored, and the TLB is flushed on a switch unless tags keep vCPUs apart."""

import pytest

from refmodel.account.events import Event, ExitReason
from refmodel.arch.access import AccessKind
from refmodel.errors import RefmodelError
from refmodel.guest.kernel import GuestKernel
from refmodel.guest.ops import Mode
from refmodel.hv.machine import Machine
from refmodel.hv.modes import ModeSpec, build_backend
from refmodel.hv.sched import Scheduler

VA = 0x40_0000


def two_domains(mode: Mode, tagged: bool) -> tuple[Machine, Scheduler, list[GuestKernel]]:
    machine = Machine()
    sched = Scheduler(machine.tlb, machine.counters, tagged)
    kernels = []
    for domid in (1, 2):
        backend = build_backend(ModeSpec(mode, tagged=tagged), machine, domid, nr_frames=256)
        sched.add(domid, backend)
        sched.switch_to(domid - 1)
        k = GuestKernel(backend, 256)
        pid = k.create_process()
        k.map_range(pid, VA, 4, populate=True)
        k.touch(VA, AccessKind.WRITE, 100 + domid)
        kernels.append(k)
    return machine, sched, kernels


def test_registers_are_saved_and_restored_whole() -> None:
    _, sched, _ = two_domains(Mode.HAP, tagged=True)
    sched.switch_to(0)
    for i in range(16):
        sched.set_gpr(i, 0x1000 + i)
    sched.set_rip(0xFFFF_8000_0000_1000)
    sched.switch_to(1)
    assert all(sched.get_gpr(i) != 0x1000 + i for i in range(16)), "vCPU 1 sees vCPU 0's registers"
    sched.set_gpr(3, 7)
    sched.switch_to(0)
    assert [sched.get_gpr(i) for i in range(16)] == [0x1000 + i for i in range(16)]
    assert sched.regs.rip == 0xFFFF_8000_0000_1000
    sched.switch_to(1)
    assert sched.get_gpr(3) == 7 and sched.regs.rip == 0


def test_saved_state_includes_the_guest_paging_registers() -> None:
    _, sched, kernels = two_domains(Mode.SHADOW, tagged=True)
    sched.switch_to(0)
    sched.switch_to(1)
    saved = sched.vcpus[0].saved
    guest_cr3 = getattr(sched.vcpus[0].backend, "guest_state").cr3
    assert saved.cr3 == guest_cr3 != 0
    assert kernels[0].current is not None and guest_cr3 >> 12 == kernels[0].current.root


@pytest.mark.parametrize("mode", [Mode.SHADOW, Mode.PV, Mode.HAP])
def test_untagged_switch_flushes_and_tagged_switch_keeps_entries(mode: Mode) -> None:
    for tagged in (False, True):
        machine, sched, kernels = two_domains(mode, tagged)
        sched.switch_to(0)
        kernels[0].touch(VA)
        before = machine.counters.copy()
        sched.switch_to(1)
        sched.switch_to(0)
        kernels[0].touch(VA)
        counted = machine.counters.since(before)
        assert counted[Event.CONTEXT_SWITCH] == 2 and counted[Event.WORLD_SWITCH] == 2
        assert counted[Event.TLB_MISS] == (0 if tagged else 1), (mode, tagged)
        assert kernels[0].observations[-1].value == 101


def test_hvm_vcpus_leave_through_a_vm_exit_pv_ones_do_not() -> None:
    for mode, exits in ((Mode.HAP, 1), (Mode.PV, 0)):
        machine, sched, _ = two_domains(mode, tagged=True)
        before = machine.counters.copy()
        sched.switch_to(0)
        assert machine.counters.since(before).exits[ExitReason.HLT] == exits


def test_scheduler_rejects_unknown_vcpus_and_registers() -> None:
    _, sched, _ = two_domains(Mode.HAP, tagged=True)
    with pytest.raises(RefmodelError, match="no vCPU 5"):
        sched.switch_to(5)
    with pytest.raises(RefmodelError, match="no general register 16"):
        sched.set_gpr(16, 0)
    fresh = Scheduler(sched.tlb, sched.counters, True)
    with pytest.raises(RefmodelError, match="no vCPU is running"):
        fresh.get_gpr(0)
