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

from dataclasses import dataclass, replace

import hypothesis.strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from refmodel.account.events import Event
from refmodel.arch.types import GFN
from refmodel.arch.vcpu import NUM_GPRS, ArchState
from refmodel.guest.kernel import GuestKernel, as_stored_by
from refmodel.guest.ops import MmuBackend, Mode
from refmodel.hv.hap import EptFlag, HapBackend
from refmodel.hv.invariants import all_violations, register_confidentiality, tlb_isolation
from refmodel.hv.machine import Machine
from refmodel.hv.modes import ModeSpec, build_backend
from refmodel.hv.native import NativeBackend
from refmodel.hv.sched import Scheduler
from stateful_support import (
    GUEST_FRAMES,
    REGION_PAGES,
    GuestOp,
    Map,
    PvBatchMonitor,
    allow_self_mapping,
    apply_op,
    coherence_problems,
    guest_ops,
    hap_tlb_problems,
    leaving_state,
    machine_settings,
    record_of,
)

HV_MODES = (Mode.SHADOW, Mode.SHADOW_OOS, Mode.PV, Mode.HAP)
#: Every process starts with memory to touch: the first region populated and
#: writable, the second on demand (a heap and a lazily grown area).
PRELUDE = (Map(0, 0, REGION_PAGES, True, True), Map(1, 0, REGION_PAGES, True, False))
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
        #: each vCPU's registers as it should see them when it runs
        self.expected: list[ArchState] = [ArchState() for _ in self.guests]
        for i, guest in enumerate(self.guests):
            self.run(i)
            for kernel in (guest.kernel, guest.twin):
                kernel.create_process()
                for op in PRELUDE:
                    assert apply_op(kernel, op)

    def teardown(self) -> None:
        monitor = getattr(self, "monitor", None)
        if monitor is not None:
            monitor.uninstall()

    def run(self, d: int) -> Guest:
        """Put domain ``d``'s vCPU on the CPU. The outgoing vCPU leaves with its
        registers and paging registers; the incoming one must find exactly its own
        (register confidentiality) and no TLB entry it can hit that was filled for
        another domain (TLB isolation)."""
        guest = self.guests[d]
        outgoing = self.sched.current
        if outgoing != d:
            if outgoing is not None:
                state = getattr(self.guests[outgoing].backend, "guest_state")
                self.expected[outgoing] = leaving_state(self.sched.regs, state)
            self.sched.switch_to(d)
            problems = register_confidentiality(self.sched.regs, self.expected[d]) + tlb_isolation(self.machine, guest.backend)
            assert not problems, f"switch to domain {guest.domid}: " + "; ".join(problems)
        return guest

    # -- rules -----------------------------------------------------------------------------------
    @rule(d=st.integers(0, NR_DOMAINS - 1), ops=st.lists(guest_ops(self_mapping=True), min_size=1, max_size=6))
    def guest_ops(self, d: int, ops: list[GuestOp]) -> None:
        """A burst of guest operations on one domain (a time slice): enough work
        between switches and EPT changes for the TLB to hold something."""
        guest = self.run(d)
        for op in ops:
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
        self.expected[d] = replace(self.expected[d].with_gpr(reg, value), rip=rip)

    def _hap(self) -> list[int]:
        return [i for i, g in enumerate(self.guests) if isinstance(g.backend, HapBackend)]

    @precondition(lambda self: bool(self.guests) and bool(self._hap()))
    @rule(which=st.integers(0, 10), frame=st.integers(0, 10_000),
          change=st.sampled_from(("read-execute only", "no rights", "execute only", "move to another frame",
                                  "log-dirty: every page read-execute")))
    def ept_change(self, which: int, frame: int, change: str) -> None:
        """The hypervisor edits a HAP domain's EPT behind its back — the running
        one's if it is a HAP domain — for a page the running process has mapped, or
        every page at once (log-dirty tracking for live migration); the guest must
        not notice, beyond the EPT exits it takes to get its rights back (Xen
        ``p2m_change_type``, page migration)."""
        hap = self._hap()
        d = self.sched.current if self.sched.current in hap else hap[which % len(hap)]
        guest = self.run(d)
        backend = guest.backend
        assert isinstance(backend, HapBackend)
        if change.startswith("log-dirty"):
            for g in sorted(backend.domain.p2m):
                if g < guest.kernel._next_frame:
                    backend.ept_set_rights(g, EptFlag.R | EptFlag.X)
            return
        gfn = self._mapped_frame(guest, frame)
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

    @staticmethod
    def _mapped_frame(guest: Guest, pick: int) -> GFN:
        """A guest frame the running process maps (its data, or the tables' frames
        a self-mapping guest maps), else any frame the kernel has used."""
        proc = guest.kernel.current
        frames = sorted({guest.kernel.frame_of(guest.kernel._read_leaf(proc, va)) for va in proc.mapped}) if proc else []
        if frames:
            return frames[pick % len(frames)]
        return GFN(1 + pick % max(1, guest.kernel._next_frame - 1))

    # -- after every step ------------------------------------------------------------------------
    def _checked_now(self, i: int) -> bool:
        """Untagged, every HVM vCPU uses VPID 0: only the running one's entries are its."""
        return self.tagged or self.sched.current == i

    @invariant()
    def every_domain_isolated(self) -> None:
        """Memory isolation, hypervisor integrity, PV page-table integrity and shadow
        soundness over all three domains (:func:`refmodel.hv.invariants.all_violations`);
        EPT changes followed by INVEPT; the hardware coherent with each guest's tables."""
        if not self.guests or self.sched.current is None:
            return
        running = self.guests[self.sched.current].backend
        problems = all_violations(self.machine, [g.backend for g in self.guests], running)
        for i, g in enumerate(self.guests):
            if not self._checked_now(i):
                continue
            if isinstance(g.backend, HapBackend):
                problems += hap_tlb_problems(g.backend)
            problems += [f"domain {g.domid}: {p}" for p in coherence_problems(g.backend)]
        assert not problems, "; ".join(problems[:6])

    @invariant()
    def untagged_switches_flush(self) -> None:
        if self.guests and not self.tagged:
            assert self.machine.counters[Event.TLB_FLUSH_GLOBAL] >= self.machine.counters[Event.CONTEXT_SWITCH]

    @invariant()
    def registers_are_the_running_vcpus(self) -> None:
        if not self.guests or self.sched.current is None:
            return
        problems = register_confidentiality(self.sched.regs, self.expected[self.sched.current])
        assert not problems, f"domain {self.guests[self.sched.current].domid}: " + "; ".join(problems)

    @invariant()
    def guests_see_what_native_gives(self) -> None:
        for g in self.guests:
            mine, native = record_of(g.kernel), record_of(g.twin)
            assert mine.observations == native.observations, f"domain {g.domid} ({g.backend.mode.value}): observations differ"
            assert mine.page_tables == as_stored_by(native.page_tables, g.backend), f"domain {g.domid} ({g.backend.mode.value}): page tables differ"


TestDomainSequences = DomainsMachine.TestCase
TestDomainSequences.settings = machine_settings(examples=50, steps=40)
