"""Operation sequences on one machine running three domains at once — each in a
mode drawn from shadow, shadow-oos, PV and HAP, possibly the same mode twice — on one
physical CPU: the :class:`Scheduler` switches vCPUs as the rules pick a domain, and
every domain shares the one physical TLB (VPID-tagged or not).

Rules: guest-kernel operations on any domain (with a native twin running the same
operations; a fully virtualized guest may also map its own page tables into user
space and store through them), register writes, explicit vCPU switches, and the hypervisor changing a
HAP domain's EPT behind its back (narrowing or removing rights as log-dirty tracking
does, moving a guest frame to another machine frame).

After every step:

- memory isolation and hypervisor integrity of every domain, in its mode's terms
  (shadow soundness, HAP EPT and TLB isolation, PV frame-table integrity);
- TLB isolation across switches: no TLB entry the running vCPU can use — nor, with
  tags, one of any vCPU — reaches a frame its domain does not own;
- register confidentiality: the register file holds exactly the running vCPU's
  registers, and a vCPU that ran before comes back with its paging registers;
- each guest has seen exactly what the same operations give natively, whatever the
  other domains and the hypervisor did in between.
"""

from dataclasses import dataclass

import hypothesis.strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from refmodel.account.events import Event
from refmodel.arch.types import GFN, PAGE_SHIFT, PAGE_SIZE
from refmodel.arch.vcpu import NUM_GPRS
from refmodel.guest.kernel import GuestKernel
from refmodel.guest.ops import MmuBackend, Mode
from refmodel.hv.hap import EptFlag, HapBackend
from refmodel.hv.machine import Machine
from refmodel.hv.modes import ModeSpec, build_backend
from refmodel.hv.native import NativeBackend
from refmodel.hv.pv import PvBackend, frame_table_of
from refmodel.hv.sched import Scheduler
from refmodel.hv.shadow import ShadowBackend, shadow_sound
from stateful_support import (
    GUEST_FRAMES,
    GuestOp,
    PvBatchMonitor,
    allow_self_mapping,
    apply_op,
    coherence_problems,
    guest_ops,
    hap_problems,
    note_ept_edit,
    machine_settings,
    pv_problems,
    record_of,
    tlb_problems,
)

HV_MODES = (Mode.SHADOW, Mode.SHADOW_OOS, Mode.PV, Mode.HAP)
NR_DOMAINS = 3


@dataclass
class Guest:
    """One domain: its backend, its kernel, and that kernel's native twin."""

    domid: int
    backend: MmuBackend
    kernel: GuestKernel
    twin: GuestKernel
    spare_gfn: int  #: next guest frame number outside the kernel's range, for EPT remaps

    @property
    def vpid(self) -> int:
        """The tag the hardware uses for this vCPU's translations."""
        mmu = getattr(self.backend, "mmu")
        return int(mmu.vpid)


class DomainsMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.guests: list[Guest] = []

    @initialize(modes=st.lists(st.sampled_from(HV_MODES), min_size=NR_DOMAINS, max_size=NR_DOMAINS),
                tagged=st.booleans(), batch_size=st.sampled_from((1, 4, 32)), self_mapping=st.booleans())
    def boot(self, modes: list[Mode], tagged: bool, batch_size: int, self_mapping: bool) -> None:
        """Three domains; with ``self_mapping`` the fully virtualized ones may map their
        own page tables into user space (raw PTE writes, :class:`MapTable`)."""
        self.tagged = tagged
        self.monitor = PvBatchMonitor()
        self.monitor.install()
        self.machine = Machine(nr_frames=8192, hypervisor_frames=4096)
        self.sched = Scheduler(self.machine.tlb, self.machine.counters, tagged)
        for i, mode in enumerate(modes):
            domid = i + 1
            backend = build_backend(ModeSpec(mode, batch_size=batch_size, tagged=tagged), self.machine, domid, GUEST_FRAMES)
            guest = Guest(domid, backend, GuestKernel(backend, GUEST_FRAMES),
                          GuestKernel(NativeBackend(GUEST_FRAMES), GUEST_FRAMES), GUEST_FRAMES)
            if self_mapping and mode is not Mode.PV:
                allow_self_mapping(guest.kernel)
                allow_self_mapping(guest.twin)
            self.sched.add(domid, backend)
            self.guests.append(guest)
        self.regs: list[tuple[tuple[int, ...], int]] = [((0,) * NUM_GPRS, 0) for _ in self.guests]
        self.switched_out: set[int] = set()
        for i, guest in enumerate(self.guests):
            self.run(i)
            guest.kernel.create_process()
            guest.twin.create_process()

    def teardown(self) -> None:
        monitor = getattr(self, "monitor", None)
        if monitor is not None:
            monitor.uninstall()

    def run(self, d: int) -> Guest:
        """Put domain ``d``'s vCPU on the CPU; check what comes back with it."""
        guest = self.guests[d]
        if self.sched.current != d:
            previous = self.sched.current
            self.sched.switch_to(d)
            if d in self.switched_out:
                state = getattr(guest.backend, "guest_state")
                assert (self.sched.regs.cr3, self.sched.regs.cr2) == (state.cr3, state.cr2), (
                    f"domain {guest.domid} resumed with CR3 {self.sched.regs.cr3:#x} CR2 {self.sched.regs.cr2:#x}, "
                    f"left with {state.cr3:#x} {state.cr2:#x}"
                )
            if previous is not None:
                self.switched_out.add(previous)
        return guest

    # -- rules -----------------------------------------------------------------------------------
    @rule(d=st.integers(0, NR_DOMAINS - 1), op=guest_ops(self_mapping=True))
    def guest_op(self, d: int, op: GuestOp) -> None:
        guest = self.run(d)
        applied = apply_op(guest.kernel, op)
        assert apply_op(guest.twin, op) == applied

    @rule(d=st.integers(0, NR_DOMAINS - 1))
    def switch(self, d: int) -> None:
        self.run(d)

    @rule(d=st.integers(0, NR_DOMAINS - 1), reg=st.integers(0, NUM_GPRS - 1), value=st.integers(0, (1 << 64) - 1),
          rip=st.integers(0, (1 << 47) - 1))
    def set_registers(self, d: int, reg: int, value: int, rip: int) -> None:
        self.run(d)
        self.sched.set_gpr(reg, value)
        self.sched.set_rip(rip)
        gprs = list(self.regs[d][0])
        gprs[reg] = value
        self.regs[d] = (tuple(gprs), rip)

    def _hap(self) -> list[int]:
        return [i for i, g in enumerate(self.guests) if isinstance(g.backend, HapBackend)]

    @precondition(lambda self: bool(self.guests) and bool(self._hap()))
    @rule(which=st.integers(0, 10), frame=st.integers(0, 10_000),
          change=st.sampled_from(("read-execute only", "no rights", "execute only", "move to another frame")))
    def ept_change(self, which: int, frame: int, change: str) -> None:
        """The hypervisor edits a HAP domain's EPT: the guest must not notice, beyond
        the exits it takes to get its rights back (Xen log-dirty, page migration)."""
        d = self._hap()[which % len(self._hap())]
        guest = self.run(d)
        backend = guest.backend
        assert isinstance(backend, HapBackend)
        used = guest.kernel._next_frame
        gfn = GFN(1 + frame % max(1, used - 1))
        if change == "read-execute only":
            backend.ept_set_rights(gfn, EptFlag.R | EptFlag.X)
        elif change == "no rights":
            backend.ept_set_rights(gfn, 0)
        elif change == "execute only":
            backend.ept_set_rights(gfn, EptFlag.X)
        else:
            old = backend.domain.mfn_of(gfn)
            assert old is not None
            new = self.machine.populate(backend.domain, GFN(guest.spare_gfn))
            guest.spare_gfn += 1
            self.machine.mem.load_frame(new, self.machine.mem.frame_bytes(old))
            backend.ept_remap(gfn, new)
        note_ept_edit(backend)

    # -- after every step ------------------------------------------------------------------------
    def _checked_now(self, i: int) -> bool:
        """Untagged, every HVM vCPU uses VPID 0: only the running one's entries are its."""
        return self.tagged or self.sched.current == i

    @invariant()
    def every_domain_isolated(self) -> None:
        if not self.guests:
            return
        problems: list[str] = []
        for i, g in enumerate(self.guests):
            if isinstance(g.backend, ShadowBackend) and self._checked_now(i):
                problems += shadow_sound(g.backend)
            elif isinstance(g.backend, HapBackend) and self._checked_now(i):
                problems += hap_problems(g.backend)
        for i, g in enumerate(self.guests):
            if self._checked_now(i) or isinstance(g.backend, PvBackend):
                problems += [f"domain {g.domid}: {p}" for p in coherence_problems(g.backend)]
        pv = [g.backend.vcpu for g in self.guests if isinstance(g.backend, PvBackend)]
        if pv:
            problems += pv_problems(frame_table_of(self.machine), pv)
        assert not problems, "; ".join(problems[:6])

    @invariant()
    def tlb_isolated_across_switches(self) -> None:
        if not self.guests or self.sched.current is None:
            return
        owners: dict[int, int] = {}
        for i, g in enumerate(self.guests):
            if self._checked_now(i) or isinstance(g.backend, PvBackend):
                owners[g.vpid] = g.domid
        problems = tlb_problems(self.machine, owners)
        assert not problems, "; ".join(problems[:6])

    @invariant()
    def untagged_switches_flush(self) -> None:
        if self.guests and not self.tagged:
            assert self.machine.counters[Event.TLB_FLUSH_GLOBAL] >= self.machine.counters[Event.CONTEXT_SWITCH]

    @invariant()
    def registers_are_the_running_vcpus(self) -> None:
        if not self.guests or self.sched.current is None:
            return
        gprs, rip = self.regs[self.sched.current]
        assert (self.sched.regs.gprs, self.sched.regs.rip) == (gprs, rip), (
            f"vCPU {self.sched.current} runs with {self.sched.regs.gprs}, rip {self.sched.regs.rip:#x}; "
            f"it left with {gprs}, rip {rip:#x}"
        )

    @invariant()
    def guests_see_what_native_gives(self) -> None:
        for g in self.guests:
            mine, native = record_of(g.kernel), record_of(g.twin)
            assert mine.observations == native.observations, f"domain {g.domid} ({g.backend.mode.value}): observations differ"
            assert mine.page_tables == native.page_tables, f"domain {g.domid} ({g.backend.mode.value}): page tables differ"


TestDomainSequences = DomainsMachine.TestCase
TestDomainSequences.settings = machine_settings(examples=250, steps=40)
