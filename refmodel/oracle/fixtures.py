"""The conformance suite: generated traces, each named for what it tests, with the
model's expected observations.

``refmodel fixtures --out DIR`` writes one ``<name>.jsonl`` per fixture (a name like
``core/pf/not-present/pde`` becomes ``DIR/core/pf/not-present/pde.jsonl``) and
``DIR/index.json`` listing them. Output is deterministic: regenerating gives
byte-identical files.

An implementation runs each fixture's operations from its initial state and compares
what it sees with each line's ``obs`` (fields it does not model, e.g. counters, it
ignores). Where the TLB rules allow more than one outcome, the line also lists every
allowed observation in ``allowed``; ``refmodel check`` handles those exactly (it
follows each possibility), a literal comparison should accept any of them.

The core fixtures use MAXPHYADDR 40 and leave PML4 slot 511 unused, so that most of
them also run on QEMU's MMU through :mod:`refmodel.oracle.unicorn_record`.

Layout of every core fixture (physical addresses): page tables from 0x100000 up,
data frames at :data:`DATA_PA` and above, a 2 MiB page at :data:`BIG_PA`, a 1 GiB
page at :data:`HUGE_PA`. Fixtures that show Accessed/Dirty flags map the first
GiB of physical memory read-only at :data:`WINDOW_VA` (one 1 GiB page), so a read
of ``WINDOW_VA + pa`` loads the entry at ``pa`` — what a kernel does to look at its
own page tables.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from ..arch.builder import PageTableBuilder
from ..arch.control import CR3_NOFLUSH, Cr0, Cr4, Efer, Rflags
from ..arch.physmem import PhysicalMemory
from ..arch.pte import Level, PageSize, PteFlag, entry_frame_address, table_index
from ..arch.types import ENTRY_SIZE, PAGE_SHIFT
from ..arch.vcpu import ArchState
from ..hv.machine import Machine
from ..errors import RefmodelError
from ..guest.ops import Mode
from .check import check
from .replay import annotate
from .trace import (
    TRACE_VERSION,
    DomainInit,
    Fetch,
    Header,
    MachineInit,
    MmuextEntry,
    MmuextOp,
    MmuUpdate,
    MmuUpdateReq,
    Multicall,
    Invlpg,
    Invpcid,
    Op,
    PhysWrite,
    PteWrite,
    Read,
    Register,
    RegWrite,
    Step,
    Switch,
    Trace,
    UpdateVaMapping,
    VcpuInit,
    Write,
    dump_trace,
    generator,
)

#: Core fixtures' physical-address width: unicorn's (QEMU's default phys-bits).
CORE_MAXPHYADDR = 40
#: First page-table frame.
TABLE_FRAME = 0x100
#: A user linear address whose four table indices differ (PML4 0x024, PDPT 0x0D1,
#: PD 0x0B3, PT 0x189): a walk that uses the wrong index reads a zero entry.
DATA_VA = 0x0000_1234_5678_9000
#: A second page in the same page table, and one in another PML4 slot.
NEXT_VA = DATA_VA + 0x1000
OTHER_VA = 0x0000_2468_ACE0_2000
#: Data frames.
DATA_PA = 0x20_0000
OTHER_PA = 0x30_0000
#: A 2 MiB and a 1 GiB page, and the linear addresses they are mapped at.
BIG_PA = 0x60_0000
BIG_VA = 0x0000_3456_7880_0000
HUGE_PA = 0x4000_0000
HUGE_VA = 0x0000_5678_4000_0000
#: Physical memory 0 .. 1 GiB, read-only, supervisor, at this address (PML4 slot 256).
WINDOW_VA = 0xFFFF_8000_0000_0000
#: Non-canonical addresses: just above the lower half, just below the upper half.
NONCANONICAL_LOW = 0x0000_8000_0000_0000
NONCANONICAL_HIGH = 0xFFFF_7FFF_FFFF_F000

CR0 = int(Cr0.PE | Cr0.PG | Cr0.WP | Cr0.ET | Cr0.NE)
CR4 = int(Cr4.PAE)
EFER = int(Efer.LME | Efer.LMA | Efer.NXE)
RFLAGS = int(Rflags.FIXED1)

URW = PteFlag.RW | PteFlag.US
LEVELS = (Level.L4, Level.L3, Level.L2, Level.L1)
NAME_OF_LEVEL = {Level.L4: "pml4e", Level.L3: "pdpte", Level.L2: "pde", Level.L1: "pte"}


def data_word(pa: int) -> int:
    """The distinctive qword the fixtures store at the start of a data frame (its low
    byte, 0xC3, is what a fetch there reads)."""
    return 0xD47A_0000_0000_0000 | pa | 0xC3


class Scenario:
    """Builds one fixture: an address space in physical memory, the registers, and
    the operations, written the way the SDM describes them."""

    def __init__(
        self,
        name: str,
        description: str,
        *,
        cr0: int = CR0,
        cr4: int = CR4,
        efer: int = EFER,
        rflags: int = RFLAGS,
        cpl: int = 0,
        maxphyaddr: int = CORE_MAXPHYADDR,
        page1gb: bool = True,
        pcid: int = 0,
    ) -> None:
        self.name = name
        self.description = description
        self.mem = PhysicalMemory(maxphyaddr)
        self.pt = PageTableBuilder(self.mem, iter(range(TABLE_FRAME, TABLE_FRAME + 0x100)))
        self.regs = ArchState(cr0=cr0, cr4=cr4, efer=efer, rflags=rflags, cpl=cpl, cr3=self.pt.cr3 | pcid)
        self.page1gb = page1gb
        self.steps: list[Step] = []

    # -- the initial address space ------------------------------------------------------
    def map(self, va: int, pa: int, flags: PteFlag | int = URW, size: PageSize = PageSize.SIZE_4K) -> None:
        """Map one page; its first qword holds :func:`data_word` of its address."""
        self.pt.map(va, pa, flags, size)
        self.mem.write_u64(pa, data_word(pa))

    def window(self) -> None:
        """Map physical 0..1 GiB read-only, supervisor, non-executable at WINDOW_VA."""
        self.pt.map(WINDOW_VA, 0, PteFlag.XD, PageSize.SIZE_1G)

    def addr(self, va: int, level: Level) -> int:
        """Physical address of the entry for ``va`` at ``level`` (tables must exist)."""
        table = self.pt.root << PAGE_SHIFT
        for lvl in LEVELS:
            addr = table + table_index(va, lvl) * ENTRY_SIZE
            if lvl is level:
                return addr
            table = entry_frame_address(self.mem.read_u64(addr), self.mem.maxphyaddr)
        raise AssertionError("unreachable")

    def entry(self, va: int, level: Level) -> int:
        return self.mem.read_u64(self.addr(va, level))

    def set_entry(self, va: int, level: Level, value: int) -> None:
        """Change an entry in the initial state (before any operation)."""
        self.mem.write_u64(self.addr(va, level), value)

    def edit(self, va: int, level: Level, set_bits: int = 0, clear_bits: int = 0) -> None:
        self.set_entry(va, level, (self.entry(va, level) & ~clear_bits) | set_bits)

    # -- operations ---------------------------------------------------------------------
    def op(self, op: Op, note: str = "") -> None:
        self.steps.append(Step(op, note=note))

    def read(self, va: int, cpl: int | None = None, size: int = 8, note: str = "", implicit: bool = False) -> None:
        self.op(Read(va, size, cpl, implicit), note)

    def write(self, va: int, value: int, cpl: int | None = None, size: int = 8, note: str = "", implicit: bool = False) -> None:
        self.op(Write(va, value, size, cpl, implicit), note)

    def fetch(self, va: int, cpl: int | None = None, note: str = "") -> None:
        self.op(Fetch(va, cpl), note)

    def pte(self, va: int, level: Level, value: int, note: str = "") -> None:
        """Software rewrites the entry for ``va`` at ``level`` (no invalidation)."""
        addr = self.addr(va, level)
        self.op(PteWrite(addr >> PAGE_SHIFT, (addr & 0xFFF) // ENTRY_SIZE, value, int(level)), note)

    def pte_edit(self, va: int, level: Level, set_bits: int = 0, clear_bits: int = 0, note: str = "") -> None:
        """Rewrite an entry relative to its *initial* value (clear, then set)."""
        self.pte(va, level, (self.entry(va, level) & ~clear_bits) | set_bits, note)

    def read_entry(self, va: int, level: Level, note: str = "") -> None:
        """Load the entry for ``va`` at ``level`` through the window (A/D visible)."""
        self.read(WINDOW_VA + self.addr(va, level), cpl=0, note=note or f"{level.entry_name} of {va:#x}")

    def reg(self, reg: Register, value: int, note: str = "") -> None:
        self.op(RegWrite(reg, value), note)

    def invlpg(self, va: int, note: str = "") -> None:
        self.op(Invlpg(va), note)

    def invpcid(self, kind: int, pcid: int, va: int = 0, note: str = "") -> None:
        self.op(Invpcid(kind, pcid, va), note)

    def phys_write(self, pa: int, value: int, size: int = 8, note: str = "") -> None:
        self.op(PhysWrite(pa, value, size), note)

    # -- the trace ----------------------------------------------------------------------
    def header(self) -> Header:
        memory = tuple((f, self.mem.frame_bytes(f)) for f in self.mem.populated_frames() if any(self.mem.frame_bytes(f)))
        return Header(
            mode=Mode.NATIVE, maxphyaddr=self.mem.maxphyaddr, memory=memory, vcpus=(VcpuInit.of(self.regs),),
            name=self.name, description=self.description, page1gb=self.page1gb,
        )

    def trace(self) -> Trace:
        return Trace(self.header(), tuple(self.steps))


# ---------------------------------------------------------------------------------
# The catalogue
# ---------------------------------------------------------------------------------

Make = Callable[[], Scenario]
#: Every fixture's maker, in the order written; a family yields several scenarios.
CATALOGUE: list[Callable[[], Iterable[Scenario | HvScenario]]] = []
AnyMake = Callable[[], "Scenario | HvScenario"]


def fixture(make: AnyMake) -> AnyMake:
    CATALOGUE.append(lambda: [make()])
    return make


def fixture_family(makes: Callable[[], Iterator[Scenario | HvScenario]]) -> None:
    CATALOGUE.append(makes)


def basic(name: str, description: str, **regs: int) -> Scenario:
    """A scenario with DATA_VA mapped user-writable to DATA_PA."""
    s = Scenario(name, description, **regs)  # type: ignore[arg-type]
    s.map(DATA_VA, DATA_PA)
    return s


# -- accesses -------------------------------------------------------------------------


@fixture
def access_read_write_fetch() -> Scenario:
    s = basic("core/access/read-write-fetch", "Loads, stores and fetches through a user, writable, executable 4 KiB page at CPL 0 and 3 (SDM 4.5, 4.6).")
    s.read(DATA_VA + 8, cpl=3, note="user read of a user page")
    s.read(DATA_VA, cpl=0, note="supervisor read of a user page (no SMAP)")
    s.write(DATA_VA + 0x10, 0x1122_3344_5566_7788, cpl=3)
    s.read(DATA_VA + 0x10, cpl=0, note="the value written")
    s.fetch(DATA_VA, cpl=3, note="XD = 0: fetch allowed")
    s.fetch(DATA_VA, cpl=0, note="supervisor fetch of a user page without SMEP")
    return s


@fixture
def access_sizes() -> Scenario:
    s = basic("core/access/sizes", "1-, 2-, 4- and 8-byte loads and stores, little-endian, at the end of a page.")
    s.write(DATA_VA + 0xFF8, 0x0102_0304_0506_0708, cpl=3)
    for size in (1, 2, 4, 8):
        s.read(DATA_VA + 0x1000 - size, cpl=3, size=size)
    s.write(DATA_VA + 0xFFF, 0xAB, size=1)
    s.write(DATA_VA + 0xFFC, 0xCDEF, size=2)
    s.write(DATA_VA + 0xFF8, 0x1234_5678, size=4)
    s.read(DATA_VA + 0xFF8)
    return s


@fixture
def access_phys_write() -> Scenario:
    s = basic("core/access/phys-write", "Stores to physical memory bypass the MMU; loads through the TLB see them (data is never cached by the TLB).")
    s.read(DATA_VA, cpl=3)
    s.phys_write(DATA_PA, 0xFEED_FACE_CAFE_BEEF)
    s.read(DATA_VA, cpl=3)
    s.phys_write(DATA_PA + 4, 0x77, size=1)
    s.read(DATA_VA, cpl=3)
    return s


# -- not-present faults, per level -------------------------------------------------------


def _not_present() -> Iterator[Scenario]:
    for level in LEVELS:
        s = basic(
            f"core/pf/not-present/{NAME_OF_LEVEL[level]}",
            f"{level.entry_name} with P = 0: #PF with P = 0 in the error code, for reads, writes and fetches at "
            "CPL 0 and 3 (SDM 4.7); once P is set again the access succeeds (no negative caching, SDM 4.10.4.1 "
            "#PF invalidation).",
        )
        s.edit(DATA_VA, level, clear_bits=PteFlag.P)
        s.read(DATA_VA, cpl=3, note="error code U")
        s.write(DATA_VA + 8, 5, cpl=0, note="error code W")
        s.fetch(DATA_VA, cpl=3, note="error code U|I (NXE = 1)")
        s.read(DATA_VA + 0x10, cpl=0, note="error code 0")
        s.pte_edit(DATA_VA, level, set_bits=PteFlag.P, note="make it present")
        s.read(DATA_VA, cpl=3, note="now translates")
        yield s


fixture_family(_not_present)


# -- reserved bits -------------------------------------------------------------------------


def _rsvd_maxphyaddr() -> Iterator[Scenario]:
    for level in LEVELS:
        s = basic(
            f"core/pf/rsvd/above-maxphyaddr/{NAME_OF_LEVEL[level]}",
            f"Bit 40 (>= MAXPHYADDR = 40) set in the {level.entry_name}: #PF with P|RSVD (SDM 4.5 Table 4-14 ff., 4.7).",
        )
        s.edit(DATA_VA, level, set_bits=1 << 40)
        s.read(DATA_VA, cpl=3, note="P|U|RSVD")
        s.write(DATA_VA, 1, cpl=0, note="P|W|RSVD")
        s.fetch(DATA_VA, cpl=0, note="P|RSVD|I")
        yield s


fixture_family(_rsvd_maxphyaddr)


def _rsvd_xd() -> Iterator[Scenario]:
    for level in (Level.L4, Level.L1):
        s = basic(
            f"core/pf/rsvd/xd-without-nxe/{NAME_OF_LEVEL[level]}",
            f"XD (bit 63) set in the {level.entry_name} while IA32_EFER.NXE = 0 is a reserved bit (SDM 4.5); "
            "the I/D flag is not reported without NXE or SMEP (SDM 4.7).",
            efer=int(Efer.LME | Efer.LMA),
        )
        s.edit(DATA_VA, level, set_bits=PteFlag.XD)
        s.read(DATA_VA, cpl=3)
        s.fetch(DATA_VA, cpl=3, note="no I flag: NXE = 0 and SMEP = 0")
        yield s


fixture_family(_rsvd_xd)


@fixture
def rsvd_ps_in_pml4e() -> Scenario:
    s = basic("core/pf/rsvd/ps-in-pml4e", "Bit 7 (PS) of a PML4E is reserved (SDM 4.5 Table 4-15).")
    s.edit(DATA_VA, Level.L4, set_bits=PteFlag.PS)
    s.read(DATA_VA, cpl=0)
    return s


@fixture
def rsvd_1g_unsupported() -> Scenario:
    s = Scenario("core/pf/rsvd/pdpte-ps-without-page1gb", "Without 1 GiB-page support (CPUID.80000001H:EDX.Page1GB = 0) PS in a PDPTE is reserved (SDM 4.5).", page1gb=False)
    s.map(HUGE_VA, HUGE_PA, URW, PageSize.SIZE_1G)
    s.read(HUGE_VA, cpl=3)
    return s


@fixture
def rsvd_2m_unaligned() -> Scenario:
    s = Scenario("core/pf/rsvd/2m-base-unaligned", "A 2 MiB PDE with address bit 13 set: bits 20:13 are reserved (SDM 4.5 Table 4-18); bit 12 is PAT and allowed.")
    s.map(BIG_VA, BIG_PA, URW, PageSize.SIZE_2M)
    s.read(BIG_VA, cpl=3, note="aligned: fine")
    s.pte_edit(BIG_VA, Level.L2, set_bits=PteFlag.PAT_LARGE, note="PAT bit 12: still fine")
    s.invlpg(BIG_VA)
    s.read(BIG_VA + 0x1234, cpl=3)
    s.pte_edit(BIG_VA, Level.L2, set_bits=1 << 13, note="bit 13: reserved")
    s.invlpg(BIG_VA)
    s.read(BIG_VA + 0x1234, cpl=3)
    return s


@fixture
def rsvd_1g_unaligned() -> Scenario:
    s = Scenario("core/pf/rsvd/1g-base-unaligned", "A 1 GiB PDPTE with address bit 20 set: bits 29:13 are reserved (SDM 4.5 Table 4-16).")
    s.map(HUGE_VA, HUGE_PA, URW, PageSize.SIZE_1G)
    s.edit(HUGE_VA, Level.L3, set_bits=1 << 20)
    s.read(HUGE_VA + 0x2000, cpl=3)
    s.write(HUGE_VA, 1, cpl=3)
    return s


@fixture
def rsvd_before_rights() -> Scenario:
    s = basic("core/pf/rsvd/before-rights", "A reserved bit faults with RSVD even where the rights would also refuse the access (SDM 4.7: the walk stops at the entry).")
    s.edit(DATA_VA, Level.L1, set_bits=1 << 45, clear_bits=PteFlag.RW | PteFlag.US)
    s.write(DATA_VA, 1, cpl=3, note="P|W|U|RSVD")
    return s


# -- write protection ----------------------------------------------------------------------


@fixture
def wp_supervisor_wp1() -> Scenario:
    s = basic("core/pf/wp/supervisor-write-wp1", "CR0.WP = 1: a supervisor write to a read-only page faults with P|W (SDM 4.6.1).")
    s.edit(DATA_VA, Level.L1, clear_bits=PteFlag.RW)
    s.write(DATA_VA, 1, cpl=0)
    s.read(DATA_VA, cpl=0, note="reads are fine")
    return s


@fixture
def wp_supervisor_wp0() -> Scenario:
    s = basic("core/pf/wp/supervisor-write-wp0", "CR0.WP = 0: a supervisor write to a read-only page succeeds; a user write still faults (SDM 4.6.1).", cr0=CR0 & ~Cr0.WP)
    s.edit(DATA_VA, Level.L1, clear_bits=PteFlag.RW)
    s.write(DATA_VA, 0x5A5A, cpl=0)
    s.read(DATA_VA, cpl=0)
    s.write(DATA_VA, 1, cpl=3, note="P|W|U whatever WP")
    return s


def _wp_upper() -> Iterator[Scenario]:
    for level in (Level.L4, Level.L3, Level.L2):
        s = basic(f"core/pf/wp/readonly-{NAME_OF_LEVEL[level]}", f"R/W = 0 in the {level.entry_name} makes the whole range read-only (SDM 4.6.1: rights combine over every level).")
        s.edit(DATA_VA, level, clear_bits=PteFlag.RW)
        s.write(DATA_VA, 1, cpl=3)
        s.write(DATA_VA, 1, cpl=0)
        s.read(DATA_VA, cpl=3)
        yield s


fixture_family(_wp_upper)


@fixture
def wp_toggle() -> Scenario:
    s = basic("core/pf/wp/toggle", "MOV to CR0 changing WP takes effect at once; the TLB caches rights, not decisions (SDM 4.10.2.2).")
    s.edit(DATA_VA, Level.L1, clear_bits=PteFlag.RW)
    s.write(DATA_VA, 1, cpl=0, note="faults, and the #PF invalidates the page")
    s.read(DATA_VA, cpl=0, note="caches a read-only translation")
    s.reg(Register.CR0, CR0 & ~Cr0.WP, note="clear WP")
    s.write(DATA_VA, 0x77, cpl=0, note="allowed now")
    s.reg(Register.CR0, CR0, note="set WP")
    s.write(DATA_VA, 0x88, cpl=0, note="faults again")
    s.read(DATA_VA, cpl=0)
    return s


# -- user/supervisor -------------------------------------------------------------------------


def _us() -> Iterator[Scenario]:
    for level in LEVELS:
        s = basic(f"core/pf/us/supervisor-{NAME_OF_LEVEL[level]}", f"U/S = 0 in the {level.entry_name}: user accesses fault with P|U, supervisor ones do not (SDM 4.6.1).")
        s.edit(DATA_VA, level, clear_bits=PteFlag.US)
        s.read(DATA_VA, cpl=3)
        s.write(DATA_VA, 1, cpl=3)
        s.fetch(DATA_VA, cpl=3)
        s.read(DATA_VA, cpl=0)
        s.fetch(DATA_VA, cpl=0, note="supervisor fetch of a supervisor page")
        yield s


fixture_family(_us)


# -- execute disable -------------------------------------------------------------------------


def _xd() -> Iterator[Scenario]:
    for level in LEVELS:
        s = basic(f"core/pf/xd/{NAME_OF_LEVEL[level]}", f"XD = 1 in the {level.entry_name} with NXE = 1: fetches fault with P|I, data accesses do not (SDM 4.6.1, 4.7).")
        s.edit(DATA_VA, level, set_bits=PteFlag.XD)
        s.fetch(DATA_VA, cpl=0, note="P|I")
        s.fetch(DATA_VA, cpl=3, note="P|U|I")
        s.read(DATA_VA, cpl=3)
        s.write(DATA_VA, 3, cpl=3)
        yield s


fixture_family(_xd)


@fixture
def xd_nxe_toggle() -> Scenario:
    s = basic("core/pf/xd/nxe-toggle", "WRMSR EFER clearing NXE turns a set XD bit into a reserved bit (SDM 4.5); setting it again makes it an execute-disable bit.")
    s.edit(DATA_VA, Level.L1, set_bits=PteFlag.XD)
    s.fetch(DATA_VA, cpl=0)
    s.op(RegWrite(Register.EFER, int(Efer.LME | Efer.LMA)), note="NXE = 0")
    s.read(DATA_VA, cpl=0, note="P|RSVD")
    s.op(RegWrite(Register.EFER, EFER), note="NXE = 1")
    s.read(DATA_VA, cpl=0)
    s.fetch(DATA_VA, cpl=0)
    return s


# -- SMEP / SMAP -------------------------------------------------------------------------------


@fixture
def smep_fetch() -> Scenario:
    s = basic("core/pf/smep/supervisor-fetch-user-page", "CR4.SMEP = 1: a supervisor fetch from a user page faults with P|I; user fetches and supervisor data accesses are unaffected (SDM 4.6.1).", cr4=CR4 | Cr4.SMEP)
    s.fetch(DATA_VA, cpl=0)
    s.fetch(DATA_VA, cpl=3)
    s.read(DATA_VA, cpl=0)
    s.write(DATA_VA, 9, cpl=0)
    return s


@fixture
def smep_supervisor_page() -> Scenario:
    s = basic("core/pf/smep/supervisor-page", "SMEP only concerns user pages: a supervisor page (U/S = 0 in the PDE) stays executable at CPL 0.", cr4=CR4 | Cr4.SMEP)
    s.edit(DATA_VA, Level.L2, clear_bits=PteFlag.US)
    s.fetch(DATA_VA, cpl=0)
    return s


@fixture
def smep_enable() -> Scenario:
    s = basic("core/pf/smep/enable", "MOV to CR4 setting SMEP applies to the next fetch even if the translation is cached (SDM 4.10.4.1).")
    s.fetch(DATA_VA, cpl=0, note="allowed, cached")
    s.reg(Register.CR4, CR4 | Cr4.SMEP)
    s.fetch(DATA_VA, cpl=0, note="P|I")
    return s


@fixture
def smap_ac0() -> Scenario:
    s = basic("core/pf/smap/ac0", "CR4.SMAP = 1, RFLAGS.AC = 0: supervisor data accesses to a user page fault with P (read) and P|W (write); fetches are not SMAP's business (SDM 4.6.1).", cr4=CR4 | Cr4.SMAP)
    s.read(DATA_VA, cpl=0)
    s.write(DATA_VA, 1, cpl=0)
    s.fetch(DATA_VA, cpl=0)
    s.read(DATA_VA, cpl=3, note="user accesses are unaffected")
    return s


@fixture
def smap_ac1() -> Scenario:
    s = basic("core/pf/smap/ac1", "CR4.SMAP = 1, RFLAGS.AC = 1: explicit supervisor accesses to a user page are allowed (SDM 4.6.1).", cr4=CR4 | Cr4.SMAP, rflags=RFLAGS | Rflags.AC)
    s.read(DATA_VA, cpl=0)
    s.write(DATA_VA, 0x42, cpl=0)
    s.read(DATA_VA, cpl=0)
    return s


@fixture
def smap_stac_clac() -> Scenario:
    s = basic("core/pf/smap/stac-clac", "Setting and clearing RFLAGS.AC (STAC/CLAC) switches SMAP's check per access; implicit supervisor accesses are checked whatever AC says (SDM 4.6.1).", cr4=CR4 | Cr4.SMAP)
    s.read(DATA_VA, cpl=0, note="AC = 0: P")
    s.reg(Register.RFLAGS, RFLAGS | Rflags.AC, note="STAC")
    s.read(DATA_VA, cpl=0, note="allowed")
    s.read(DATA_VA, cpl=0, implicit=True, note="implicit: P")
    s.reg(Register.RFLAGS, RFLAGS, note="CLAC")
    s.write(DATA_VA, 1, cpl=0, note="P|W")
    return s


# -- non-canonical addresses -------------------------------------------------------------------


@fixture
def gp_noncanonical() -> Scenario:
    s = basic("core/gp/noncanonical", "Bits 63:47 of a linear address must be equal: otherwise #GP(0), not #PF, for loads, stores and fetches (SDM Vol. 1 3.3.7.1); INVLPG of such an address is a no-op.")
    for va in (NONCANONICAL_LOW, NONCANONICAL_HIGH):
        s.read(va, cpl=0)
        s.write(va, 1, cpl=3)
        s.fetch(va, cpl=0)
        s.invlpg(va)
    s.read(0xFFFF_9000_0000_0000, cpl=0, note="canonical upper half, unmapped: #PF")
    s.read(DATA_VA, cpl=3)
    return s


# -- large pages ----------------------------------------------------------------------------------


@fixture
def large_2m() -> Scenario:
    s = Scenario("core/large/2m", "A 2 MiB page: bits 20:0 of the address are the offset (SDM 4.5, Table 4-18); A and D land in the PDE.")
    s.map(BIG_VA, BIG_PA, URW, PageSize.SIZE_2M)
    s.window()
    s.read(BIG_VA, cpl=3)
    s.write(BIG_VA + 0x1F_F000, 0xB16, cpl=3)
    s.read(BIG_VA + 0x1F_F000, cpl=0)
    s.read(WINDOW_VA + BIG_PA + 0x1F_F000, cpl=0, note="the same byte, through the physical window")
    s.read_entry(BIG_VA, Level.L2, note="the PDE: A and D set")
    return s


@fixture
def large_1g() -> Scenario:
    s = Scenario("core/large/1g", "A 1 GiB page: bits 29:0 are the offset (SDM 4.5, Table 4-16); A and D land in the PDPTE.")
    s.map(HUGE_VA, HUGE_PA, URW, PageSize.SIZE_1G)
    s.window()
    s.read(HUGE_VA, cpl=3)
    s.write(HUGE_VA + 0x2345_6000, 0x1A6E, cpl=3)
    s.read(HUGE_VA + 0x2345_6000, cpl=3)
    s.read_entry(HUGE_VA, Level.L3, note="the PDPTE: A and D set")
    return s


@fixture
def large_rights() -> Scenario:
    s = Scenario("core/large/2m-rights", "Rights of a 2 MiB page combine the PML4E, PDPTE and PDE (SDM 4.6.1).")
    s.map(BIG_VA, BIG_PA, PteFlag.US | PteFlag.XD, PageSize.SIZE_2M)
    s.write(BIG_VA + 0x3000, 1, cpl=3, note="read-only: P|W|U")
    s.fetch(BIG_VA + 0x3000, cpl=3, note="XD: P|U|I")
    s.read(BIG_VA + 0x3000, cpl=3)
    return s


# -- accessed and dirty flags ---------------------------------------------------------------


@fixture
def ad_read() -> Scenario:
    s = basic("core/ad/read-sets-accessed", "A read sets A in every entry it uses, D in none (SDM 4.8).")
    s.window()
    for level in LEVELS:
        s.edit(DATA_VA, level, clear_bits=PteFlag.A | PteFlag.D)
    s.read(DATA_VA, cpl=3)
    for level in LEVELS:
        s.read_entry(DATA_VA, level)
    return s


@fixture
def ad_write() -> Scenario:
    s = basic("core/ad/write-sets-dirty", "A write sets A in every entry and D in the PTE, the entry that maps the page (SDM 4.8).")
    s.window()
    s.write(DATA_VA, 0xD1, cpl=3)
    for level in LEVELS:
        s.read_entry(DATA_VA, level)
    return s


@fixture
def ad_fault() -> Scenario:
    s = basic("core/ad/fault-leaves-leaf-clean", "A faulting access sets A in the upper entries it used but neither A nor D in the leaf it was refused (SDM 4.8).")
    s.window()
    s.edit(DATA_VA, Level.L1, clear_bits=PteFlag.US)
    s.write(DATA_VA, 1, cpl=3)
    for level in LEVELS:
        s.read_entry(DATA_VA, level)
    return s


@fixture
def ad_write_after_read() -> Scenario:
    s = basic("core/ad/write-after-read", "A read caches a clean translation; a later write must walk to set D (SDM 4.8), so it sees the PTE in memory.")
    s.window()
    s.read(DATA_VA, cpl=3)
    s.read_entry(DATA_VA, Level.L1, note="A, no D")
    s.write(DATA_VA, 0x99, cpl=3)
    s.read_entry(DATA_VA, Level.L1, note="A and D")
    return s


@fixture
def ad_stale_dirty() -> Scenario:
    s = basic("core/ad/cleared-dirty-without-invlpg", "Software clears D without INVLPG: a write may use the cached dirty translation (D stays 0) or walk (D set again); both are allowed (SDM 4.8, 4.10.4.3). After INVLPG the write must set D.")
    s.window()
    s.write(DATA_VA, 1, cpl=3, note="caches a dirty translation")
    s.pte_edit(DATA_VA, Level.L1, set_bits=PteFlag.A, note="clear D (the initial entry has none)")
    s.write(DATA_VA, 2, cpl=3)
    s.read_entry(DATA_VA, Level.L1, note="D is 0 or 1")
    s.invlpg(DATA_VA)
    s.write(DATA_VA, 3, cpl=3)
    s.read_entry(DATA_VA, Level.L1, note="D = 1")
    return s


# -- the TLB ------------------------------------------------------------------------------------


def remap(s: Scenario, note: str = "point the PTE at OTHER_PA") -> None:
    s.pte_edit(DATA_VA, Level.L1, set_bits=OTHER_PA, clear_bits=DATA_PA, note=note)


def other(s: Scenario) -> Scenario:
    s.mem.write_u64(OTHER_PA, data_word(OTHER_PA))
    return s


@fixture
def tlb_stale_then_invlpg() -> Scenario:
    s = other(basic("core/tlb/remap-then-invlpg", "After a PTE is pointed elsewhere without invalidation, a read may return the old or the new page (SDM 4.10.4.3); after INVLPG only the new one (4.10.4.1)."))
    s.read(DATA_VA, cpl=3, note="caches DATA_PA")
    remap(s)
    s.read(DATA_VA, cpl=3, note="old or new")
    s.invlpg(DATA_VA)
    s.read(DATA_VA, cpl=3, note="new")
    return s


@fixture
def tlb_unmap_without_flush() -> Scenario:
    s = basic("core/tlb/unmap-without-invlpg", "Clearing P without invalidation: the stale translation may still be used, or the walk faults (SDM 4.10.4.3); after INVLPG the access faults.")
    s.read(DATA_VA, cpl=3)
    s.pte_edit(DATA_VA, Level.L1, clear_bits=PteFlag.P)
    s.read(DATA_VA, cpl=3, note="value or #PF")
    s.invlpg(DATA_VA)
    s.read(DATA_VA, cpl=3, note="#PF")
    return s


@fixture
def tlb_uncached_page() -> Scenario:
    s = other(basic("core/tlb/remap-before-first-use", "A PTE changed before any access to its page: nothing was cached, the access uses the new entry."))
    s.read(DATA_VA + 8, cpl=3, note="caches DATA_VA only")
    s.op(PteWrite(s.addr(DATA_VA, Level.L1) >> PAGE_SHIFT, table_index(NEXT_VA, Level.L1), OTHER_PA | int(URW | PteFlag.P), 1), note="map NEXT_VA")
    s.read(NEXT_VA, cpl=3, note="never cached: the new entry")
    return s


@fixture
def tlb_invlpg_large() -> Scenario:
    s = Scenario("core/tlb/invlpg-2m", "INVLPG of any address inside a 2 MiB page invalidates the page (SDM 4.10.4.1).")
    s.map(BIG_VA, BIG_PA, URW, PageSize.SIZE_2M)
    s.mem.write_u64(BIG_PA + 0x20_0000, data_word(BIG_PA + 0x20_0000))
    s.read(BIG_VA, cpl=3)
    s.pte_edit(BIG_VA, Level.L2, set_bits=BIG_PA + 0x20_0000, clear_bits=BIG_PA, note="next 2 MiB of physical memory")
    s.invlpg(BIG_VA + 0x1F_F000, note="the page's last 4 KiB")
    s.read(BIG_VA, cpl=3, note="new")
    return s


@fixture
def tlb_mov_cr3() -> Scenario:
    s = other(basic("core/tlb/mov-cr3-flushes", "MOV to CR3 invalidates every non-global translation (SDM 4.10.4.1)."))
    s.read(DATA_VA, cpl=3)
    remap(s)
    s.reg(Register.CR3, s.regs.cr3)
    s.read(DATA_VA, cpl=3, note="new")
    return s


@fixture
def tlb_global_mov_cr3() -> Scenario:
    s = other(basic("core/tlb/global-survives-mov-cr3", "With CR4.PGE = 1 a global translation may survive MOV to CR3 (SDM 4.10.2.4, 4.10.4.1): old or new; INVLPG removes it.", cr4=CR4 | Cr4.PGE))
    s.edit(DATA_VA, Level.L1, set_bits=PteFlag.G)
    s.read(DATA_VA, cpl=3)
    remap(s)
    s.reg(Register.CR3, s.regs.cr3)
    s.read(DATA_VA, cpl=3, note="old or new")
    s.invlpg(DATA_VA)
    s.read(DATA_VA, cpl=3, note="new")
    return s


@fixture
def tlb_global_ignored_without_pge() -> Scenario:
    s = other(basic("core/tlb/g-without-pge", "G is ignored when CR4.PGE = 0: MOV to CR3 invalidates the translation (SDM 4.10.2.4)."))
    s.edit(DATA_VA, Level.L1, set_bits=PteFlag.G)
    s.read(DATA_VA, cpl=3)
    remap(s)
    s.reg(Register.CR3, s.regs.cr3)
    s.read(DATA_VA, cpl=3, note="new")
    return s


@fixture
def tlb_pge_toggle() -> Scenario:
    s = other(basic("core/tlb/cr4-pge-toggle", "MOV to CR4 changing PGE invalidates every translation, global ones included (SDM 4.10.4.1).", cr4=CR4 | Cr4.PGE))
    s.edit(DATA_VA, Level.L1, set_bits=PteFlag.G)
    s.read(DATA_VA, cpl=3)
    remap(s)
    s.reg(Register.CR4, CR4)
    s.read(DATA_VA, cpl=3, note="new")
    return s


@fixture
def tlb_write_through_clean() -> Scenario:
    s = other(basic("core/tlb/write-after-remap-walks", "A translation cached by a read is clean; a write must walk to set D (SDM 4.8), so after a remap without INVLPG it writes the new page. The read may still use the stale entry."))
    s.window()
    s.read(DATA_VA, cpl=3)
    remap(s)
    s.write(DATA_VA, 0x5EE, cpl=3, note="walks: writes OTHER_PA")
    s.read(WINDOW_VA + OTHER_PA, cpl=0, note="0x5ee")
    s.read(WINDOW_VA + DATA_PA, cpl=0, note="untouched")
    return s


@fixture
def tlb_spurious_fault() -> Scenario:
    s = basic("core/tlb/relaxed-rights-without-invlpg", "Making a read-only page writable without invalidation: the write may fault on the cached rights (a spurious #PF, SDM 4.10.4.3) or walk and succeed; once it faulted the page is invalidated and the write succeeds.")
    s.edit(DATA_VA, Level.L1, clear_bits=PteFlag.RW)
    s.read(DATA_VA, cpl=3, note="caches a read-only translation")
    s.pte_edit(DATA_VA, Level.L1, set_bits=PteFlag.RW)
    s.write(DATA_VA, 0xAA, cpl=3, note="#PF or success")
    s.write(DATA_VA, 0xBB, cpl=3, note="success")
    s.read(DATA_VA, cpl=3)
    return s


@fixture
def tlb_narrowed_rights() -> Scenario:
    s = basic("core/tlb/narrowed-rights-without-invlpg", "Making a writable page read-only without invalidation: a write may still use the cached dirty translation, or walk and fault (SDM 4.10.4.2 says software must invalidate); INVLPG ends it.")
    s.write(DATA_VA, 1, cpl=3, note="caches a dirty, writable translation")
    s.pte_edit(DATA_VA, Level.L1, set_bits=PteFlag.A | PteFlag.D, clear_bits=PteFlag.RW)
    s.write(DATA_VA, 2, cpl=3, note="success or #PF")
    s.invlpg(DATA_VA)
    s.write(DATA_VA, 3, cpl=3, note="#PF")
    return s


# -- PCIDs and INVPCID ----------------------------------------------------------------------------

PCID_CR4 = CR4 | Cr4.PCIDE | Cr4.PGE


def pcid_scenario(name: str, description: str) -> Scenario:
    """PCIDE = 1, PGE = 1; DATA_VA (non-global) and OTHER_VA (global) in PCID 1."""
    s = other(Scenario(name, description, cr4=PCID_CR4, pcid=1))
    s.map(DATA_VA, DATA_PA)
    s.map(OTHER_VA, DATA_PA + 0x1000, URW | PteFlag.G)
    s.mem.write_u64(OTHER_PA + 0x1000, data_word(OTHER_PA + 0x1000))
    return s


def remap_both(s: Scenario) -> None:
    remap(s)
    s.pte_edit(OTHER_VA, Level.L1, set_bits=OTHER_PA + 0x1000, clear_bits=DATA_PA + 0x1000, note="point OTHER_VA elsewhere too")


@fixture
def pcid_noflush() -> Scenario:
    s = pcid_scenario("core/tlb/pcid/mov-cr3-noflush", "CR4.PCIDE = 1: MOV to CR3 with bit 63 set does not invalidate, so a translation of PCID 1 may survive a round trip through PCID 2 (SDM 4.10.4.1); without bit 63 the new PCID's non-global entries go.")
    base = s.pt.cr3
    s.read(DATA_VA, cpl=3)
    s.reg(Register.CR3, base | 2 | CR3_NOFLUSH, note="PCID 2, no flush")
    remap(s)
    s.reg(Register.CR3, base | 1 | CR3_NOFLUSH, note="back to PCID 1, no flush")
    s.read(DATA_VA, cpl=3, note="old or new")
    s.reg(Register.CR3, base | 1, note="PCID 1, flush")
    s.read(DATA_VA, cpl=3, note="new")
    return s


@fixture
def pcid_other_pcid_untouched() -> Scenario:
    s = pcid_scenario("core/tlb/pcid/flush-is-per-pcid", "MOV to CR3 (flushing) to PCID 2 invalidates PCID 2's entries only: returning to PCID 1 without a flush may still use PCID 1's (SDM 4.10.4.1).")
    base = s.pt.cr3
    s.read(DATA_VA, cpl=3)
    remap(s)
    s.reg(Register.CR3, base | 2, note="PCID 2, flushes PCID 2")
    s.read(DATA_VA, cpl=3, note="new (PCID 2 had nothing)")
    s.reg(Register.CR3, base | 1 | CR3_NOFLUSH)
    s.read(DATA_VA, cpl=3, note="PCID 1's entry may remain: old or new")
    return s


def _invpcid() -> Iterator[Scenario]:
    effects = {
        0: "the page of DATA_VA in PCID 1 (not global entries)",
        1: "PCID 1's non-global entries",
        2: "every entry, global ones included",
        3: "every non-global entry",
    }
    for kind, what in effects.items():
        s = pcid_scenario(f"core/tlb/invpcid/type-{kind}", f"INVPCID type {kind} invalidates {what} (SDM Vol. 2A INVPCID); the other translation may stay.")
        s.read(DATA_VA, cpl=3, note="non-global")
        s.read(OTHER_VA, cpl=3, note="global")
        remap_both(s)
        s.invpcid(kind, 1, DATA_VA)
        s.read(DATA_VA, cpl=0)
        s.read(OTHER_VA, cpl=0)
        yield s


fixture_family(_invpcid)


@fixture
def invpcid_gp() -> Scenario:
    s = pcid_scenario("core/tlb/invpcid/gp", "INVPCID #GP(0): type above 3, PCID above 0FFFH, non-canonical address with type 0 (SDM Vol. 2A INVPCID).")
    s.invpcid(4, 1)
    s.invpcid(1, 0x1000)
    s.invpcid(0, 1, NONCANONICAL_LOW)
    s.invpcid(2, 0, note="fine")
    return s


@fixture
def invpcid_without_pcide() -> Scenario:
    s = basic("core/tlb/invpcid/without-pcide", "With CR4.PCIDE = 0 only PCID 0 exists: INVPCID type 0 or 1 naming another PCID is #GP(0); types 2 and 3 work.")
    s.invpcid(1, 5)
    s.invpcid(0, 5, DATA_VA)
    s.invpcid(0, 0, DATA_VA)
    s.invpcid(3, 0)
    return s


# -- control registers --------------------------------------------------------------------------


@fixture
def cr_gp() -> Scenario:
    s = basic("core/cr/gp", "Control-register writes the model's 64-bit mode refuses with #GP(0) (SDM 2.5, Vol. 2A MOV CR, WRMSR), and the state left unchanged by them.")
    s.reg(Register.CR0, CR0 & ~Cr0.PG, note="clear PG in 64-bit mode")
    s.reg(Register.CR0, CR0 | Cr0.NW, note="NW without CD")
    s.reg(Register.CR0, CR0 | 1 << 32, note="bits 63:32")
    s.reg(Register.CR4, CR4 & ~Cr4.PAE, note="clear PAE in IA-32e mode")
    s.reg(Register.CR4, CR4 | 1 << 25, note="a reserved bit")
    s.reg(Register.CR4, CR4 | Cr4.LA57, note="LA57 in IA-32e mode")
    s.reg(Register.CR3, s.regs.cr3 | 1 << 45, note="beyond MAXPHYADDR")
    s.op(RegWrite(Register.EFER, EFER | 1 << 20), note="a reserved EFER bit")
    s.op(RegWrite(Register.EFER, EFER & ~Efer.LME), note="LME with paging on")
    s.read(DATA_VA, cpl=3, note="nothing changed")
    return s


@fixture
def cr_pcide() -> Scenario:
    s = basic("core/cr/pcide", "Setting CR4.PCIDE needs CR3[11:0] = 0 (#GP otherwise); once set, CR3[11:0] is the PCID (SDM 4.10.1).")
    base = s.pt.cr3
    s.reg(Register.CR3, base | 5, note="PCIDE = 0: bits 11:0 are not a PCID (PWT/PCD...)")
    s.reg(Register.CR4, CR4 | Cr4.PCIDE, note="#GP: CR3[11:0] != 0")
    s.reg(Register.CR3, base)
    s.reg(Register.CR4, CR4 | Cr4.PCIDE)
    s.reg(Register.CR3, base | 7)
    s.read(DATA_VA, cpl=3)
    s.reg(Register.CR4, CR4, note="clearing PCIDE flushes everything")
    return s


@fixture
def cr_privileged() -> Scenario:
    s = basic("core/cr/privileged-at-cpl3", "MOV to CR0/CR3/CR4, WRMSR, INVLPG and INVPCID are privileged: #GP(0) at CPL 3.", cpl=3)
    s.reg(Register.CR3, s.regs.cr3)
    s.reg(Register.CR0, CR0)
    s.reg(Register.CR4, CR4)
    s.op(RegWrite(Register.EFER, EFER))
    s.invlpg(DATA_VA)
    s.invpcid(2, 0)
    s.read(DATA_VA, note="a CPL 3 read")
    return s


# ---------------------------------------------------------------------------------
# Hypervisor modes
# ---------------------------------------------------------------------------------

#: Machine of every hypervisor fixture: 512 frames, the lowest 64 Xen's.
HV_FRAMES = 512
HV_XEN_FRAMES = 64
#: Guest frames of the standard guest address space: L4, L3, L2, L1, then data.
G_L4, G_L3, G_L2, G_L1 = 1, 2, 3, 4
G_DATA, G_OTHER, G_SPARE_L1, G_SPARE = 8, 9, 10, 11
#: Linear addresses every guest fixture maps: DATA_VA -> G_DATA (user, writable).
GUEST_PAGES = 32


#: Upper-level entries of guest tables: present, writable, user.
TABLE_FLAGS_GUEST = PteFlag.P | PteFlag.RW | PteFlag.US
#: Xen ABI numbers (xen/include/public/xen.h).
MMU_NORMAL_PT_UPDATE, MMU_MACHPHYS_UPDATE, MMU_PT_UPDATE_PRESERVE_AD, MMU_PT_UPDATE_NO_TRANSLATE = 0, 1, 2, 3
MMUEXT_PIN_L1_TABLE, MMUEXT_PIN_L2_TABLE, MMUEXT_PIN_L3_TABLE, MMUEXT_PIN_L4_TABLE = 0, 1, 2, 3
MMUEXT_UNPIN_TABLE, MMUEXT_NEW_BASEPTR, MMUEXT_TLB_FLUSH_LOCAL, MMUEXT_INVLPG_LOCAL = 4, 5, 6, 7
MMUEXT_TLB_FLUSH_MULTI, MMUEXT_INVLPG_MULTI, MMUEXT_TLB_FLUSH_ALL, MMUEXT_INVLPG_ALL = 8, 9, 10, 11
MMUEXT_FLUSH_CACHE, MMUEXT_SET_LDT, MMUEXT_NEW_USER_BASEPTR, MMUEXT_FLUSH_CACHE_GLOBAL = 12, 13, 15, 18
MMUEXT_CLEAR_PAGE, MMUEXT_COPY_PAGE, MMUEXT_MARK_SUPER, MMUEXT_UNMARK_SUPER = 16, 17, 19, 20
UVMF_NONE, UVMF_TLB_FLUSH, UVMF_INVLPG, UVMF_ALL = 0, 1, 2, 4
DOMID_SELF = 0x7FF0


class HvScenario:
    """A fixture under a hypervisor: a small machine, domains created by
    :meth:`Machine.create_domain` (so their P2M is refmodel's), guest page tables
    built in guest frames, and operations by the vCPUs (one per domain).

    A PV guest's entries hold machine frame numbers (it knows its P2M); an HVM
    guest's hold guest frame numbers."""

    def __init__(self, name: str, description: str, mode: Mode, *, domains: tuple[int, ...] = (1,),
                 tagged: bool = True, privileged: tuple[int, ...] = ()) -> None:
        self.name = name
        self.description = description
        self.mode = mode
        self.tagged = tagged
        self.machine = Machine(HV_FRAMES, HV_XEN_FRAMES, CORE_MAXPHYADDR)
        self.domids = domains
        for domid in domains:
            self.machine.create_domain(domid, GUEST_PAGES, privileged=domid in privileged)
        self.cr3: dict[int, int] = {d: 0 for d in domains}
        self.steps: list[Step] = []

    # -- frames ---------------------------------------------------------------------------
    def mfn(self, gfn: int, domid: int = 1) -> int:
        mfn = self.machine.domain(domid).mfn_of(gfn)
        assert mfn is not None
        return int(mfn)

    def frame(self, gfn: int, domid: int = 1) -> int:
        """What an entry referencing ``gfn`` holds: the MFN for PV, else the GFN."""
        return self.mfn(gfn, domid) if self.mode is Mode.PV else gfn

    def maddr(self, gfn: int, index: int, domid: int = 1) -> int:
        """Machine address of entry ``index`` of guest frame ``gfn``."""
        return (self.mfn(gfn, domid) << PAGE_SHIFT) + index * ENTRY_SIZE

    def poke(self, gfn: int, index: int, value: int, domid: int = 1) -> None:
        """Initial memory: qword ``index`` of guest frame ``gfn``."""
        self.machine.mem.write_u64(self.maddr(gfn, index, domid), value)

    def entry(self, gfn: int, flags: int, domid: int = 1) -> int:
        return (self.frame(gfn, domid) << PAGE_SHIFT) | flags

    def build(self, domid: int = 1, va: int = DATA_VA, data: int = G_DATA, leaf: int = int(URW | PteFlag.P)) -> None:
        """The standard address space: ``va`` -> guest frame ``data`` through L4..L1
        in G_L4..G_L1; the data frame holds :func:`data_word` of its machine address."""
        table = int(TABLE_FLAGS_GUEST)
        self.poke(G_L4, table_index(va, Level.L4), self.entry(G_L3, table, domid), domid)
        self.poke(G_L3, table_index(va, Level.L3), self.entry(G_L2, table, domid), domid)
        self.poke(G_L2, table_index(va, Level.L2), self.entry(G_L1, table, domid), domid)
        self.poke(G_L1, table_index(va, Level.L1), self.entry(data, leaf, domid), domid)
        for gfn in (G_DATA, G_OTHER, G_SPARE):
            self.poke(gfn, 0, data_word(self.mfn(gfn, domid) << PAGE_SHIFT), domid)
        if self.mode is not Mode.PV:
            self.cr3[domid] = G_L4 << PAGE_SHIFT

    def l1_slot(self, va: int = DATA_VA) -> int:
        return table_index(va, Level.L1)

    # -- operations ------------------------------------------------------------------------
    def op(self, op: Op, note: str = "") -> None:
        self.steps.append(Step(op, note=note))

    def read(self, va: int = DATA_VA, cpl: int | None = 3, note: str = "") -> None:
        self.op(Read(va, 8, cpl), note)

    def write(self, va: int, value: int, cpl: int | None = 3, note: str = "") -> None:
        self.op(Write(va, value, 8, cpl), note)

    def fetch(self, va: int = DATA_VA, cpl: int | None = 3, note: str = "") -> None:
        self.op(Fetch(va, cpl), note)

    def mmu_update(self, *reqs: tuple[int, int], foreigndom: int = DOMID_SELF, note: str = "") -> None:
        self.op(MmuUpdate(tuple(MmuUpdateReq(p, v) for p, v in reqs), foreigndom), note)

    def mmuext(self, *ops: tuple[int, ...], foreigndom: int = DOMID_SELF, note: str = "") -> None:
        self.op(MmuextOp(tuple(MmuextEntry(*o) for o in ops), foreigndom), note)

    def boot_pv(self, domid: int = 1) -> None:
        """Pin the L4 (validating the tree) and make it the base (CR3)."""
        l4 = self.mfn(G_L4, domid)
        self.mmuext((MMUEXT_PIN_L4_TABLE, l4), (MMUEXT_NEW_BASEPTR, l4), note="pin the L4, load it")

    # -- the trace ----------------------------------------------------------------------------
    def header(self) -> Header:
        mem = self.machine.mem
        memory = tuple((f, mem.frame_bytes(f)) for f in mem.populated_frames() if any(mem.frame_bytes(f)))
        domains = tuple(
            DomainInit(d, tuple(sorted((int(g), int(m)) for g, m in self.machine.domain(d).p2m.items())),
                       self.machine.domain(d).privileged)
            for d in self.domids
        )
        vcpus = tuple(VcpuInit.of(ArchState(cr3=self.cr3[d]), d) for d in self.domids)
        return Header(
            mode=self.mode, maxphyaddr=CORE_MAXPHYADDR, memory=memory, vcpus=vcpus, name=self.name,
            description=self.description, machine=MachineInit(HV_FRAMES, HV_XEN_FRAMES, self.tagged), domains=domains,
        )

    def trace(self) -> Trace:
        return Trace(self.header(), tuple(self.steps))




def pv(name: str, description: str, **kwargs: Any) -> HvScenario:
    """A booted PV guest: the standard address space, pinned and loaded."""
    s = HvScenario(f"pv/{name}", description, Mode.PV, **kwargs)
    for domid in s.domids:
        s.build(domid)
    s.boot_pv()
    return s


def remap_entry(s: HvScenario, gfn: int = G_OTHER, flags: int = int(URW | PteFlag.P)) -> tuple[int, int]:
    """An mmu_update request pointing DATA_VA's PTE at ``gfn``."""
    return (s.maddr(G_L1, s.l1_slot()) | MMU_NORMAL_PT_UPDATE, s.entry(gfn, flags))


@fixture
def pv_boot() -> HvScenario:
    s = HvScenario("pv/mmuext/pin-and-new-baseptr", "A PV guest pins its L4 (Xen validates the whole tree: every table typed, every L1 entry checked) and installs it as its base with NEW_BASEPTR; its accesses then run on its own tables, which hold machine frame numbers (xen/arch/x86/mm.c do_mmuext_op, new_guest_cr3).", Mode.PV)
    s.build()
    s.read(note="no base table yet: #PF")
    s.boot_pv()
    s.read()
    s.write(DATA_VA + 8, 0x1234)
    s.read(DATA_VA + 8)
    s.fetch()
    return s
@fixture
def pv_mmu_update_map() -> HvScenario:
    s = pv("mmu_update/normal-pt-update", "MMU_NORMAL_PT_UPDATE of an L1 entry: Xen validates the new entry (the frame must be the domain's, xen/arch/x86/mm.c mod_l1_entry) and writes it; ret 0, done 1. Xen does not flush after an L1 update: the guest invalidates (INVLPG_LOCAL) before relying on it.")
    s.read(note="caches G_DATA")
    s.mmu_update(remap_entry(s), note="DATA_VA -> G_OTHER")
    s.read(note="old or new: no flush yet")
    s.mmuext((MMUEXT_INVLPG_LOCAL, DATA_VA))
    s.read(note="new")
    s.mmu_update((s.maddr(G_L1, s.l1_slot(NEXT_VA)), s.entry(G_SPARE, int(URW | PteFlag.P))), note="map NEXT_VA, never cached")
    s.read(NEXT_VA)
    return s


@fixture
def pv_mmu_update_batch_error() -> HvScenario:
    s = pv("mmu_update/stops-at-first-error", "do_mmu_update runs requests in order and stops at the first error: the return value is that error, done counts the requests before it, the ones after it are not applied.")
    xen_frame = 5  # below HV_XEN_FRAMES: a hypervisor frame
    s.mmu_update(
        (s.maddr(G_L1, s.l1_slot(NEXT_VA)), s.entry(G_SPARE, int(URW | PteFlag.P))),
        (s.maddr(G_L1, s.l1_slot(NEXT_VA + 0x1000)), (xen_frame << PAGE_SHIFT) | int(URW | PteFlag.P)),
        (s.maddr(G_L1, s.l1_slot(NEXT_VA + 0x2000)), s.entry(G_OTHER, int(URW | PteFlag.P))),
        note="2nd maps a Xen frame: -EBUSY, done 1",
    )
    s.read(NEXT_VA, note="the first request took effect")
    s.read(NEXT_VA + 0x1000, note="the second did not")
    s.read(NEXT_VA + 0x2000, note="nor the third")
    return s


@fixture
def pv_mmu_update_writable_table() -> HvScenario:
    s = pv("mmu_update/no-writable-mapping-of-a-page-table", "A page-table frame can be mapped read-only but never writable: the writable mapping needs a 'writable' type reference, impossible while the frame is typed as a page table (get_page_from_l1e -> get_page_type: -EBUSY).")
    s.mmu_update((s.maddr(G_L1, s.l1_slot(NEXT_VA)), s.entry(G_L1, int(URW | PteFlag.P))), note="RW mapping of the L1 itself: -EBUSY")
    s.mmu_update((s.maddr(G_L1, s.l1_slot(NEXT_VA)), s.entry(G_L1, int(PteFlag.US | PteFlag.P))), note="read-only: allowed")
    s.read(NEXT_VA + s.l1_slot() * 8, note="the guest reads its own PTE for DATA_VA")
    s.write(NEXT_VA, 1, note="read-only: #PF")
    return s


@fixture
def pv_mmu_update_commands() -> HvScenario:
    s = pv("mmu_update/commands", "The command in ptr bits 2:0: PT_UPDATE_PRESERVE_AD keeps the entry's A and D flags, MACHPHYS_UPDATE sets an M2P entry, PT_UPDATE_NO_TRANSLATE is a normal update for a PV guest, commands 4-7 are -ENOSYS (xen/include/public/xen.h, do_mmu_update).")
    s.write(DATA_VA, 0x77, note="sets A and D in the PTE")
    slot = s.maddr(G_L1, s.l1_slot())
    s.mmu_update((slot | MMU_PT_UPDATE_PRESERVE_AD, s.entry(G_DATA, int(URW | PteFlag.P))), note="A and D preserved")
    s.mmu_update((s.maddr(G_L1, s.l1_slot(NEXT_VA)), s.entry(G_L1, int(PteFlag.US | PteFlag.P))), note="look at the L1")
    s.read(NEXT_VA + s.l1_slot() * 8, note="the PTE: A|D kept")
    s.mmu_update(((s.mfn(G_SPARE) << PAGE_SHIFT) | MMU_MACHPHYS_UPDATE, G_SPARE), note="M2P[mfn] = gfn")
    s.mmu_update((slot | MMU_PT_UPDATE_NO_TRANSLATE, s.entry(G_DATA, int(URW | PteFlag.P))), note="as a normal update for PV")
    s.read(note="still G_DATA")
    s.mmu_update((slot | 4, 0), note="command 4: -ENOSYS")
    s.mmu_update((slot | 7, 0), note="command 7: -ENOSYS")
    return s


@fixture
def pv_mmu_update_bad_flags() -> HvScenario:
    s = pv("mmu_update/refused-entries", "Entries Xen refuses: PSE in an L2 (no superpages for PV: -EINVAL), a flag outside the allowed set (PCD without I/O privilege: -EINVAL), a frame nobody owns (get_page_from_l1e: -EBUSY), an entry in a frame that is not the guest's (-EINVAL).")
    pde = s.maddr(G_L2, table_index(BIG_VA, Level.L2))
    s.mmu_update((s.maddr(G_L3, table_index(BIG_VA, Level.L3)), s.entry(G_L2, int(TABLE_FLAGS_GUEST))), note="link the L2 under BIG_VA's L3 slot: fine")
    s.mmu_update((pde, (s.mfn(G_SPARE) << PAGE_SHIFT) | int(URW | PteFlag.P | PteFlag.PS)), note="a 2 MiB superpage: -EINVAL")
    s.mmu_update((s.maddr(G_L1, s.l1_slot(NEXT_VA)), s.entry(G_SPARE, int(URW | PteFlag.P | PteFlag.PCD))), note="PCD: -EINVAL")
    s.mmu_update((s.maddr(G_L1, s.l1_slot(NEXT_VA)), (HV_FRAMES - 1 - 2 * GUEST_PAGES) << PAGE_SHIFT | int(URW | PteFlag.P)), note="a free frame: -EBUSY")
    s.mmu_update(((HV_XEN_FRAMES - 1) << PAGE_SHIFT, 0), note="ptr in a Xen frame: -EINVAL")
    return s


@fixture
def pv_mmu_update_l2_flush() -> HvScenario:
    s = pv("mmu_update/upper-level-update-flushes", "After a batch that changed an L2-L4 entry Xen flushes the domain's TLB (do_mmu_update: 'flush_tlb_mask' when an upper level changed), so an access after unlinking the L1 faults.")
    s.read(note="caches the translation")
    s.mmu_update((s.maddr(G_L2, table_index(DATA_VA, Level.L2)), 0), note="unlink the L1")
    s.read(note="#PF: Xen flushed")
    return s


@fixture
def pv_mmu_update_foreign() -> HvScenario:
    s = pv("mmu_update/foreigndom", "The foreigndom argument: naming oneself by number and naming an unknown domain are -ESRCH (get_pg_owner), a non-privileged domain may not name another (-EPERM, xsm_mmu_update).", domains=(1, 2))
    req = (s.maddr(G_L1, s.l1_slot(NEXT_VA)), s.entry(G_SPARE, int(URW | PteFlag.P)))
    s.mmu_update(req, foreigndom=1, note="itself by number")
    s.mmu_update(req, foreigndom=9, note="no domain 9")
    s.mmu_update(req, foreigndom=2, note="another domain, unprivileged")
    return s


@fixture
def pv_pin() -> HvScenario:
    s = pv("mmuext/pin-unpin", "PIN_Lx_TABLE takes and keeps a type reference (validating the table); pinning twice and unpinning an unpinned frame are -EINVAL; a frame typed as one level cannot be pinned as another (-EINVAL); a data frame mapped writable cannot be pinned.")
    l3, l2, l1 = s.mfn(G_L3), s.mfn(G_L2), s.mfn(G_L1)
    s.mmuext((MMUEXT_PIN_L3_TABLE, l3), note="L3: fine")
    s.mmuext((MMUEXT_PIN_L3_TABLE, l3), note="again: -EINVAL")
    s.mmuext((MMUEXT_PIN_L1_TABLE, l2), note="an L2 as an L1: -EINVAL")
    s.mmuext((MMUEXT_PIN_L2_TABLE, l2), (MMUEXT_PIN_L1_TABLE, l1), note="both fine")
    s.mmuext((MMUEXT_UNPIN_TABLE, l1), (MMUEXT_UNPIN_TABLE, l1), note="second: -EINVAL, done 1")
    s.mmuext((MMUEXT_PIN_L1_TABLE, s.mfn(G_DATA)), note="the data frame is mapped writable: -EINVAL")
    s.mmuext((MMUEXT_PIN_L1_TABLE, 5), note="a Xen frame: -EINVAL")
    return s


@fixture
def pv_pin_validates() -> HvScenario:
    s = HvScenario("pv/mmuext/pin-validates-the-tree", "Pinning an L4 validates every table below it; an L1 entry that maps another domain's frame makes the pin fail (get_page_from_l1e: -EBUSY) and nothing stays typed, so after the entry is cleared with an ordinary (untyped-frame) update the pin succeeds.", Mode.PV, domains=(1, 2))
    s.build(1)
    s.build(2)
    s.poke(G_L1, table_index(NEXT_VA, Level.L1), (s.mfn(G_DATA, 2) << PAGE_SHIFT) | int(URW | PteFlag.P))
    s.mmuext((MMUEXT_PIN_L4_TABLE, s.mfn(G_L4)), note="-EBUSY: an L1 entry maps domain 2's frame")
    s.mmuext((MMUEXT_NEW_BASEPTR, s.mfn(G_L4)), note="-EBUSY: validation fails again")
    s.mmu_update((s.maddr(G_L1, s.l1_slot(NEXT_VA)), 0), note="an untyped frame: a plain, checked store")
    s.mmuext((MMUEXT_PIN_L4_TABLE, s.mfn(G_L4)), (MMUEXT_NEW_BASEPTR, s.mfn(G_L4)), note="now fine")
    s.read()
    return s


@fixture
def pv_new_baseptr() -> HvScenario:
    s = pv("mmuext/new-baseptr-switch", "NEW_BASEPTR switches to another L4 (validating it) and flushes the non-global TLB entries: the new address space's mapping is seen at once; a frame that is not the caller's is -EINVAL.")
    l4b = G_SPARE_L1 + 10
    for level, (table, nxt) in {Level.L4: (l4b, G_L3)}.items():
        s.poke(table, table_index(DATA_VA, level), s.entry(nxt, int(TABLE_FLAGS_GUEST)))
    s.read(note="G_DATA through the first L4")
    s.mmu_update((s.maddr(G_L1, s.l1_slot()), s.entry(G_OTHER, int(URW | PteFlag.P))), note="remap, no flush")
    s.mmuext((MMUEXT_NEW_BASEPTR, s.mfn(l4b)), note="second L4 (shares the L3): flushes")
    s.read(note="G_OTHER")
    s.mmuext((MMUEXT_NEW_BASEPTR, 5), note="a Xen frame: -EINVAL")
    return s


def _pv_flushes() -> Iterator[HvScenario]:
    cases: dict[str, list[tuple[int, ...]]] = {
        "tlb-flush-local": [(MMUEXT_TLB_FLUSH_LOCAL,)],
        "invlpg-local": [(MMUEXT_INVLPG_LOCAL, DATA_VA)],
        "tlb-flush-all": [(MMUEXT_TLB_FLUSH_ALL,)],
        "invlpg-all": [(MMUEXT_INVLPG_ALL, DATA_VA)],
        "tlb-flush-multi": [(MMUEXT_TLB_FLUSH_MULTI, 0, NEXT_VA)],
        "invlpg-multi": [(MMUEXT_INVLPG_MULTI, DATA_VA, NEXT_VA)],
    }
    for name, ops in cases.items():
        s = pv(f"mmuext/{name}", f"MMUEXT_{name.upper().replace('-', '_')} after an L1 update: the stale translation is gone afterwards (the *_MULTI forms read a vCPU bitmap from guest memory, here at NEXT_VA, bit 0 set).")
        s.mmu_update((s.maddr(G_L1, s.l1_slot(NEXT_VA)), s.entry(G_SPARE, int(URW | PteFlag.P))), note="map the bitmap page")
        s.write(NEXT_VA, 1, note="vCPU bitmap: vCPU 0")
        s.read(note="caches G_DATA")
        s.mmu_update(remap_entry(s))
        s.mmuext(*ops)
        s.read(note="G_OTHER")
        yield s
    s = pv("mmuext/multi-bad-bitmap", "A *_MULTI flush whose vCPU bitmap Xen cannot read is -EINVAL (vcpumask_to_pcpumask).")
    s.mmuext((MMUEXT_TLB_FLUSH_MULTI, 0, OTHER_VA), note="bitmap pointer to an unmapped page")
    s.mmuext((MMUEXT_INVLPG_LOCAL, NONCANONICAL_LOW), note="non-canonical: ignored, success")
    yield s


fixture_family(_pv_flushes)


@fixture
def pv_mmuext_misc() -> HvScenario:
    s = pv("mmuext/other-commands", "Other mmuext_op commands: FLUSH_CACHE needs cache-flush permission (-EACCES), CLEAR_PAGE and COPY_PAGE work on the caller's writable frames, [UN]MARK_SUPER are -EOPNOTSUPP, an unassigned command is -ENOSYS, and a batch stops at the first failure.")
    s.mmuext((MMUEXT_FLUSH_CACHE,))
    s.mmuext((MMUEXT_COPY_PAGE, s.mfn(G_SPARE), s.mfn(G_DATA)), note="copy G_DATA into G_SPARE")
    s.mmu_update((s.maddr(G_L1, s.l1_slot(NEXT_VA)), s.entry(G_SPARE, int(URW | PteFlag.P))))
    s.read(NEXT_VA, note="the copy")
    s.mmuext((MMUEXT_CLEAR_PAGE, s.mfn(G_SPARE)))
    s.read(NEXT_VA, note="zero")
    s.mmuext((MMUEXT_CLEAR_PAGE, s.mfn(G_L1)), note="a page table: -EINVAL")
    s.mmuext((MMUEXT_MARK_SUPER, s.mfn(G_DATA)), (MMUEXT_UNMARK_SUPER, s.mfn(G_DATA)))
    s.mmuext((14,), note="unassigned")
    s.mmuext((MMUEXT_NEW_USER_BASEPTR, s.mfn(G_L4)), note="the user-mode base (64-bit PV)")
    s.mmuext((MMUEXT_FLUSH_CACHE_GLOBAL,))
    s.mmuext((MMUEXT_SET_LDT, 0, 0), (MMUEXT_SET_LDT, 0x1001, 1), note="LDT off: fine; unaligned base: -EINVAL")
    s.mmuext((MMUEXT_TLB_FLUSH_LOCAL,), (MMUEXT_FLUSH_CACHE,), (MMUEXT_TLB_FLUSH_LOCAL,), note="done 1")
    return s


def _uvm() -> Iterator[HvScenario]:
    for flags, name in ((UVMF_NONE, "none"), (UVMF_INVLPG, "invlpg"), (UVMF_TLB_FLUSH, "tlb-flush"),
                        (UVMF_INVLPG | UVMF_ALL, "invlpg-all")):
        s = pv(f"update_va_mapping/{name}", f"update_va_mapping(DATA_VA, new PTE, {name}): Xen finds the L1 through the guest's current tables and sets the entry; the flush (flags & 3) follows only a successful update (xen/arch/x86/mm.c __do_update_va_mapping).")
        s.read(note="caches G_DATA")
        s.op(UpdateVaMapping(DATA_VA, s.entry(G_OTHER, int(URW | PteFlag.P)), flags))
        s.read(note="old or new" if flags == UVMF_NONE else "new")
        yield s
    s = pv("update_va_mapping/errors", "update_va_mapping errors: no L1 for the address (-EINVAL), an entry Xen refuses (-EINVAL, and no flush), a vCPU bitmap Xen cannot read (-EFAULT after the entry was set).")
    s.read(note="caches G_DATA")
    s.op(UpdateVaMapping(OTHER_VA, s.entry(G_OTHER, int(URW | PteFlag.P)), UVMF_INVLPG), note="OTHER_VA has no L1")
    s.op(UpdateVaMapping(DATA_VA, s.entry(G_L1, int(URW | PteFlag.P)), UVMF_INVLPG), note="writable map of a page table")
    s.read(note="unchanged")
    s.op(UpdateVaMapping(DATA_VA, s.entry(G_OTHER, int(URW | PteFlag.P)), UVMF_INVLPG | OTHER_VA), note="unreadable bitmap pointer")
    s.op(UpdateVaMapping(DATA_VA, s.entry(G_OTHER, int(URW | PteFlag.P)), UVMF_INVLPG), note="same value again, then flush")
    s.read(note="G_OTHER")
    yield s


fixture_family(_uvm)


@fixture
def pv_multicall() -> HvScenario:
    s = pv("multicall/update-and-flush", "A multicall runs every entry and stores each return; a failing entry does not stop the others; a multicall inside a multicall is -EINVAL in its own result (xen/common/multicall.c).")
    s.read(note="caches G_DATA")
    bad = (s.maddr(G_L1, s.l1_slot(NEXT_VA)), s.entry(G_L1, int(URW | PteFlag.P)))
    s.op(Multicall((
        MmuUpdate((MmuUpdateReq(*remap_entry(s)),)),
        MmuUpdate((MmuUpdateReq(*bad),)),
        Multicall(()),
        MmuextOp((MmuextEntry(MMUEXT_INVLPG_LOCAL, DATA_VA),)),
        UpdateVaMapping(NEXT_VA, s.entry(G_SPARE, int(URW | PteFlag.P)), UVMF_INVLPG),
    )), note="remap; refused update; nested multicall; INVLPG; map NEXT_VA")
    s.read(note="G_OTHER")
    s.read(NEXT_VA, note="G_SPARE")
    return s


def _switch() -> Iterator[HvScenario]:
    for tagged in (True, False):
        tag = "tagged" if tagged else "untagged"
        s = pv(f"switch/{tag}", f"Two PV domains on one physical CPU: a context switch saves and restores each vCPU; {'with' if tagged else 'without'} tags, each domain's translations {'survive' if tagged else 'are flushed by'} the switch (counters: tlb_hit vs tlb_miss after switching back).", domains=(1, 2), tagged=tagged)
        s.read(note="domain 1")
        s.op(Switch(1))
        s.boot_pv(2)
        s.read(note="domain 2, its own G_DATA")
        s.op(Switch(0))
        s.read(note="domain 1 again")
        yield s


fixture_family(_switch)


HVM_MODES = (Mode.SHADOW, Mode.SHADOW_OOS, Mode.HAP)


def hvm(mode: Mode, name: str, description: str, **kwargs: Any) -> HvScenario:
    """An HVM guest with the standard address space and CR3 on its L4."""
    s = HvScenario(f"{mode.value}/{name}", description, mode, **kwargs)
    for domid in s.domids:
        s.build(domid)
    return s


def guest_pte(s: HvScenario, va: int, gfn: int, flags: int = int(URW | PteFlag.P)) -> None:
    """The guest stores a new PTE for ``va`` into its L1 (trapped under shadow)."""
    s.op(PteWrite(G_L1, table_index(va, Level.L1), s.entry(gfn, flags), 1))


def _hvm() -> Iterator[HvScenario]:
    how = {
        Mode.SHADOW: "the store traps and Xen re-propagates the shadow entry (an L1 change: no flush)",
        Mode.SHADOW_OOS: "the L1 goes out of sync (no trap after the first) and is resynced at INVLPG",
        Mode.HAP: "a plain store: EPT translates, nothing traps",
    }
    for mode in HVM_MODES:
        s = hvm(mode, "pte-write-then-invlpg", f"An HVM guest remaps a page by storing to its own PTE: {how[mode]}. Until the guest's INVLPG the old translation may be used, as on bare metal (SDM 4.10.4.3); after it, the new one.")
        s.read(note="caches G_DATA")
        guest_pte(s, DATA_VA, G_OTHER)
        s.read(note="old or new")
        s.op(Invlpg(DATA_VA))
        s.read(note="new")
        guest_pte(s, NEXT_VA, G_SPARE)
        s.read(NEXT_VA, note="never cached: new")
        yield s
        s = hvm(mode, "mov-cr3-flushes", "A guest MOV to CR3 flushes its non-global translations (under shadow it exits and Xen loads the shadow of the new root).")
        s.read()
        guest_pte(s, DATA_VA, G_OTHER)
        s.op(RegWrite(Register.CR3, G_L4 << PAGE_SHIFT))
        s.read(note="new")
        yield s
        s = hvm(mode, "guest-page-faults", "Faults the guest's own tables cause reach the guest with the error code and CR2 bare metal gives (shadow: reflected by Xen after walking the guest tables; HAP: delivered by the processor).")
        guest_pte(s, NEXT_VA, G_SPARE, int(PteFlag.P))
        s.read(NEXT_VA + 0x10000, note="not present: 0x4")
        s.write(NEXT_VA, 1, note="supervisor page, user write: 0x7")
        s.read(NEXT_VA, cpl=0, note="supervisor read: fine")
        s.write(NEXT_VA, 1, cpl=0, note="read-only, CR0.WP = 1: 0x3")
        s.read(NONCANONICAL_LOW, note="#GP")
        yield s
        s = hvm(mode, "accessed-dirty", "The guest sees A and D in its own PTE exactly as on bare metal (shadow: Xen sets them in the guest entry when it propagates; HAP: the processor's 2-D walk sets them). The guest reads its L1 through a read-only mapping of it.")
        guest_pte(s, NEXT_VA, G_L1, int(PteFlag.P | PteFlag.US))
        slot = NEXT_VA + table_index(DATA_VA, Level.L1) * ENTRY_SIZE
        s.read(slot, note="the PTE: no A")
        s.read(note="sets A")
        s.read(slot, note="A")
        s.write(DATA_VA, 5, note="sets D")
        s.read(slot, note="A and D")
        yield s
        for tagged in (True, False):
            tag = "tagged" if tagged else "untagged"
            s = hvm(mode, f"switch/{tag}", f"Two HVM domains on one physical CPU; {'with VPIDs their translations survive the switch' if tagged else 'without VPIDs every VM exit/entry and every switch flushes the TLB'} (counters).", domains=(1, 2), tagged=tagged)
            s.read(note="domain 1")
            s.op(Switch(1))
            s.read(note="domain 2")
            s.op(Switch(0))
            s.read(note="domain 1 again")
            yield s


fixture_family(_hvm)


# ---------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fixture:
    """A named trace with the model's expected observations."""

    name: str
    trace: Trace
    ambiguous: tuple[int, ...] = field(default=())  #: steps with more than one allowed outcome

    @property
    def path(self) -> str:
        return self.name + ".jsonl"

    def text(self) -> str:
        return dump_trace(self.trace)


def expected(trace: Trace) -> tuple[Trace, tuple[int, ...]]:
    """The trace with the model's observations, and the alternatives the TLB rules
    allow where there are any."""
    annotated = annotate(trace)
    result = check(annotate(trace, counters=False))  # the architecture's choices, not the model's costs
    if not result.clean:
        raise RefmodelError(f"{trace.header.name}: the model disagrees with itself: {result.summary()}")
    steps = list(annotated.steps)
    for index, allowed in result.ambiguous.items():
        steps[index] = replace(steps[index], allowed=allowed)
    return replace(annotated, steps=tuple(steps)), tuple(sorted(result.ambiguous))


def scenarios() -> list[Scenario | HvScenario]:
    """Every scenario of the catalogue, in catalogue order."""
    return [scenario for make in CATALOGUE for scenario in make()]


def generate(prefix: str = "") -> list[Fixture]:
    """Every fixture whose name starts with ``prefix`` (all by default), sorted by
    name; only those are computed."""
    fixtures: list[Fixture] = []
    for scenario in scenarios():
        if not scenario.name.startswith(prefix):
            continue
        trace, ambiguous = expected(scenario.trace())
        fixtures.append(Fixture(scenario.name, trace, ambiguous))
    names = [f.name for f in fixtures]
    if len(set(names)) != len(names):
        raise AssertionError("two fixtures share a name")
    return sorted(fixtures, key=lambda f: f.name)


def index_json(fixtures: list[Fixture]) -> str:
    entries = [
        {
            "name": f.name,
            "path": f.path,
            "mode": f.trace.header.mode.value,
            "operations": len(f.trace.steps),
            "ambiguous": list(f.ambiguous),
            "description": f.trace.header.description,
        }
        for f in fixtures
    ]
    index = {"refmodel_fixtures": INDEX_VERSION, "generator": generator(), "trace_version": TRACE_VERSION,
             "count": len(entries), "fixtures": entries}
    return json.dumps(index, indent=1) + "\n"


#: The version of ``index.json``'s format; its schema is ``index-schema-v2.json``.
INDEX_VERSION = 2
INDEX_SCHEMA_NAME = f"index-schema-v{INDEX_VERSION}.json"


def write_fixtures(out: str, fixtures: list[Fixture] | None = None) -> list[Fixture]:
    """Write every fixture and ``index.json`` under ``out``; returns the fixtures."""
    fixtures = generate() if fixtures is None else fixtures
    try:
        for f in fixtures:
            path = os.path.join(out, f.path)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="ascii", newline="\n") as fh:
                fh.write(f.text())
        with open(os.path.join(out, "index.json"), "w", encoding="ascii", newline="\n") as fh:
            fh.write(index_json(fixtures))
    except OSError as err:
        raise RefmodelError(f"cannot write fixtures to {out}: {err.strerror} ({err.filename})") from None
    return fixtures
