"""Shared helpers for the tests of the core (``refmodel.arch``).

A :class:`Machine` is a bare-metal :class:`~refmodel.arch.mmu.Mmu` plus the
:class:`~refmodel.arch.builder.PageTableBuilder` that owns its page tables, with
short methods to reach and edit one paging-structure entry of one linear address.
Tests read like the SDM's prose: "map a page, clear U/S in its PDE, read it from
CPL 3, expect #PF with error code P|U".

Page tables come from frames 0x100 upwards (physical 0x10_0000); the data pages the
tests map live well above that, so a table and a data page never collide.
"""

from dataclasses import dataclass, replace

from refmodel.account.events import Counters, Event
from refmodel.arch.access import Access, AccessKind
from refmodel.arch.builder import PageTableBuilder
from refmodel.arch.control import Cr0, Cr4, Efer, Rflags
from refmodel.arch.fault import GeneralProtection, PageFault, PfErrorCode
from refmodel.arch.mmu import Mmu, Outcome
from refmodel.arch.physmem import PhysicalMemory
from refmodel.arch.pte import Level, PageSize, PteFlag, entry_frame_address, table_index
from refmodel.arch.tlb import Tlb
from refmodel.arch.types import ENTRY_SIZE, PAGE_SHIFT
from refmodel.arch.vcpu import ArchState
from refmodel.arch.walk import Translation

P = PfErrorCode.P
W = PfErrorCode.W
U = PfErrorCode.U
RSVD = PfErrorCode.RSVD
I = PfErrorCode.I  # noqa: E741 - the SDM's name for the I/D flag
NO_BITS = PfErrorCode(0)

#: The four levels, top first, and their SDM entry names for test ids.
LEVELS = (Level.L4, Level.L3, Level.L2, Level.L1)
LEVEL_IDS = [lvl.entry_name for lvl in LEVELS]

#: Default control registers: long mode, paging, CR0.WP = 1, EFER.NXE = 1.
CR0_DEFAULT = int(Cr0.PE | Cr0.PG | Cr0.WP | Cr0.ET | Cr0.NE)
CR4_DEFAULT = int(Cr4.PAE)
EFER_DEFAULT = int(Efer.LME | Efer.LMA | Efer.NXE)
RFLAGS_DEFAULT = int(Rflags.FIXED1)

#: A user-accessible, writable leaf (P is added by the builder).
USER_RW = PteFlag.RW | PteFlag.US
#: A supervisor-only, writable leaf.
SUPER_RW = PteFlag.RW

#: A 4 KiB-aligned linear address whose four table indices are all different
#: (PML4 0x024, PDPT 0x0D1, PD 0x0B3, PT 0x189), so no two levels share an entry slot.
VA = 0x0000_1234_5678_9000
#: A data frame, far from the page tables.
PA = 0x0000_0ABC_D000


def read(cpl: int = 0, implicit: bool = False) -> Access:
    return Access(AccessKind.READ, cpl, implicit)


def write(cpl: int = 0, implicit: bool = False) -> Access:
    return Access(AccessKind.WRITE, cpl, implicit)


def fetch(cpl: int = 0) -> Access:
    return Access(AccessKind.FETCH, cpl)


def as_fault(outcome: Outcome) -> PageFault:
    """The outcome, which must be a #PF."""
    assert isinstance(outcome, PageFault), f"expected #PF, got {outcome!r}"
    return outcome


def as_translation(outcome: Outcome) -> Translation:
    """The outcome, which must be a successful translation."""
    assert isinstance(outcome, Translation), f"expected a translation, got {outcome!r}"
    return outcome


def as_gp(outcome: Outcome) -> GeneralProtection:
    assert isinstance(outcome, GeneralProtection), f"expected #GP, got {outcome!r}"
    return outcome


