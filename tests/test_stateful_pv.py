"""Operation sequences against Xen's PV MMU: two PV domains on one machine, each a
guest kernel doing ordinary work through :class:`PvBackend`, interleaved with the
guest's own raw hypercalls — valid ones, and hostile ones that Xen must refuse.

Each domain also has a scratch address space the test drives by hand (L4 slot 224,
its own L3/L2/L1 and a few data frames beyond the kernel's): valid raw operations
map and unmap pages there with every flavour of request and flush (mmu_update +
MMUEXT_INVLPG_LOCAL, multicalls, update_va_mapping with UVMF_INVLPG / TLB_FLUSH and
local, all or bitmap scope), pin and unpin a spare table, and touch the pages; the
test's own record of those mappings says exactly what each touch must see.

Hostile operations name foreign frames, DOMID_XEN frames, writable mappings of page
tables, tables of the wrong level, Xen's L4 slots, disallowed flags, unknown
commands, unreadable vCPU bitmaps, foreign base pointers and data owners, counts
beyond the array, unpinning bases in use. Each must return the documented Xen error
(/work/shared/reference/xen-pv-mmu.md; xen/arch/x86/mm.c) and leave frame types,
type counts and memory as they were — or, for a batch, exactly the requests before
the failing one done.

After every step: PV page-table integrity and isolation (type counts recomputed
from scratch, no foreign or Xen frame reachable, no page table writable, no TLB entry
outside the domain), each kernel sees what the same operations give natively, and
the vCPU registers are those of the vCPU that runs (a :class:`Scheduler` switches
between the domains' vCPUs as the rules pick a domain).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import hypothesis.strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from refmodel.account.events import Event
from refmodel.arch.access import AccessKind
from refmodel.arch.fault import PageFault, PfErrorCode
from refmodel.arch.pte import Level, PteFlag
from refmodel.arch.types import ENTRY_SIZE, GFN, MFN, PAGE_SHIFT, PAGE_SIZE
from refmodel.arch.vcpu import NUM_GPRS, ArchState
from refmodel.guest.kernel import GuestKernel, as_stored_by
from refmodel.hv.invariants import all_violations, register_confidentiality, tlb_isolation
from refmodel.hv.machine import DOMID_SELF, Machine
from refmodel.hv.native import NativeBackend
from refmodel.hv.pv import (
    BatchResult,
    Errno,
    Hypercall,
    MmuCmd,
    MmuextCmd,
    MmuextOp,
    MmuUpdate,
    MulticallEntry,
    PageState,
    PageType,
    PvBackend,
    Uvmf,
    errno_name,
    frame_table_of,
    neg,
)
from refmodel.hv.pv.adjust import adjust_guest_l1e
from refmodel.hv.pv.hypercall import mmu_update, mmuext_op, multicall, update_va_mapping, update_va_mapping_otherdomain
from refmodel.hv.pv.mmu_update import do_mmu_update
from refmodel.hv.pv.vcpu import HYPERVISOR_VIRT_START
from refmodel.hv.sched import Scheduler
from stateful_support import (
    GUEST_FRAMES,
    Fork,
    GuestOp,
    PvBatchMonitor,
    apply_op,
    guest_ops,
    machine_settings,
    leaving_state,
    record_of,
)

EINVAL, EBUSY, EPERM, ENOSYS, ESRCH, EFAULT, EACCES, EOPNOTSUPP = (
    neg(e) for e in (Errno.EINVAL, Errno.EBUSY, Errno.EPERM, Errno.ENOSYS, Errno.ESRCH, Errno.EFAULT, Errno.EACCES, Errno.EOPNOTSUPP)
)

#: The scratch address space: L4 slot 224, then index 0 at every level below.
SCRATCH_L4_SLOT = 224
SCRATCH_VA = SCRATCH_L4_SLOT << 39
#: Scratch frames, as offsets from the first gfn after the kernel's.
S_L3, S_L2, S_L1, S_MASK, S_DATA, S_SPARE = 0, 1, 2, 3, 4, 8
SCRATCH_FRAMES = 9
DATA_PAGES = 4
#: Scratch L1 slot 0 maps the vCPU-bitmap page (read-only, value 1) for good; the
#: raw operations use slots 1..4; slot 7 is never mapped: an unreadable bitmap.
MASK_VA = SCRATCH_VA
RAW_SLOTS = (1, 2, 3, 4)
UNMAPPED_VA = SCRATCH_VA + 7 * PAGE_SIZE
#: Flags of the scratch entries: A (and D on leaves) already set, so that no walk
#: Xen makes on the guest's behalf (reading a vCPU bitmap) changes memory.
TABLE = int(PteFlag.P | PteFlag.RW | PteFlag.US | PteFlag.A)
LEAF = int(PteFlag.P | PteFlag.US | PteFlag.A | PteFlag.D)
#: A linear address no table maps (L4 slot 160 is never used).
NOWHERE_VA = 160 << 39


@dataclass(frozen=True)
class Snapshot:
    """What a refused request must leave alone: every frame whose type is in use or
    pinned (a type at count 0 constrains nothing), memory, base pointers, M2P."""

    types: dict[int, PageState]
    memory: dict[int, bytes]
    bases: tuple[tuple[MFN | None, MFN | None], ...]
    m2p: dict[int, int]


class PvDomain:
    """A PV domain: its guest kernel (and that kernel's native twin), and the scratch
    address space the test drives with raw hypercalls."""

    def __init__(self, machine: Machine, domid: int, batch_size: int) -> None:
        self.machine = machine
        self.domain = machine.create_domain(domid, GUEST_FRAMES + SCRATCH_FRAMES)
        self.backend = PvBackend(machine, self.domain, batch_size=batch_size)
        self.vcpu = self.backend.vcpu
        self.kernel = GuestKernel(self.backend, GUEST_FRAMES)
        self.twin = GuestKernel(NativeBackend(GUEST_FRAMES), GUEST_FRAMES)
        #: raw L1 slot -> (gfn, writable)
        self.raw: dict[int, tuple[GFN, bool]] = {}
        self.spare_pinned: Level | None = None

    def boot(self) -> None:
        self.kernel.create_process()
        self.twin.create_process()
        self.backend.write_frame_u64(self.scratch(S_MASK), 0, 1)  # bit 0: vCPU 0
        for table, slot, value in (
            (S_L1, 0, self.entry(self.scratch(S_MASK), LEAF)),
            (S_L2, 0, self.entry(self.scratch(S_L1), TABLE)),
            (S_L3, 0, self.entry(self.scratch(S_L2), TABLE)),
        ):
            assert mmu_update(self.vcpu, [MmuUpdate.pt_update(self.maddr(self.scratch(table), slot), value)]).rc == 0
        self.link_scratch(self.kernel.processes[1].root)

    def link_scratch(self, root: GFN) -> None:
        """Put the scratch L3 into a process's L4 (validating the scratch tree)."""
        req = MmuUpdate.pt_update(self.maddr(root, SCRATCH_L4_SLOT), self.entry(self.scratch(S_L3), TABLE))
        assert mmu_update(self.vcpu, [req]) == BatchResult(0, 1)

    # -- frames --------------------------------------------------------------------------
    def scratch(self, offset: int) -> GFN:
        return GFN(GUEST_FRAMES + offset)

    def mfn(self, gfn: int) -> MFN:
        mfn = self.domain.mfn_of(gfn)
        assert mfn is not None
        return mfn

    def maddr(self, table: GFN, slot: int) -> int:
        return (self.mfn(table) << PAGE_SHIFT) + slot * ENTRY_SIZE

    def entry(self, gfn: GFN, flags: int) -> int:
        return (self.mfn(gfn) << PAGE_SHIFT) | flags

    def tables(self, level: Level) -> list[GFN]:
        """The kernel's page tables of ``level`` and the scratch one."""
        if level is Level.L4:
            return sorted({p.root for p in self.kernel.processes.values()})
        mine = {t for p in self.kernel.processes.values() for (lvl, _), t in p.tables.items() if lvl is level}
        scratch = {Level.L3: S_L3, Level.L2: S_L2, Level.L1: S_L1}[level]
        return sorted(mine) + [self.scratch(scratch)]

    def all_tables(self) -> list[GFN]:
        return [t for level in Level for t in self.tables(level)]

    def data_pages(self) -> list[GFN]:
        return [self.scratch(S_DATA + i) for i in range(DATA_PAGES)]

    def writable_data(self) -> list[MFN]:
        """Own frames typed writable and in use (an RW mapping exists)."""
        ft = frame_table_of(self.machine)
        frames = [self.mfn(g) for g in range(1, GUEST_FRAMES + SCRATCH_FRAMES)]
        return [m for m in frames if ft.info(m).type is PageType.WRITABLE and ft.info(m).count]

    def current_root(self) -> GFN:
        assert self.kernel.current is not None
        return self.kernel.current.root


def pick(items: Sequence[GFN] | Sequence[MFN] | Sequence[int], index: int) -> int:
    return int(items[index % len(items)])


class PvMachine(RuleBasedStateMachine):
    """Two PV domains, valid and hostile hypercalls, checked after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.doms: list[PvDomain] = []

    @initialize(batch_sizes=st.tuples(st.sampled_from((1, 3, 32)), st.sampled_from((1, 3, 32))), tagged=st.booleans())
    def boot(self, batch_sizes: tuple[int, int], tagged: bool) -> None:
        self.monitor = PvBatchMonitor()
        self.monitor.install()
        self.machine = Machine(nr_frames=2048, hypervisor_frames=256)
        self.ft = frame_table_of(self.machine)
        self.doms = [PvDomain(self.machine, domid, batch) for domid, batch in zip((1, 2), batch_sizes)]
        for dom in self.doms:
            dom.boot()
        self.sched = Scheduler(self.machine.tlb, self.machine.counters, tagged)
        for dom in self.doms:
            self.sched.add(int(dom.domain.domid), dom.backend)
        #: each vCPU's registers as it should see them when it runs
        self.expected: list[ArchState] = [ArchState() for _ in self.doms]
        self.sched.switch_to(0)

    def teardown(self) -> None:
        monitor = getattr(self, "monitor", None)
        if monitor is not None:
            monitor.uninstall()

    # -- running a domain ----------------------------------------------------------------------
    def run(self, d: int) -> PvDomain:
        """Schedule domain ``d``'s vCPU (a context switch if another one runs): the
        outgoing vCPU leaves with its registers and its paging registers as it has
        them; the incoming one must find exactly its own, and no TLB entry of
        another domain it could hit."""
        dom = self.doms[d]
        outgoing = self.sched.current
        if outgoing != d:
            if outgoing is not None:
                self.expected[outgoing] = leaving_state(self.sched.regs, self.doms[outgoing].backend.guest_state)
            self.sched.switch_to(d)
            problems = register_confidentiality(self.sched.regs, self.expected[d]) + tlb_isolation(self.machine, dom.backend)
            assert not problems, f"switch to vCPU {d}: " + "; ".join(problems)
        return dom

    def snapshot(self) -> Snapshot:
        types = {int(m): self.ft.state(m) for m in self.ft.pages}
        owned = [m for dom in self.doms for m in self.machine.frames_of(dom.domain.domid)]
        return Snapshot(
            {m: s for m, s in types.items() if s.count or s.pinned},
            {int(m): self.machine.mem.frame_bytes(m) for m in owned},
            tuple((dom.vcpu.guest_table, dom.vcpu.guest_table_user) for dom in self.doms),
            {int(m): int(g) for m, g in self.machine.m2p.items()},
        )

    def refused(self, expected: int, call: Callable[[], int], what: str) -> None:
        """A hostile request: Xen's documented error, and nothing changed."""
        before = self.snapshot()
        rc = call()
        assert rc == expected, f"{what}: got {errno_name(rc)}, Xen returns {errno_name(expected)}"
        assert self.snapshot() == before, f"{what}: refused with {errno_name(rc)} but changed state"

    def update(self, dom: PvDomain, reqs: list[MmuUpdate], foreigndom: int = DOMID_SELF) -> BatchResult:
        """One mmu_update hypercall: one trap (the batch itself is checked by the
        :class:`PvBatchMonitor`: entries read, and the flush after an L2..L4 change)."""
        before = self.machine.counters[Event.HYPERCALL]
        result = mmu_update(dom.vcpu, reqs, foreigndom)
        assert self.machine.counters[Event.HYPERCALL] == before + 1
        return result

    def ext(self, dom: PvDomain, ops: list[MmuextOp], foreigndom: int = DOMID_SELF) -> BatchResult:
        before = self.machine.counters.copy()
        result = mmuext_op(dom.vcpu, ops, foreigndom)
        delta = self.machine.counters.since(before)
        assert delta[Event.HYPERCALL] == 1
        assert result.done <= delta[Event.HYPERCALL_ENTRY] <= len(ops), (result, delta.as_dict())
        return result

    def ext1(self, dom: PvDomain, cmd: int, arg1: int = 0, arg2: int = 0, foreigndom: int = DOMID_SELF) -> int:
        return self.ext(dom, [MmuextOp(cmd, arg1, arg2)], foreigndom).rc

    # ==== the guest kernel's own work ==============================================================
    @rule(d=st.integers(0, 1), op=guest_ops())
    def kernel_op(self, d: int, op: GuestOp) -> None:
        dom = self.run(d)
        processes = len(dom.kernel.processes)
        applied = apply_op(dom.kernel, op)
        assert apply_op(dom.twin, op) == applied
        if isinstance(op, Fork) and len(dom.kernel.processes) > processes:
            dom.link_scratch(dom.kernel.processes[len(dom.kernel.processes)].root)

    @rule(d=st.integers(0, 1), reg=st.integers(0, NUM_GPRS - 1), value=st.integers(0, (1 << 64) - 1), rip=st.integers(0, (1 << 47) - 1))
    def set_registers(self, d: int, reg: int, value: int, rip: int) -> None:
        self.run(d)
        self.sched.set_gpr(reg, value)
        self.sched.set_rip(rip)
        self.expected[d] = replace(self.expected[d].with_gpr(reg, value), rip=rip)

    # ==== valid raw hypercalls on the scratch space ================================================
    @rule(
        d=st.integers(0, 1),
        slot=st.sampled_from(RAW_SLOTS),
        choice=st.integers(0, 1000),
        writable=st.booleans(),
        how=st.sampled_from(("mmu_update+invlpg", "multicall", "uvm-invlpg-local", "uvm-flush-all", "uvm-invlpg-mask",
                             "preserve-ad+flush-multi", "unmap")),
    )
    def raw_map(self, d: int, slot: int, choice: int, writable: bool, how: str) -> None:
        """Map (or unmap) a scratch page: a data frame, the bitmap page, the spare
        frame, or — read-only — one of the domain's page tables; then flush."""
        dom = self.run(d)
        candidates = dom.data_pages() + [dom.scratch(S_MASK), dom.scratch(S_SPARE)]
        tables = dom.all_tables()
        gfn = GFN(pick(candidates + tables, choice))
        # RW on a table is a hostile case (below); the spare stays empty, so never RW.
        writable = writable and gfn not in tables and gfn != dom.scratch(S_SPARE)
        value = 0 if how == "unmap" else dom.entry(gfn, LEAF | (int(PteFlag.RW) if writable else 0))
        va = SCRATCH_VA + slot * PAGE_SIZE
        maddr = dom.maddr(dom.scratch(S_L1), slot)
        if how in ("mmu_update+invlpg", "unmap"):
            assert self.update(dom, [MmuUpdate.pt_update(maddr, value)]) == BatchResult(0, 1)
            assert self.ext1(dom, MmuextCmd.INVLPG_LOCAL, va) == 0
        elif how == "multicall":
            out = multicall(dom.vcpu, [
                MulticallEntry(Hypercall.MMU_UPDATE, args=((MmuUpdate.pt_update(maddr, value),), 1, 0, DOMID_SELF)),
                MulticallEntry(Hypercall.MMUEXT_OP, args=((MmuextOp(MmuextCmd.INVLPG_LOCAL, va),), 1, 0, DOMID_SELF)),
            ])
            assert out.rc == 0 and [e.result for e in out.entries] == [0, 0], out
        elif how == "preserve-ad+flush-multi":
            req = MmuUpdate.pt_update(maddr, value, MmuCmd.PT_UPDATE_PRESERVE_AD)
            assert self.update(dom, [req]) == BatchResult(0, 1)
            assert self.ext1(dom, MmuextCmd.TLB_FLUSH_MULTI, 0, MASK_VA) == 0
            if self.machine.mem.read_u64(dom.maddr(dom.scratch(S_MASK), 0)) & 1 == 0:
                # the guest wrote its own bitmap page: no vCPU selected, nothing flushed
                assert self.ext1(dom, MmuextCmd.TLB_FLUSH_LOCAL) == 0
        else:
            flags = {"uvm-invlpg-local": Uvmf.INVLPG | Uvmf.LOCAL, "uvm-flush-all": Uvmf.TLB_FLUSH | Uvmf.ALL,
                     "uvm-invlpg-mask": Uvmf.INVLPG | MASK_VA}[how]
            assert update_va_mapping(dom.vcpu, va, value, int(flags)) == 0
            if how == "uvm-invlpg-mask" and self.machine.mem.read_u64(dom.maddr(dom.scratch(S_MASK), 0)) & 1 == 0:
                assert self.ext1(dom, MmuextCmd.INVLPG_LOCAL, va) == 0
        if value:
            dom.raw[slot] = (gfn, writable)
        else:
            dom.raw.pop(slot, None)

    @rule(
        d=st.integers(0, 1),
        slot=st.sampled_from((0,) + RAW_SLOTS + (7,)),
        offset=st.sampled_from((0, 8, PAGE_SIZE - 8)),
        kind=st.sampled_from(list(AccessKind)),
        value=st.integers(0, (1 << 64) - 1),
    )
    def raw_touch(self, d: int, slot: int, offset: int, kind: AccessKind, value: int) -> None:
        """A user access to a scratch page: what the test's record of the mappings says."""
        dom = self.run(d)
        mapping = (dom.scratch(S_MASK), False) if slot == 0 else dom.raw.get(slot)
        va = SCRATCH_VA + slot * PAGE_SIZE + offset
        out = dom.backend.access(va, kind, 3, value)
        if mapping is None:
            assert isinstance(out, PageFault) and not out.error_code & PfErrorCode.P, out
            return
        gfn, writable = mapping
        maddr = (dom.mfn(gfn) << PAGE_SHIFT) + offset
        if kind is AccessKind.WRITE and not writable:
            assert isinstance(out, PageFault) and out.error_code & PfErrorCode.P, out
        elif kind is AccessKind.WRITE:
            assert out == 0 and self.machine.mem.read_u64(maddr) == value, f"store to {va:#x} went elsewhere"
        elif kind is AccessKind.READ:
            assert out == self.machine.mem.read_u64(maddr), f"load from {va:#x}: {out!r}, the mapping says frame {gfn:#x}"
        else:
            assert out == self.machine.mem.read_uint(maddr, 1), f"fetch from {va:#x}: {out!r}"

    @rule(d=st.integers(0, 1), level=st.sampled_from(list(Level)))
    def pin_spare(self, d: int, level: Level) -> None:
        """Pin the spare frame (always empty, never mapped writable) at any level:
        refused while it is pinned, fine otherwise — a type change included."""
        dom = self.run(d)
        spare = dom.mfn(dom.scratch(S_SPARE))
        cmd = MmuextCmd(int(level) - 1)
        if dom.spare_pinned is not None:
            self.refused(EINVAL, lambda: self.ext1(dom, cmd, spare), f"pin the pinned spare as {level.name}")
            return
        assert self.ext1(dom, cmd, spare) == 0
        dom.spare_pinned = level
        assert self.ft.state(spare) == PageState(PageType.table(level), 1, True, True)

    @rule(d=st.integers(0, 1))
    def unpin_spare(self, d: int) -> None:
        dom = self.run(d)
        spare = dom.mfn(dom.scratch(S_SPARE))
        if dom.spare_pinned is None:
            self.refused(EINVAL, lambda: self.ext1(dom, MmuextCmd.UNPIN_TABLE, spare), "unpin a table not pinned")
            return
        assert self.ext1(dom, MmuextCmd.UNPIN_TABLE, spare) == 0
        dom.spare_pinned = None
        assert self.ft.state(spare).count == 0 and not self.ft.state(spare).validated

    @rule(
        d=st.integers(0, 1),
        cmd=st.sampled_from((MmuextCmd.TLB_FLUSH_LOCAL, MmuextCmd.INVLPG_LOCAL, MmuextCmd.TLB_FLUSH_ALL,
                             MmuextCmd.INVLPG_ALL, MmuextCmd.TLB_FLUSH_MULTI, MmuextCmd.INVLPG_MULTI)),
        slot=st.sampled_from(RAW_SLOTS),
    )
    def flush(self, d: int, cmd: MmuextCmd, slot: int) -> None:
        dom = self.run(d)
        assert self.ext1(dom, cmd, SCRATCH_VA + slot * PAGE_SIZE, MASK_VA) == 0

    @rule(d=st.integers(0, 1), other_root=st.booleans(), which=st.integers(0, 100))
    def unpin_base_and_repin(self, d: int, other_root: bool, which: int) -> None:
        """Unpinning a base in use succeeds (Xen does not check; the base pointer's
        own reference keeps it validated); unpinning another process's root
        de-validates its whole tree. Pinning it again restores every type and count."""
        dom = self.run(d)
        roots = dom.tables(Level.L4)
        root = dom.current_root() if not other_root else GFN(pick(roots, which))
        mfn = dom.mfn(root)
        before = self.snapshot()
        assert self.ext1(dom, MmuextCmd.UNPIN_TABLE, mfn) == 0
        state = self.ft.state(mfn)
        if root == dom.current_root():
            assert state.type is PageType.L4 and state.validated and state.count >= 1 and not state.pinned
        else:
            assert state.count == 0 and not state.validated
        assert self.ext1(dom, MmuextCmd.PIN_L4_TABLE, mfn) == 0
        assert self.snapshot() == before

    # ==== hostile requests ============================================================================
    @rule(d=st.integers(0, 1), table=st.integers(0, 1000), slot=st.integers(0, 511), frame=st.integers(0, 10_000),
          writable=st.booleans(), whose=st.sampled_from(("other domain", "xen", "not ram")))
    def map_what_is_not_mine(self, d: int, table: int, slot: int, frame: int, writable: bool, whose: str) -> None:
        """get_page_from_l1e: another domain's or Xen's frame -> -EBUSY (could_not_pin);
        a frame that is not RAM -> -EPERM (an MMIO attempt)."""
        dom = self.run(d)
        other = self.doms[1 - d]
        l1 = GFN(pick(dom.tables(Level.L1), table))
        if whose == "other domain":
            target, rc = pick(sorted(self.machine.frames_of(other.domain.domid)), frame), EBUSY
        elif whose == "xen":
            target, rc = 1 + frame % 255, EBUSY
        else:
            target, rc = self.machine.nr_frames + frame, EPERM
        value = (target << PAGE_SHIFT) | LEAF | (int(PteFlag.RW) if writable else 0)
        req = MmuUpdate.pt_update(dom.maddr(l1, slot), value)
        self.refused(rc, lambda: self.update(dom, [req]).rc, f"L1 entry -> {whose} frame {target:#x}")

    @rule(d=st.integers(0, 1), table=st.integers(0, 1000), slot=st.integers(0, 511), victim=st.integers(0, 1000))
    def map_page_table_writable(self, d: int, table: int, slot: int, victim: int) -> None:
        """An RW mapping of a page table needs a writable type it cannot get: -EBUSY."""
        dom = self.run(d)
        l1 = GFN(pick(dom.tables(Level.L1), table))
        table_gfn = GFN(pick(dom.all_tables(), victim))
        req = MmuUpdate.pt_update(dom.maddr(l1, slot), dom.entry(table_gfn, LEAF | int(PteFlag.RW)))
        self.refused(EBUSY, lambda: self.update(dom, [req]).rc, f"RW mapping of page table gfn {table_gfn:#x}")

    @rule(d=st.integers(0, 1), case=st.sampled_from(("L2->L4", "L3->L1", "L4->L2", "L2->writable data", "L3->L3 RW")),
          table=st.integers(0, 1000), slot=st.integers(0, 255), victim=st.integers(0, 1000))
    def wrong_level(self, d: int, case: str, table: int, slot: int, victim: int) -> None:
        """An L2..L4 entry must name a table of the level below (a same-level
        "linear" table only read-only): anything else is -EINVAL."""
        dom = self.run(d)
        level = Level(int(case[1]))
        holder = GFN(pick(dom.tables(level), table))
        if case == "L2->writable data":
            frames = dom.writable_data()
            if not frames:
                return
            value = (pick(frames, victim) << PAGE_SHIFT) | TABLE
        else:
            victim_level = Level(int(case[5]))
            value = dom.entry(GFN(pick(dom.tables(victim_level), victim)), TABLE)
        req = MmuUpdate.pt_update(dom.maddr(holder, slot), value)
        self.refused(EINVAL, lambda: self.update(dom, [req]).rc, f"{case} entry")

    @rule(d=st.integers(0, 1), slot=st.integers(256, 271))
    def xen_l4_slot(self, d: int, slot: int) -> None:
        """Xen's own L4 slots: "L4 update in Xen-private area" -> -EINVAL."""
        dom = self.run(d)
        req = MmuUpdate.pt_update(dom.maddr(dom.current_root(), slot), dom.entry(dom.scratch(S_L3), TABLE))
        self.refused(EINVAL, lambda: self.update(dom, [req]).rc, f"write Xen's L4 slot {slot}")

    @rule(d=st.integers(0, 1), case=st.sampled_from(("L2 PSE", "L3 G", "L4 PCD", "L1 PCD", "L1 PAT", "L1 PWT")),
          table=st.integers(0, 1000), slot=st.integers(0, 255))
    def disallowed_flags(self, d: int, case: str, table: int, slot: int) -> None:
        """Flags outside the allowed set (no superpages, no G above L1, no cache
        attributes without I/O privilege): -EINVAL."""
        dom = self.run(d)
        level = Level(int(case[1]))
        bit = {"PSE": PteFlag.PS, "G": PteFlag.G, "PCD": PteFlag.PCD, "PAT": PteFlag.PS, "PWT": PteFlag.PWT}[case[3:]]
        holder = GFN(pick(dom.tables(level), table))
        target = dom.data_pages()[0] if level is Level.L1 else dom.tables(Level(level - 1))[-1]
        req = MmuUpdate.pt_update(dom.maddr(holder, slot), dom.entry(target, (LEAF if level is Level.L1 else TABLE) | int(bit)))
        self.refused(EINVAL, lambda: self.update(dom, [req]).rc, case)

    @rule(d=st.integers(0, 1), frame=st.integers(0, 10_000), whose=st.sampled_from(("other domain", "xen")))
    def entry_in_a_frame_not_mine(self, d: int, frame: int, whose: str) -> None:
        """The frame holding the entry must be the caller's: -EINVAL."""
        dom = self.run(d)
        other = self.doms[1 - d]
        mfn = pick(sorted(self.machine.frames_of(other.domain.domid)), frame) if whose == "other domain" else 1 + frame % 255
        req = MmuUpdate.pt_update(mfn << PAGE_SHIFT, dom.entry(dom.data_pages()[0], LEAF))
        self.refused(EINVAL, lambda: self.update(dom, [req]).rc, f"entry in {whose} frame {mfn:#x}")

    @rule(d=st.integers(0, 1), frame=st.integers(0, 10_000))
    def machphys_update_of_a_foreign_frame(self, d: int, frame: int) -> None:
        dom = self.run(d)
        mfn = pick(sorted(self.machine.frames_of(self.doms[1 - d].domain.domid)), frame)
        req = MmuUpdate((mfn << PAGE_SHIFT) | MmuCmd.MACHPHYS_UPDATE, 5)
        self.refused(EINVAL, lambda: self.update(dom, [req]).rc, f"M2P update of foreign mfn {mfn:#x}")

    @rule(d=st.integers(0, 1), cmd=st.integers(4, 7))
    def unknown_mmu_update_command(self, d: int, cmd: int) -> None:
        dom = self.run(d)
        req = MmuUpdate(dom.maddr(dom.scratch(S_L1), 1) | cmd, 0)
        self.refused(ENOSYS, lambda: self.update(dom, [req]).rc, f"mmu_update command {cmd}")

    @rule(d=st.integers(0, 1), case=st.sampled_from(("14", "21", "huge", "MARK_SUPER", "UNMARK_SUPER", "FLUSH_CACHE",
                                                     "FLUSH_CACHE_GLOBAL", "SET_LDT unaligned", "SET_LDT too big",
                                                     "SET_LDT in Xen")))
    def bad_mmuext_command(self, d: int, case: str) -> None:
        dom = self.run(d)
        ops = {
            "14": (MmuextOp(14), ENOSYS), "21": (MmuextOp(21), ENOSYS), "huge": (MmuextOp((1 << 32) - 1), ENOSYS),
            "MARK_SUPER": (MmuextOp(MmuextCmd.MARK_SUPER, 1), EOPNOTSUPP),
            "UNMARK_SUPER": (MmuextOp(MmuextCmd.UNMARK_SUPER, 1), EOPNOTSUPP),
            "FLUSH_CACHE": (MmuextOp(MmuextCmd.FLUSH_CACHE), EACCES),
            "FLUSH_CACHE_GLOBAL": (MmuextOp(MmuextCmd.FLUSH_CACHE_GLOBAL), EACCES),
            "SET_LDT unaligned": (MmuextOp(MmuextCmd.SET_LDT, SCRATCH_VA + 8, 1), EINVAL),
            "SET_LDT too big": (MmuextOp(MmuextCmd.SET_LDT, SCRATCH_VA, 8193), EINVAL),
            "SET_LDT in Xen": (MmuextOp(MmuextCmd.SET_LDT, HYPERVISOR_VIRT_START, 1), EINVAL),
        }
        op, rc = ops[case]
        self.refused(rc, lambda: self.ext(dom, [op]).rc, case)

    @rule(d=st.integers(0, 1), cmd=st.sampled_from((MmuextCmd.TLB_FLUSH_MULTI, MmuextCmd.INVLPG_MULTI)),
          mask=st.sampled_from((UNMAPPED_VA, HYPERVISOR_VIRT_START, NOWHERE_VA, 1 << 47)))
    def unreadable_vcpu_mask(self, d: int, cmd: MmuextCmd, mask: int) -> None:
        """A vCPU bitmap Xen cannot read: -EINVAL."""
        dom = self.run(d)
        self.refused(EINVAL, lambda: self.ext1(dom, cmd, SCRATCH_VA, mask), f"{cmd.name} with bitmap at {mask:#x}")

    @rule(d=st.integers(0, 1), slot=st.sampled_from(RAW_SLOTS), mask=st.sampled_from((UNMAPPED_VA, NOWHERE_VA)))
    def update_va_mapping_with_unreadable_mask(self, d: int, slot: int, mask: int) -> None:
        """update_va_mapping does the update, then finds the bitmap unreadable:
        -EFAULT with the entry changed and nothing flushed (the guest must flush)."""
        dom = self.run(d)
        gfn = dom.data_pages()[slot - 1]
        value = dom.entry(gfn, LEAF)
        va = SCRATCH_VA + slot * PAGE_SIZE
        rc = update_va_mapping(dom.vcpu, va, value, int(Uvmf.INVLPG) | mask)
        assert rc == EFAULT, errno_name(rc)
        assert self.machine.mem.read_u64(dom.maddr(dom.scratch(S_L1), slot)) == adjust_guest_l1e(value)
        dom.raw[slot] = (gfn, False)
        assert self.ext1(dom, MmuextCmd.INVLPG_LOCAL, va) == 0

    @rule(d=st.integers(0, 1), case=st.sampled_from(("unmapped va", "xen va", "foreign frame", "page table RW",
                                                     "bad flags", "otherdomain", "unknown domain")),
          slot=st.sampled_from(RAW_SLOTS), frame=st.integers(0, 10_000))
    def hostile_update_va_mapping(self, d: int, case: str, slot: int, frame: int) -> None:
        dom = self.run(d)
        va = SCRATCH_VA + slot * PAGE_SIZE
        good = dom.entry(dom.data_pages()[0], LEAF)
        other = self.doms[1 - d]
        flags = int(Uvmf.INVLPG | Uvmf.LOCAL)
        if case == "unmapped va":
            call, rc = (lambda: update_va_mapping(dom.vcpu, NOWHERE_VA, good, flags)), EINVAL
        elif case == "xen va":
            call, rc = (lambda: update_va_mapping(dom.vcpu, HYPERVISOR_VIRT_START, good, flags)), EINVAL
        elif case == "foreign frame":
            mfn = pick(sorted(self.machine.frames_of(other.domain.domid)), frame)
            call, rc = (lambda: update_va_mapping(dom.vcpu, va, (mfn << PAGE_SHIFT) | LEAF, flags)), EBUSY
        elif case == "page table RW":
            victim = dom.entry(GFN(pick(dom.all_tables(), frame)), LEAF | int(PteFlag.RW))
            call, rc = (lambda: update_va_mapping(dom.vcpu, va, victim, flags)), EBUSY
        elif case == "bad flags":
            call, rc = (lambda: update_va_mapping(dom.vcpu, va, good | int(PteFlag.PCD), flags)), EINVAL
        elif case == "otherdomain":
            call, rc = (lambda: update_va_mapping_otherdomain(dom.vcpu, va, good, flags, int(other.domain.domid))), EPERM
        else:
            call, rc = (lambda: update_va_mapping_otherdomain(dom.vcpu, va, good, flags, 99)), ESRCH
        self.refused(rc, call, f"update_va_mapping: {case}")

    @rule(d=st.integers(0, 1), case=st.sampled_from(("pin twice", "pin L1 as L2", "pin root as L1", "unpin unpinned",
                                                     "pin foreign", "unpin foreign", "pin writable data")),
          which=st.integers(0, 1000))
    def bad_pin(self, d: int, case: str, which: int) -> None:
        dom = self.run(d)
        other = self.doms[1 - d]
        if case == "pin writable data" and not dom.writable_data():
            return
        ops = {
            "pin writable data": MmuextOp(MmuextCmd.PIN_L1_TABLE, pick(dom.writable_data() or [0], which)),
            "pin twice": MmuextOp(MmuextCmd.PIN_L4_TABLE, dom.mfn(dom.current_root())),
            "pin L1 as L2": MmuextOp(MmuextCmd.PIN_L2_TABLE, dom.mfn(GFN(pick(dom.tables(Level.L1), which)))),
            "pin root as L1": MmuextOp(MmuextCmd.PIN_L1_TABLE, dom.mfn(dom.current_root())),
            "unpin unpinned": MmuextOp(MmuextCmd.UNPIN_TABLE, dom.mfn(GFN(pick(dom.tables(Level.L1), which)))),
            "pin foreign": MmuextOp(MmuextCmd.PIN_L4_TABLE, other.mfn(other.current_root())),
            "unpin foreign": MmuextOp(MmuextCmd.UNPIN_TABLE, other.mfn(other.current_root())),
        }
        self.refused(EINVAL, lambda: self.ext(dom, [ops[case]]).rc, case)

    @rule(d=st.integers(0, 1), case=st.sampled_from(("foreign root", "L1 table", "writable data", "xen frame",
                                                     "foreigndom other", "foreigndom self id", "foreigndom unknown")),
          which=st.integers(0, 1000))
    def bad_base_pointer(self, d: int, case: str, which: int) -> None:
        """NEW_BASEPTR: only the caller's own L4 (-EINVAL otherwise); only for itself
        (a foreign data owner: -EPERM; naming itself by id or an unknown domain: -ESRCH)."""
        dom = self.run(d)
        other = self.doms[1 - d]
        own_root = dom.mfn(dom.current_root())
        if case == "writable data" and not dom.writable_data():
            return
        args = {
            "foreign root": (other.mfn(other.current_root()), DOMID_SELF, EINVAL),
            "L1 table": (dom.mfn(GFN(pick(dom.tables(Level.L1), which))), DOMID_SELF, EINVAL),
            "writable data": (pick(dom.writable_data() or [0], which), DOMID_SELF, EINVAL),
            "xen frame": (1 + which % 255, DOMID_SELF, EINVAL),
            "foreigndom other": (own_root, int(other.domain.domid), EPERM),
            "foreigndom self id": (own_root, int(dom.domain.domid), ESRCH),
            "foreigndom unknown": (own_root, 99, ESRCH),
        }
        mfn, foreigndom, rc = args[case]
        self.refused(rc, lambda: self.ext1(dom, MmuextCmd.NEW_BASEPTR, mfn, 0, foreigndom), f"NEW_BASEPTR: {case}")

    @rule(d=st.integers(0, 1), case=st.sampled_from(("clear a table", "copy into a table", "copy from foreign")),
          which=st.integers(0, 1000))
    def bad_page_copy(self, d: int, case: str, which: int) -> None:
        dom = self.run(d)
        other = self.doms[1 - d]
        table = dom.mfn(GFN(pick(dom.all_tables(), which)))
        data = dom.mfn(dom.data_pages()[0])
        op = {
            "clear a table": MmuextOp(MmuextCmd.CLEAR_PAGE, table),
            "copy into a table": MmuextOp(MmuextCmd.COPY_PAGE, table, data),
            "copy from foreign": MmuextOp(MmuextCmd.COPY_PAGE, data, other.mfn(other.current_root())),
        }[case]
        self.refused(EINVAL, lambda: self.ext(dom, [op]).rc, case)

    @rule(d=st.integers(0, 1), before=st.integers(0, 2), slot=st.sampled_from(RAW_SLOTS), frame=st.integers(0, 10_000))
    def partial_batch(self, d: int, before: int, slot: int, frame: int) -> None:
        """A batch stops at its first bad request: the ones before it are done (and
        counted in ``done``), the bad one and everything after are not."""
        dom = self.run(d)
        other = self.doms[1 - d]
        slots = [s for s in RAW_SLOTS if s != slot][: before + 1]
        good = [MmuUpdate.pt_update(dom.maddr(dom.scratch(S_L1), s), dom.entry(dom.data_pages()[s - 1], LEAF))
                for s in slots]
        foreign = pick(sorted(self.machine.frames_of(other.domain.domid)), frame)
        bad = MmuUpdate.pt_update(dom.maddr(dom.scratch(S_L1), slot), (foreign << PAGE_SHIFT) | LEAF)
        old_bad = self.machine.mem.read_u64(bad.maddr)
        old_last = self.machine.mem.read_u64(good[-1].maddr)
        result = self.update(dom, good[:before] + [bad, good[-1]])
        assert result == BatchResult(EBUSY, before), result
        assert self.machine.mem.read_u64(bad.maddr) == old_bad
        assert self.machine.mem.read_u64(good[-1].maddr) == old_last, "a request after the failing one ran"
        for req in good[:before]:
            assert self.machine.mem.read_u64(req.maddr) == adjust_guest_l1e(req.val), "a request before the failing one did not run"
        for s in slots[:before]:
            dom.raw[s] = (dom.data_pages()[s - 1], False)
            assert self.ext1(dom, MmuextCmd.INVLPG_LOCAL, SCRATCH_VA + s * PAGE_SIZE) == 0

    @rule(d=st.integers(0, 1), slot=st.sampled_from(RAW_SLOTS))
    def count_beyond_the_array(self, d: int, slot: int) -> None:
        """``count`` larger than the guest's array: the missing request faults (-EFAULT)
        after the ones that exist are done."""
        dom = self.run(d)
        req = MmuUpdate.pt_update(dom.maddr(dom.scratch(S_L1), slot), dom.entry(dom.data_pages()[slot - 1], LEAF))
        assert do_mmu_update(dom.vcpu, [req], 2) == BatchResult(EFAULT, 1)
        dom.raw[slot] = (dom.data_pages()[slot - 1], False)
        assert self.ext1(dom, MmuextCmd.INVLPG_LOCAL, SCRATCH_VA + slot * PAGE_SIZE) == 0

    @rule(d=st.integers(0, 1))
    def hostile_multicall(self, d: int) -> None:
        """A multicall runs every entry whatever the others return: a nested multicall
        is -EINVAL, an unknown hypercall -ENOSYS, the valid flush still runs."""
        dom = self.run(d)
        entries = [
            MulticallEntry(Hypercall.MULTICALL, args=((), 0)),
            MulticallEntry(999),
            MulticallEntry(Hypercall.MMUEXT_OP, args=((MmuextOp(MmuextCmd.TLB_FLUSH_LOCAL),), 1, 0, DOMID_SELF)),
        ]
        before = self.snapshot()
        flushes = self.machine.counters[Event.TLB_FLUSH_GLOBAL]
        out = multicall(dom.vcpu, entries)
        assert out.rc == 0 and [e.result for e in out.entries] == [EINVAL, ENOSYS, 0], out
        assert self.machine.counters[Event.TLB_FLUSH_GLOBAL] == flushes + 1
        assert self.snapshot() == before

    # ==== after every step ===============================================================================
    @invariant()
    def page_tables_intact_and_isolated(self) -> None:
        """Memory isolation, hypervisor integrity and PV page-table integrity
        (:func:`refmodel.hv.invariants.all_violations`) over both domains."""
        if not self.doms:
            return
        running = self.doms[self.sched.current].backend if self.sched.current is not None else None
        problems = all_violations(self.machine, [dom.backend for dom in self.doms], running)
        assert not problems, "; ".join(problems[:6])

    @invariant()
    def kernels_see_what_native_gives(self) -> None:
        for dom in self.doms:
            mine, native = record_of(dom.kernel), record_of(dom.twin)
            assert mine.observations == native.observations, f"domain {dom.domain.domid}: observations differ from native"
            assert mine.page_tables == as_stored_by(native.page_tables, dom.backend), f"domain {dom.domain.domid}: page tables differ from native"

    @invariant()
    def registers_are_the_running_vcpus(self) -> None:
        """Register confidentiality: the register file holds the running vCPU's own
        registers — what it set, and the paging registers it left with."""
        if not self.doms or self.sched.current is None:
            return
        problems = register_confidentiality(self.sched.regs, self.expected[self.sched.current])
        assert not problems, f"vCPU {self.sched.current}: " + "; ".join(problems)


TestPvSequences = PvMachine.TestCase
TestPvSequences.settings = machine_settings(examples=70, steps=50)
