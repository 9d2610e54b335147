"""Shared set-up for the PV tests (no tests here).

:class:`PvWorld` is one machine with a PV domain (and optionally a second one) and
the domain's vCPU as Xen sees it; its methods issue single hypercalls the way a
guest would, by guest frame number, so a test reads like the hypercall sequence it
checks. :meth:`PvWorld.snapshot` captures everything a refused request must leave
alone: every frame's type state and the contents of the domains' frames.
"""

from dataclasses import dataclass

from refmodel.arch.pte import Level, PteFlag, table_index
from refmodel.arch.types import ENTRY_SIZE, GFN, MFN, PAGE_SHIFT
from refmodel.hv.machine import Domain, Machine
from refmodel.hv.pv import (
    BatchResult,
    FrameTable,
    MmuCmd,
    MmuextCmd,
    MmuextOp,
    MmuUpdate,
    PageState,
    PvVcpu,
    frame_table_of,
)
from refmodel.hv.pv.adjust import adjust_guest_entry
from refmodel.hv.pv.hypercall import mmu_update, mmuext_op
from refmodel.hv.pv.pagetype import guest_slots, read_entry
from refmodel.hv.pv.pteflags import entry_mfn

TABLE = int(PteFlag.P | PteFlag.RW | PteFlag.US)  #: an intermediate entry
USER_RW = int(PteFlag.P | PteFlag.RW | PteFlag.US)
USER_RO = int(PteFlag.P | PteFlag.US)
PAGE = 1 << PAGE_SHIFT

#: The guest frames of the standard tree :meth:`PvWorld.build_tree` builds.
L4, L3, L2, L1 = GFN(1), GFN(2), GFN(3), GFN(4)
#: First data frame; frames 10.. are data pages.
DATA = 10


@dataclass(frozen=True)
class Snapshot:
    """Type state of the frames whose type is in use, and memory."""

    types: dict[int, PageState]
    memory: dict[int, bytes]


class PvWorld:
    """A machine, a PV domain 1 (64 frames), a second domain 2, and domain 1's vCPU."""

    def __init__(self, nr_pages: int = 64, privileged: bool = False) -> None:
        self.machine = Machine(nr_frames=4096, hypervisor_frames=256)
        self.dom = self.machine.create_domain(1, nr_pages, privileged=privileged)
        self.other = self.machine.create_domain(2, 16)
        self.vcpu = PvVcpu(self.machine, self.dom, vpid=2)
        self.ft: FrameTable = frame_table_of(self.machine)

    # -- frames and entries -----------------------------------------------------------------
    def mfn(self, gfn: int, dom: Domain | None = None) -> MFN:
        mfn = (dom or self.dom).mfn_of(gfn)
        assert mfn is not None
        return mfn

    def maddr(self, table: int, slot: int) -> int:
        return (self.mfn(table) << PAGE_SHIFT) + slot * ENTRY_SIZE

    def entry(self, gfn: int, flags: int, dom: Domain | None = None) -> int:
        return (self.mfn(gfn, dom) << PAGE_SHIFT) | flags

    def stored(self, gfn: int, flags: int, level: Level = Level.L1, dom: Domain | None = None) -> int:
        """The entry Xen leaves after storing ``entry(gfn, flags)`` in a table of
        ``level`` (``adjust_guest_lNe``, refmodel/hv/pv/adjust.py)."""
        return adjust_guest_entry(self.entry(gfn, flags, dom), level)

    def read(self, table: int, slot: int) -> int:
        return self.machine.mem.read_u64(self.maddr(table, slot))

    def state(self, gfn: int) -> PageState:
        return self.ft.state(self.mfn(gfn))

    # -- hypercalls -------------------------------------------------------------------------
    def update(self, table: int, slot: int, value: int, cmd: MmuCmd = MmuCmd.NORMAL_PT_UPDATE) -> int:
        """One mmu_update request; returns Xen's return value."""
        result = mmu_update(self.vcpu, [MmuUpdate.pt_update(self.maddr(table, slot), value, cmd)])
        return result.rc

    def updates(self, reqs: list[tuple[int, int, int]]) -> BatchResult:
        """One mmu_update hypercall carrying ``(table, slot, value)`` requests."""
        return mmu_update(self.vcpu, [MmuUpdate.pt_update(self.maddr(t, s), v) for t, s, v in reqs])

    def ext(self, cmd: MmuextCmd, arg1: int = 0, arg2: int = 0) -> int:
        """One mmuext_op hypercall with one operation; returns Xen's return value."""
        return mmuext_op(self.vcpu, [MmuextOp(cmd, arg1, arg2)]).rc

    def pin(self, gfn: int, level: Level) -> int:
        return self.ext(MmuextCmd(level - 1), self.mfn(gfn))

    # -- a small address space ----------------------------------------------------------------
    def build_tree(self) -> None:
        """Pin an empty L4, link L3, L2 and an L1 for VA 0..2 MiB, and switch to it."""
        assert self.pin(L4, Level.L4) == 0
        assert self.update(L4, 0, self.entry(L3, TABLE)) == 0
        assert self.update(L3, 0, self.entry(L2, TABLE)) == 0
        assert self.update(L2, 0, self.entry(L1, TABLE)) == 0
        assert self.ext(MmuextCmd.NEW_BASEPTR, self.mfn(L4)) == 0

    def map_page(self, va: int, gfn: int, flags: int = USER_RW) -> int:
        """Set the L1 entry for ``va`` (below 2 MiB) to map guest frame ``gfn``."""
        return self.update(L1, table_index(va, Level.L1), self.entry(gfn, flags))

    # -- what a refused request must leave alone --------------------------------------------------
    def snapshot(self) -> Snapshot:
        """Frames whose type is in use (count > 0), and every frame of domain 1. A
        type no longer in use constrains nothing — the next reference may change it —
        so a writable type taken and given back during a refused request (Xen keeps
        ``PGT_writable_page`` at count 0) counts as unchanged."""
        types = {int(m): self.ft.state(m) for m in self.ft.pages}
        memory = {int(m): self.machine.mem.frame_bytes(m) for m in self.machine.frames_of(1)}
        return Snapshot({m: s for m, s in types.items() if s.count or s.pinned}, memory)