@dataclass
class Machine:
    """An MMU and the page-table builder of its (single) address space."""

    mmu: Mmu
    pt: PageTableBuilder

    @property
    def mem(self) -> PhysicalMemory:
        return self.mmu.mem

    @property
    def counters(self) -> Counters:
        return self.mmu.counters

    @property
    def tlb(self) -> Tlb:
        return self.mmu.tlb

    def count(self, event: Event) -> int:
        return self.mmu.counters[event]

    # -- page tables ---------------------------------------------------------------
    def map(self, va: int = VA, pa: int = PA, flags: PteFlag | int = USER_RW,
            size: PageSize = PageSize.SIZE_4K) -> int:
        """Map one page (P is added); returns the leaf entry's physical address."""
        return self.pt.map(va, pa, flags, size)

    def addr(self, va: int, level: Level) -> int:
        """Physical address of the entry for ``va`` at ``level`` in the tables already
        built. Unlike the builder it never creates a table, and it follows an entry's
        address field even when a test has cleared its P flag."""
        table = self.pt.root << PAGE_SHIFT
        for lvl in LEVELS:
            addr = table + table_index(va, lvl) * ENTRY_SIZE
            if lvl is level:
                return addr
            entry = self.mem.read_u64(addr)
            table = entry_frame_address(entry, self.mem.maxphyaddr)
            if table == 0:
                raise AssertionError(f"{va:#x}: no {lvl.entry_name} table below this level")
        raise AssertionError("unreachable")

    def entry(self, va: int, level: Level) -> int:
        return self.mem.read_u64(self.addr(va, level))

    def set_entry(self, va: int, level: Level, value: int) -> None:
        self.mem.write_u64(self.addr(va, level), value)

    def set_bits(self, va: int, level: Level, bits: PteFlag | int) -> None:
        self.set_entry(va, level, self.entry(va, level) | int(bits))

    def clear_bits(self, va: int, level: Level, bits: PteFlag | int) -> None:
        self.set_entry(va, level, self.entry(va, level) & ~int(bits))

    def has(self, va: int, level: Level, flag: PteFlag) -> bool:
        return bool(self.entry(va, level) & flag)

    # -- registers (set directly, bypassing the MOV-to-CR rules and TLB effects) ----
    def set_regs(self, *, cr0: int | None = None, cr4: int | None = None,
                 efer: int | None = None, rflags: int | None = None, cpl: int | None = None) -> None:
        s = self.mmu.state
        self.mmu.state = replace(
            s,
            cr0=s.cr0 if cr0 is None else cr0,
            cr4=s.cr4 if cr4 is None else cr4,
            efer=s.efer if efer is None else efer,
            rflags=s.rflags if rflags is None else rflags,
            cpl=s.cpl if cpl is None else cpl,
        )

    # -- accesses ------------------------------------------------------------------
    def access(self, va: int, access: Access) -> Outcome:
        return self.mmu.translate(va, access)

    def pa_of(self, va: int, access: Access | None = None) -> int:
        """The physical address ``va`` translates to (the access must succeed)."""
        return as_translation(self.mmu.translate(va, access or read())).pa

    def fault(self, va: int, access: Access) -> PageFault:
        """The #PF ``access`` to ``va`` must raise."""
        return as_fault(self.mmu.translate(va, access))


def machine(
    *,
    cr0: int = CR0_DEFAULT,
    cr4: int = CR4_DEFAULT,
    efer: int = EFER_DEFAULT,
    rflags: int = RFLAGS_DEFAULT,
    cr3_low: int = 0,
    maxphyaddr: int = 46,
    page1gb: bool = True,
    tlb: Tlb | None = None,
    mem: PhysicalMemory | None = None,
    vpid: int = 0,
    table_frames: range = range(0x100, 0x200),
) -> Machine:
    """A fresh machine in 64-bit mode with an empty PML4 loaded in CR3.

    ``cr3_low`` goes into CR3[11:0] (a PCID when CR4.PCIDE = 1).
    """
    mem = mem if mem is not None else PhysicalMemory(maxphyaddr)
    pt = PageTableBuilder(mem, iter(table_frames))
    counters = tlb.counters if tlb is not None else Counters()
    state = ArchState(cr0=cr0, cr3=pt.cr3 | cr3_low, cr4=cr4, efer=efer, rflags=rflags)
    mmu = Mmu(mem=mem, state=state, tlb=tlb, counters=counters, vpid=vpid, page1gb=page1gb)
    return Machine(mmu, pt)