# -- audits -----------------------------------------------------------------------------------------
def implied_type_counts(ft: FrameTable, vcpus: list[PvVcpu]) -> dict[int, int]:
    """The type count every frame should have, recomputed from scratch: one per
    reference an entry of a validated page table holds (an RW L1 entry on its target,
    a present L2..L4 entry on a table other than its own), one per pin, one per base
    pointer. An L1 entry mapping I/O memory (a frame that is not RAM) holds none."""
    expected: dict[int, int] = {}

    def add(mfn: int) -> None:
        expected[mfn] = expected.get(mfn, 0) + 1

    for mfn, page in ft.pages.items():
        if page.pinned:
            add(mfn)
        level = page.type.level
        if level is None or not page.validated:
            continue
        for slot in guest_slots(level):
            entry = read_entry(ft, mfn, slot)
            if not entry & PteFlag.P:
                continue
            target = entry_mfn(entry)
            if level is Level.L1:
                if entry & PteFlag.RW and ft.machine.frame_exists(target):
                    add(target)
            elif target != mfn:
                add(target)
    for v in vcpus:
        for base in (v.guest_table, v.guest_table_user):
            if base is not None:
                add(base)
    return expected


def audit(ft: FrameTable, vcpus: list[PvVcpu]) -> list[str]:
    """Problems with the frame table: counts that differ from what the tables imply,
    and TLB entries that would let a guest write one of its page tables."""
    problems = []
    expected = implied_type_counts(ft, vcpus)
    for mfn in sorted(set(expected) | {int(m) for m in ft.pages}):
        have = ft.state(mfn)
        if have.count != expected.get(mfn, 0):
            problems.append(f"mfn {mfn:#x}: type count {have.count}, tables imply {expected.get(mfn, 0)}")
        if have.count and have.type.is_page_table and not have.validated:
            problems.append(f"mfn {mfn:#x}: {have.type.value} in use but not validated")
    tags = {v.vpid for v in vcpus}
    for e in ft.machine.tlb.entries():
        page = ft.state(e.frame >> PAGE_SHIFT)
        if e.vpid in tags and e.rights.writable and page.count and page.type.is_page_table:
            problems.append(f"TLB maps page table mfn {e.frame >> PAGE_SHIFT:#x} writable (vpn {e.vpn:#x})")
    return problems
