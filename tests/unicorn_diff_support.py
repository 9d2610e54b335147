"""Differential testing of the core (:mod:`refmodel.arch`) against QEMU's x86 MMU.

The oracle is :func:`refmodel.oracle.unicorn_adapter.run_on_unicorn`: QEMU 5's TCG
softmmu, driven through unicorn, executes real loads, stores, jumps, INVLPG and
MOV CR3 on a 4-level paging tree. The model is a :class:`~refmodel.arch.mmu.Mmu`
over ``PhysicalMemory(maxphyaddr=40)`` with 1 GiB pages. docs/unicorn-differential.md
explains the whole method; this module holds

* the Hypothesis strategies (:func:`cases`): paging trees with random flag bits,
  large pages, reserved bits, shared and cross-level subtables, random control
  bits, and step sequences of accesses and page-table edits;
* the comparison (:func:`compare`): run the case on unicorn, follow it on the model
  while accepting every behaviour the architecture allows, and return the first
  :class:`Divergence` (or None).

Allowed TLB behaviour (Intel SDM Vol. 3A 4.10). A processor may use, for an access,
a fresh walk of the paging structures in memory, or any translation it cached for
the page since the page was last invalidated (4.10.2.3, 4.10.4.2, 4.10.4.3; "which
translation is used may vary from one execution to another"). The comparison keeps,
next to the model, the set of *legal* translations: every translation a walk produced,
minus those an invalidation removed (4.10.4.1: INVLPG, MOV CR3 for non-global
entries, a #PF for its page). For each access every state followed yields

1. the model's own outcome (its Mmu with its TLB);
2. a fresh walk on current memory (the Mmu with no TLB entry for the page);
3. a TLB hit on each legal translation for the page that grants the access
   (:func:`refmodel.arch.mmu.usable`: a stale hit, no walk, no A/D update);
4. the outcomes only QEMU produces, each a documented deviation (:class:`Deviation`).

Unicorn's result must equal the result of one of them; every matching one is
followed (states that agree on memory and on the legal set are merged), and at the
end unicorn's memory must equal some surviving state's memory. The model's own
outcome must equal one of 2-3 (result and memory): a TLB that serves a translation
the architecture no longer allows is a model bug even when unicorn, walking afresh,
cannot show it.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from hypothesis import strategies as st

from refmodel.account.events import Counters
from refmodel.arch.control import Cr0, Cr4, Efer, Rflags
from refmodel.arch.fault import GeneralProtection, PageFault
from refmodel.arch.access import Access, AccessKind
from refmodel.arch.mmu import LoadResult, Mmu, usable
from refmodel.arch.physmem import PhysicalMemory
from refmodel.arch.tlb import Tlb, TlbEntry
from refmodel.arch.vcpu import ArchState
from refmodel.arch.walk import Translation, is_canonical
from refmodel.oracle.unicorn_adapter import (
    MAXPHYADDR,
    PAGE_SIZE,
    UcAccess,
    UcAccessKind,
    UcInvlpg,
    UcMachine,
    UcMovCr3,
    UcPhysWrite,
    UcResult,
    UcRun,
    UcStep,
)

# --------------------------------------------------------------------------
# Entry bits (SDM Vol. 3A 4.5, Tables 4-15..4-20), written out independently of
# refmodel.arch.pte so that a wrong constant there cannot hide in both sides.
# --------------------------------------------------------------------------

P, RW, US, PWT, PCD, A, D, PS, G = (1 << bit for bit in range(9))
AVL9 = 1 << 9  #: ignored (software-available)
PAT_LARGE = 1 << 12  #: PAT bit of a 2 MiB / 1 GiB leaf
LOW13 = 1 << 13  #: reserved in a 2 MiB / 1 GiB leaf (misaligned base)
RSVD40, RSVD51 = 1 << MAXPHYADDR, 1 << 51  #: bits 51:MAXPHYADDR are reserved
IGN52, IGN62 = 1 << 52, 1 << 62  #: ignored (62:59 are protection keys only with CR4.PKE)
XD = 1 << 63  #: execute-disable; reserved when IA32_EFER.NXE = 0
ADDRESS_MASK = ((1 << MAXPHYADDR) - 1) & ~0xFFF  #: bits 39:12
RESERVED_HIGH = ((1 << 52) - 1) & ~((1 << MAXPHYADDR) - 1)  #: bits 51:40
U64 = (1 << 64) - 1

#: Every address the generator puts in an entry (and every qword of a data frame)
#: lies below 2 GiB, far from the harness frames at the top of the 40-bit space.
SAFE_ADDRESS_CLEAR = ((1 << MAXPHYADDR) - 1) & ~((1 << 31) - 1)

# --------------------------------------------------------------------------
# Frame layout of a generated case
# --------------------------------------------------------------------------

ROOT, ALT_ROOT = 1, 2  #: PML4 frames: CR3 at start, and the other MOV CR3 target
PDPT_FRAMES = (3, 4)
PD_FRAMES = (5, 6)
PT_FRAMES = (7, 8)
TABLE_FRAMES = (ROOT, ALT_ROOT, *PDPT_FRAMES, *PD_FRAMES, *PT_FRAMES)
DATA_FRAMES = (9, 10, 11, 0)
LARGE_2M_BASES = (0x20_0000, 0x0)
LARGE_1G_BASES = (0x4000_0000, 0x0)

#: The table index every linear address uses at every level. None is 511, so no
#: walk reads the qword the harness owns in a PML4 frame (offset 0xFF8), and a
#: PML4 frame may safely be reused as a lower-level table (a recursive mapping).
SLOTS = (0, 1, 2, 256)
#: Offsets of 8-byte data accesses: none crosses a page, none touches 0xFF8..0xFFF.
OFFSETS = (0x0, 0x8, 0x13, 0x7F8, 0xFEF, 0xFF0)
#: Non-canonical linear addresses (#GP, SDM Vol. 1 3.3.7.1), both below the harness slot.
NON_CANONICAL = (0x0000_8000_0000_0000, 0xFFFF_0000_0000_0000)

VPID, PCID = 0, 0  #: the model's TLB tags (CR4.PCIDE = 0)
ACCESS_KINDS = {UcAccessKind.READ: AccessKind.READ, UcAccessKind.WRITE: AccessKind.WRITE,
                UcAccessKind.FETCH: AccessKind.FETCH}


def linear_address(l4: int, l3: int, l2: int, l1: int) -> int:
    """The canonical linear address with these table indices (SDM 4.5, Figure 4-8)."""
    va = l4 << 39 | l3 << 30 | l2 << 21 | l1 << 12
    return va | (0xFFFF << 48 if va >> 47 else 0)


def data_qword(frame: int, index: int) -> int:
    """The initial content of qword ``index`` of data frame ``frame``: distinct per
    (frame, index), with address bits 39:31 clear so a data frame reused as a table
    (a 2 MiB entry flipped to a table pointer) never reaches harness memory."""
    x = (frame << 12 | index) * 0x9E37_79B9_7F4A_7C15 & U64
    x ^= x >> 29
    return x & ~SAFE_ADDRESS_CLEAR


@functools.lru_cache(maxsize=None)
def data_frame(frame: int) -> bytes:
    """The initial content of a data frame (:func:`data_qword`)."""
    return b"".join(data_qword(frame, i).to_bytes(8, "little") for i in range(PAGE_SIZE // 8))


# --------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One generated test: table entries, control bits and steps.

    ``entries`` lists (frame, slot, value) of every table frame's populated slots;
    ``data_frames`` the frames filled with :func:`data_qword`.
    """

    machine: UcMachine
    entries: tuple[tuple[int, int, int], ...]
    data_frames: tuple[int, ...]
    steps: tuple[UcStep, ...]

    def memory(self) -> dict[int, bytes]:
        """The initial physical memory image (frame -> 4096 bytes)."""
        image = {frame: bytearray(data_frame(frame)) for frame in self.data_frames}
        for frame in TABLE_FRAMES:
            image[frame] = bytearray(PAGE_SIZE)
        for frame, slot, value in self.entries:
            image[frame][slot * 8 : slot * 8 + 8] = value.to_bytes(8, "little")
        return {frame: bytes(data) for frame, data in image.items()}

    def __repr__(self) -> str:
        m = self.machine
        flags = [name for name in ("cr0_wp", "efer_nxe", "cr4_smep", "cr4_smap", "cr4_pge", "rflags_ac")
                 if getattr(m, name)]
        lines = [f"Case(cr3={m.cr3:#x} {' '.join(flags) or '(all control bits clear)'}"]
        by_frame: dict[int, list[str]] = {}
        for frame, slot, value in self.entries:
            if value:
                by_frame.setdefault(frame, []).append(f"[{slot}]={describe_entry(value)}")
        for frame in sorted(by_frame):
            lines.append(f"  frame {frame:#x}: " + "  ".join(by_frame[frame]))
        lines.append(f"  data frames {', '.join(hex(f) for f in self.data_frames)}")
        lines.extend(f"  {i}: {describe_step(step)}" for i, step in enumerate(self.steps))
        return "\n".join(lines) + ")"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """Hypothesis prints falsifying examples with this (IPython's protocol)."""
        printer.text(repr(self))


_FLAG_NAMES = ((P, "P"), (RW, "RW"), (US, "US"), (PWT, "PWT"), (PCD, "PCD"), (A, "A"), (D, "D"),
               (PS, "PS"), (G, "G"), (XD, "XD"))


def describe_entry(value: int) -> str:
    """``0x5000|P|RW|US`` plus any other bit outside the address field."""
    names = [name for bit, name in _FLAG_NAMES if value & bit]
    rest = value & ~ADDRESS_MASK & ~sum(bit for bit, _ in _FLAG_NAMES)
    text = f"{value & ADDRESS_MASK:#x}" + "".join(f"|{n}" for n in names)
    return text + (f"|{rest:#x}" if rest else "")


_ERROR_BITS = ((1, "P"), (2, "W"), (4, "U"), (8, "RSVD"), (16, "I"), (32, "PK"))


def describe_result(result: UcResult) -> str:
    """``ok 0x...``, ``#PF cr2=0x... error=0x5 (P|U)`` or ``#GP``."""
    if result.kind == "ok":
        return f"ok {result.value:#x}"
    if result.kind == "gp":
        return f"#GP({result.error_code:#x})"
    bits = "|".join(name for bit, name in _ERROR_BITS if result.error_code & bit) or "0"
    return f"#PF cr2={result.cr2:#x} error={result.error_code:#x} ({bits})"


def describe_translation(entry: TlbEntry) -> str:
    """``4K 0x0->0x9000 W U D`` (rights: W writable, U user, XD; D cached dirty, G global)."""
    size = {12: "4K", 21: "2M", 30: "1G"}[entry.size.shift]
    flags = [name for name, on in (("W", entry.rights.writable), ("U", entry.rights.user),
             ("XD", entry.rights.execute_disable), ("D", entry.dirty), ("G", entry.global_page)) if on]
    return f"{size} {entry.vpn << entry.size.shift:#x}->{entry.frame:#x} {' '.join(flags) or '-'}"


def describe_step(step: UcStep) -> str:
    if isinstance(step, UcAccess):
        value = f" value={describe_entry(step.value)}" if step.kind is UcAccessKind.WRITE else ""
        return f"{step.kind.value.upper()} {step.va:#x} cpl={step.cpl}{value}"
    if isinstance(step, UcPhysWrite):
        frame, slot = step.pa >> 12, step.pa % PAGE_SIZE // 8
        return f"PHYSWRITE frame {frame:#x} slot {slot} := {describe_entry(step.value)}"
    if isinstance(step, UcInvlpg):
        return f"INVLPG {step.va:#x}"
    return f"MOV CR3 {step.cr3:#x}"


# --------------------------------------------------------------------------
# Strategies (built once: constructing Hypothesis strategies per draw is slow)
# --------------------------------------------------------------------------


class EntryKind(enum.Enum):
    """The level of table the generator means an entry for (a walk may use the
    table at another level)."""

    PML4E = "pml4e"
    PDPTE = "pdpte"
    PDE = "pde"
    PTE = "pte"


#: Bits toggled away from "present, writable, user": a harmless set (A/D preset, G,
#: PWT/PCD, ignored bits) ...
_HARMLESS = (0, A, A | D, D, G, A | G, PWT, PCD | A, AVL9 | A | D, IGN52, IGN62 | A, PWT | PCD | G | A | D)
#: ... and in about one entry in five a bit that changes the walk: not present,
#: read-only, supervisor, XD (reserved if EFER.NXE = 0), PS (reserved in a PML4E, a
#: misaligned large page in a PDPTE/PDE, PAT in a PTE), bits above MAXPHYADDR; for
#: a large leaf also its PAT bit (12, legal) and bit 13 (reserved: misaligned base).
_HARMFUL = (0,) * 40 + (P, RW, US, XD, PS, RSVD40, RSVD51, RW | US, XD | US)
_HARMFUL_LARGE = (0,) * 40 + (P, RW, US, XD, PS, RSVD40, RSVD51, LOW13, PAT_LARGE, RW | US)
#: The flag part of an entry in one draw (fewer draws make generation much faster);
#: None, one time in sixteen, stands for an all-zero entry.
_FLAGS: st.SearchStrategy[int | None] = st.sampled_from(
    tuple((P | RW | US | h) ^ x for x in _HARMFUL for h in _HARMLESS) + (None,) * 39
)
_FLAGS_LARGE: st.SearchStrategy[int | None] = st.sampled_from(
    tuple((P | RW | US | h) ^ x for x in _HARMFUL_LARGE for h in _HARMLESS) + (None,) * 39
)


def _pointers(frames: tuple[int, ...]) -> tuple[int, ...]:
    """Table pointers to ``frames`` or (about one in five) to any table frame: a
    subtable shared across levels, or a recursive PML4 entry."""
    return tuple(frame << 12 for frame in frames * 12 + TABLE_FRAMES)


#: The address part of an entry in a table of each level; in a PDPT or PD about one
#: entry in four is a large leaf (PS set, a base from LARGE_*_BASES), and a PTE
#: points to a data frame or (about one in six) a table frame, so that data accesses
#: read and write paging structures.
_ADDRESS: dict[EntryKind, st.SearchStrategy[int]] = {
    EntryKind.PML4E: st.sampled_from(_pointers(PDPT_FRAMES)),
    EntryKind.PDPTE: st.sampled_from(_pointers(PD_FRAMES) + tuple(base | PS for base in LARGE_1G_BASES) * 5),
    EntryKind.PDE: st.sampled_from(_pointers(PT_FRAMES) + tuple(base | PS for base in LARGE_2M_BASES) * 5),
    EntryKind.PTE: st.sampled_from(tuple(frame << 12 for frame in DATA_FRAMES * 10 + TABLE_FRAMES)),
}
_ANY_KIND = st.sampled_from(list(EntryKind))
_SLOT = st.sampled_from(SLOTS)
_NON_CANONICAL = st.sampled_from(NON_CANONICAL)
_ONE_IN_4 = st.integers(0, 3)
_ONE_IN_16 = st.integers(0, 15)
_N_PAGES = st.sampled_from((1, 2, 1, 2, 3))
_N_STEPS = st.integers(1, 12)
_STEP_KIND = st.integers(0, 9)
_ACCESS_KIND = st.sampled_from(list(UcAccessKind))
_OFFSET = st.sampled_from(OFFSETS)
_CPL = st.sampled_from((0, 3))
_BOOL = st.booleans()
_CR3_LOW = st.sampled_from((0, PWT, PCD))
_ROOT = st.sampled_from((ROOT, ALT_ROOT))
_EDIT_FLIP = st.sampled_from((0x3000, P, RW, US, XD, PS, A, D, G, RSVD40, 0x1000))

_FRAME_LEVEL = {ROOT: EntryKind.PML4E, ALT_ROOT: EntryKind.PML4E}
_FRAME_LEVEL.update({f: EntryKind.PDPTE for f in PDPT_FRAMES})
_FRAME_LEVEL.update({f: EntryKind.PDE for f in PD_FRAMES})
_FRAME_LEVEL.update({f: EntryKind.PTE for f in PT_FRAMES})


def draw_entry(draw: st.DrawFn, kind: EntryKind) -> int:
    """An entry for a table of level ``kind``: present, writable and user-accessible
    with a few harmless bits, and sometimes one bit that makes the walk fault, narrows
    the rights or reinterprets the entry; one in sixteen is all zeros."""
    address = draw(_ADDRESS[kind])
    large = kind in (EntryKind.PDPTE, EntryKind.PDE) and bool(address & PS)
    flags = draw(_FLAGS_LARGE if large else _FLAGS)
    return 0 if flags is None else address ^ flags


def draw_tables(draw: st.DrawFn) -> tuple[tuple[int, int, int], ...]:
    """Every table frame's entries at :data:`SLOTS`."""
    return tuple(
        (frame, slot, draw_entry(draw, _FRAME_LEVEL[frame])) for frame in TABLE_FRAMES for slot in SLOTS
    )


def draw_pages(draw: st.DrawFn) -> tuple[int, ...]:
    """One to three linear pages the steps of a case use (one in sixteen non-canonical)."""
    pages = []
    for _ in range(draw(_N_PAGES)):
        if draw(_ONE_IN_16) == 15:
            pages.append(draw(_NON_CANONICAL))
        else:
            pages.append(linear_address(*(draw(_SLOT) for _ in range(4))))
    return tuple(pages)


def draw_machine(draw: st.DrawFn) -> UcMachine:
    """CR3 (with random PWT/PCD), CR0.WP, EFER.NXE, CR4.SMEP/SMAP/PGE, RFLAGS.AC."""
    return UcMachine(
        cr3=ROOT << 12 | draw(_CR3_LOW),
        cr0_wp=draw(_BOOL),
        efer_nxe=draw(_BOOL),
        cr4_smep=draw(_BOOL),
        cr4_smap=draw(_BOOL),
        cr4_pge=draw(_BOOL),
        rflags_ac=draw(_BOOL),
    )


def initial_path(entries: Mapping[tuple[int, int], int], va: int) -> list[tuple[int, int]]:
    """The (frame, slot) of each entry a walk of ``va`` from :data:`ROOT` reads in the
    initial tables (flags other than PS ignored): where an edit is most interesting."""
    path, frame = [], ROOT
    for level in (4, 3, 2, 1):
        slot = va >> (12 + 9 * (level - 1)) & 0x1FF
        path.append((frame, slot))
        value = entries.get((frame, slot), 0)
        frame = (value & ADDRESS_MASK) >> 12
        if level in (3, 2) and value & PS or frame not in TABLE_FRAMES:
            break
    return path


Entries = tuple[tuple[int, int, int], ...]  #: (frame, slot, value) of every generated entry


def draw_edit(draw: st.DrawFn, pages: tuple[int, ...], entries: Entries) -> UcPhysWrite:
    """A page-table edit: mostly of an entry on an initial walk path of a case page;
    the new value is the initial one with one bit toggled, or a new entry."""
    initial = {(frame, slot): value for frame, slot, value in entries}
    targets = [t for va in pages if is_canonical(va) for t in initial_path(initial, va) if t in initial]
    if not targets or draw(_ONE_IN_4) == 3:
        targets = list(initial)
    frame, slot = draw(st.sampled_from(targets))
    if draw(_BOOL):
        value = initial[(frame, slot)] ^ draw(_EDIT_FLIP)
    else:
        value = draw_entry(draw, _FRAME_LEVEL[frame])
    return UcPhysWrite(frame << 12 | slot * 8, value)


def draw_steps(draw: st.DrawFn, pages: tuple[int, ...], entries: Entries) -> tuple[UcStep, ...]:
    """1..12 steps: accesses (6 in 10; a WRITE stores an entry-like value, so writes
    through a mapping of a table frame edit the tables), page-table edits (2 in 10),
    INVLPG and MOV CR3 (1 in 10 each)."""
    out: list[UcStep] = []
    for _ in range(draw(_N_STEPS)):
        what = draw(_STEP_KIND)
        if what < 6:
            kind = draw(_ACCESS_KIND)
            va = draw(st.sampled_from(pages)) + draw(_OFFSET)
            value = draw_entry(draw, draw(_ANY_KIND)) if kind is UcAccessKind.WRITE else 0
            out.append(UcAccess(kind, va, cpl=draw(_CPL), value=value))
        elif what < 8:
            out.append(draw_edit(draw, pages, entries))
        elif what == 8:
            out.append(UcInvlpg(draw(st.sampled_from(pages)) + draw(_OFFSET)))
        else:
            out.append(UcMovCr3(draw(_ROOT) << 12 | draw(_CR3_LOW)))
    return tuple(out)


def large_page_frames(pages: Iterable[int]) -> set[int]:
    """The frames a 2 MiB or 1 GiB page at one of the generator's bases maps the
    given linear pages onto, so that large-page accesses read real data."""
    frames = set()
    for va in pages:
        for base in LARGE_2M_BASES:
            frames.add((base + (va & 0x1F_FFFF)) >> 12)
        for base in LARGE_1G_BASES:
            frames.add((base + (va & 0x3FFF_FFFF)) >> 12)
    return frames


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """A whole differential case: control bits, tables, pages and steps."""
    machine = draw_machine(draw)
    entries = draw_tables(draw)
    pages = draw_pages(draw)
    data = set(DATA_FRAMES) | large_page_frames(va for va in pages if is_canonical(va))
    return Case(machine, entries, tuple(sorted(data - set(TABLE_FRAMES))), draw_steps(draw, pages, entries))


# --------------------------------------------------------------------------
# The model side
# --------------------------------------------------------------------------


class Deviation(enum.Enum):
    """QEMU behaviours the SDM does not allow, accepted for unicorn only and only in
    exactly their situation (docs/unicorn-differential.md, "Deviations")."""

    #: KNOWN_QEMU_DEVIATIONS: "A 1 GiB PDPTE gets its accessed flag set before the
    #: reserved-bit (29:13) and permission checks". SDM 4.8 sets A only in entries
    #: used for a translation; 4.5: an entry with a reserved bit set is not used.
    ACCESSED_1G_ON_FAULT = "1 GiB PDPTE accessed flag set on a fault"
    #: KNOWN_QEMU_DEVIATIONS: "A page fault does not invalidate: a translation cached
    #: for the page before the #PF (in any MMU mode) is still used afterwards". SDM
    #: 4.10.4.1: a #PF invalidates the TLB entries for the faulting page (current PCID).
    FAULT_KEEPS_TLB_ENTRIES = "#PF does not invalidate the page's TLB entries"


ALL_DEVIATIONS = frozenset(Deviation)

#: A legal translation and the CPL of the access that cached it. QEMU keeps one TLB
#: per MMU mode (CPL 3 / CPL < 3; SMAP and RFLAGS.AC are fixed per case), which only
#: matters for entries kept against the SDM (:attr:`Deviation.FAULT_KEEPS_TLB_ENTRIES`).
Cached = tuple[TlbEntry, int]


def covers(entry: TlbEntry, va: int) -> bool:
    """Whether a cached translation is for the page (of its size) containing ``va``."""
    return entry.vpn == va >> entry.size.shift


def model_state(machine: UcMachine, cpl: int = 0) -> ArchState:
    """The model's registers for the harness's machine (64-bit mode, 4-level paging)."""
    cr0 = Cr0.PE | Cr0.PG | Cr0.ET | Cr0.NE | (Cr0.WP if machine.cr0_wp else 0)
    cr4 = Cr4.PAE | (Cr4.PGE if machine.cr4_pge else 0)
    cr4 |= (Cr4.SMEP if machine.cr4_smep else 0) | (Cr4.SMAP if machine.cr4_smap else 0)
    efer = Efer.SCE | Efer.LME | Efer.LMA | (Efer.NXE if machine.efer_nxe else 0)
    rflags = Rflags.FIXED1 | (Rflags.AC if machine.rflags_ac else 0)
    return ArchState(cr0=int(cr0), cr3=machine.cr3, cr4=int(cr4), efer=int(efer), rflags=int(rflags), cpl=cpl)


MmuFactory = Callable[[PhysicalMemory, ArchState, Tlb], Mmu]


def default_mmu(mem: PhysicalMemory, state: ArchState, tlb: Tlb) -> Mmu:
    """The model under test: a bare-metal Mmu with 1 GiB pages."""
    return Mmu(mem=mem, state=state, tlb=tlb, counters=tlb.counters, vpid=VPID, page1gb=True)


def copy_tlb(tlb: Tlb, drop: Callable[[TlbEntry], bool] = lambda e: False) -> Tlb:
    """A copy of ``tlb`` (same sets, same LRU order) without the entries ``drop`` names."""
    counters = Counters()
    copy = Tlb(tlb.capacity, tlb.ways, counters=counters)
    for entry in tlb.entries():
        if not drop(entry):
            copy.fill(entry)
    return copy


@dataclass
class ModelState:
    """One state the model may be in, consistent with what unicorn did so far.

    ``legal``: translations any legal TLB may still hold (SDM 4.10.2, 4.10.4.1).
    ``kept``: translations a #PF removed from ``legal`` that QEMU still uses
    (:attr:`Deviation.FAULT_KEEPS_TLB_ENTRIES`). ``history``: the choices made.
    """

    mmu: Mmu
    legal: frozenset[Cached]
    kept: frozenset[Cached] = frozenset()
    history: tuple[str, ...] = ()

    def clone(self, factory: MmuFactory, tlb_drop: Callable[[TlbEntry], bool] = lambda e: False) -> ModelState:
        """A deep copy (memory, registers, TLB without the entries ``tlb_drop`` names)."""
        mmu = factory(self.mmu.mem.copy(), self.mmu.state, copy_tlb(self.mmu.tlb, tlb_drop))
        return ModelState(mmu, self.legal, self.kept, self.history)

    def memory_key(self) -> tuple[tuple[int, bytes], ...]:
        mem = self.mmu.mem
        return tuple((frame, mem.frame_bytes(frame)) for frame in mem.populated_frames())

    def key(self) -> tuple[object, ...]:
        """What decides every later outcome the comparison may accept."""
        return (self.memory_key(), self.legal, self.kept, self.mmu.state.cr3)


ModelOutcome = LoadResult | Translation | PageFault | GeneralProtection


def as_uc_result(step: UcAccess, outcome: ModelOutcome) -> UcResult:
    """The model's outcome in the harness's terms."""
    if isinstance(outcome, PageFault):
        return UcResult("page_fault", 0, outcome.cr2, int(outcome.error_code))
    if isinstance(outcome, GeneralProtection):
        return UcResult("gp", 0, 0, outcome.error_code)
    if step.kind is UcAccessKind.READ:
        assert isinstance(outcome, LoadResult)
        return UcResult("ok", outcome.value)
    return UcResult("ok")


def perform(state: ModelState, step: UcAccess) -> UcResult:
    """Run one access on ``state``'s Mmu (its state changes) and update ``legal``."""
    mmu = state.mmu
    mmu.state = replace(mmu.state, cpl=step.cpl)
    before = set(mmu.tlb.entries())
    outcome: ModelOutcome
    if step.kind is UcAccessKind.READ:
        outcome = mmu.load(step.va, 8)
    elif step.kind is UcAccessKind.WRITE:
        outcome = mmu.store(step.va, step.value, 8)
    else:
        outcome = mmu.fetch(step.va)
    result = as_uc_result(step, outcome)
    if isinstance(outcome, PageFault):
        # SDM 4.10.4.1: the #PF invalidates the page's entries (QEMU keeps them).
        gone = frozenset(c for c in state.legal if covers(c[0], step.va))
        state.legal -= gone
        state.kept |= gone
    elif not isinstance(outcome, GeneralProtection):
        # A walk's translation is cached (SDM 4.10.2.1); a hit adds nothing new.
        filled = set(mmu.tlb.entries()) - before
        state.legal |= {(entry, step.cpl) for entry in filled if covers(entry, step.va)}
    return result


@dataclass
class Candidate:
    """One allowed outcome of an access and the state it leads to."""

    result: UcResult
    state: ModelState
    how: str
    deviation: Deviation | None = None


def qemu_1g_pdpte_accessed(mem: PhysicalMemory, cr3: int, nxe: bool, va: int) -> int | None:
    """The address of the 1 GiB PDPTE QEMU 5 sets A in while translating ``va``
    before checking that entry's low reserved bits and access rights (its
    ``handle_mmu_fault``), or None. QEMU checks bits 51:MAXPHYADDR (and XD without
    NXE) of each entry, and PS of the PML4E, before it sets A."""
    reserved = RESERVED_HIGH | (0 if nxe else XD)
    pml4e = mem.read_u64((cr3 & ADDRESS_MASK) + (va >> 39 & 0x1FF) * 8)
    if not pml4e & P or pml4e & (reserved | PS):
        return None
    pdpte_addr = (pml4e & ADDRESS_MASK) + (va >> 30 & 0x1FF) * 8
    pdpte = mem.read_u64(pdpte_addr)
    if not pdpte & P or pdpte & reserved or not pdpte & PS:
        return None
    return pdpte_addr


def candidates(state: ModelState, step: UcAccess, factory: MmuFactory, deviations: frozenset[Deviation],
               machine: UcMachine) -> tuple[Candidate, list[Candidate]]:
    """The model's own outcome, and the allowed ones: a fresh walk, a hit on each
    legal translation that grants the access, and the outcomes of the enabled QEMU
    deviations (marked with their :class:`Deviation`)."""
    own = state.clone(factory)
    own_result = perform(own, step)
    fresh = state.clone(factory, lambda e: covers(e, step.va))
    allowed = [Candidate(perform(fresh, step), fresh, "fresh walk")]
    allowed += [_hit(state, step, entry, factory) for entry in _usable(state.legal, step, state)]
    if Deviation.ACCESSED_1G_ON_FAULT in deviations:
        allowed += _accessed_1g_on_fault(allowed[0], step, factory, machine)
    if Deviation.FAULT_KEEPS_TLB_ENTRIES in deviations:
        legal = {cached[0] for cached in state.legal}
        kept = {cached for cached in state.kept if cached[1] == step.cpl}  # QEMU: per MMU mode
        allowed += [_hit(state, step, entry, factory, Deviation.FAULT_KEEPS_TLB_ENTRIES)
                    for entry in _usable(frozenset(kept), step, state) if entry not in legal]
    return Candidate(own_result, own, "the model's own TLB"), allowed


def _usable(cached: frozenset[Cached], step: UcAccess, state: ModelState) -> list[TlbEntry]:
    """The translations for ``step``'s page that grant it (refmodel.arch.mmu.usable:
    rights allow it, and a write needs a translation cached dirty, SDM 4.8)."""
    access, ctx = Access(ACCESS_KINDS[step.kind], step.cpl), state.mmu.ctx
    entries = {entry for entry, _ in cached if covers(entry, step.va) and usable(entry, access, ctx)}
    return sorted(entries, key=repr)


def _hit(state: ModelState, step: UcAccess, entry: TlbEntry, factory: MmuFactory,
         deviation: Deviation | None = None) -> Candidate:
    """The outcome of ``step`` when the TLB holds exactly ``entry`` for its page."""
    hit = state.clone(factory, lambda e: covers(e, step.va))
    hit.mmu.tlb.fill(entry)
    result = perform(hit, step)
    how = f"TLB hit on {describe_translation(entry)}"
    if deviation is not None:
        how += " that a #PF should have removed"
        # The model continues with a legal TLB: without the entry only QEMU kept.
        hit.mmu.tlb = copy_tlb(hit.mmu.tlb, lambda e: e == entry)
    return Candidate(result, hit, how, deviation)


def _accessed_1g_on_fault(fresh: Candidate, step: UcAccess, factory: MmuFactory,
                          machine: UcMachine) -> list[Candidate]:
    """The fresh walk's #PF with the A flag QEMU sets in the 1 GiB PDPTE it reached."""
    if fresh.result.kind != "page_fault":
        return []
    mem = fresh.state.mmu.mem
    addr = qemu_1g_pdpte_accessed(mem, fresh.state.mmu.state.cr3, machine.efer_nxe, step.va)
    if addr is None or mem.read_u64(addr) & A:
        return []
    variant = fresh.state.clone(factory)
    variant.mmu.mem.write_u64(addr, mem.read_u64(addr) | A)
    how = f"fresh walk, then QEMU's A in the 1 GiB PDPTE at {addr:#x}"
    return [Candidate(fresh.result, variant, how, Deviation.ACCESSED_1G_ON_FAULT)]


def apply_other(state: ModelState, step: UcPhysWrite | UcInvlpg | UcMovCr3) -> None:
    """A step that is not an access, on the model and on the legal set."""
    mmu = state.mmu
    if isinstance(step, UcPhysWrite):
        mmu.mem.write_u64(step.pa, step.value)
    elif isinstance(step, UcInvlpg):
        mmu.state = replace(mmu.state, cpl=0)
        mmu.invlpg(step.va)
        if is_canonical(step.va):  # SDM Vol. 2A INVLPG: a no-op for a non-canonical address
            state.legal = frozenset(c for c in state.legal if not covers(c[0], step.va))
            state.kept = frozenset(c for c in state.kept if not covers(c[0], step.va))
    else:
        mmu.state = replace(mmu.state, cpl=0)
        fault = mmu.mov_cr3(step.cr3)
        assert fault is None, f"MOV CR3 {step.cr3:#x}: {fault}"
        # SDM 4.10.4.1: non-global entries go (PCID 0); QEMU flushes everything.
        state.legal = frozenset(c for c in state.legal if c[0].global_page)
        state.kept = frozenset()


# --------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Divergence:
    """The first disagreement between unicorn and everything the model allows."""

    case: Case
    where: str  #: "access 3", "final memory", ...
    detail: str

    def describe(self) -> str:
        return f"divergence at {self.where}:\n{self.detail}\ncase: {self.case!r}"


#: How many distinct model states the comparison follows at most.
MAX_STATES = 64

Runner = Callable[[Mapping[int, bytes], UcMachine, Sequence[UcStep]], UcRun]


def initial_state(case: Case, memory: Mapping[int, bytes], factory: MmuFactory) -> ModelState:
    mem = PhysicalMemory(maxphyaddr=MAXPHYADDR)
    for frame, data in memory.items():
        mem.load_frame(frame, data)
    return ModelState(factory(mem, model_state(case.machine), Tlb(counters=Counters())), frozenset())


def _merge(into: dict[tuple[object, ...], ModelState], state: ModelState) -> None:
    into.setdefault(state.key(), state)


def compare(case: Case, runner: Runner, *, factory: MmuFactory = default_mmu,
            deviations: frozenset[Deviation] = ALL_DEVIATIONS) -> Divergence | None:
    """Run ``case`` on ``runner`` (unicorn) and follow it on the model; return the
    first divergence, or None if unicorn did only what the model allows."""
    memory = case.memory()
    run = runner(memory, case.machine, case.steps)
    states = [initial_state(case, memory, factory)]
    results = iter(run.results)
    for index, step in enumerate(case.steps):
        if isinstance(step, UcAccess):
            followed = follow_access(states, index, step, next(results), factory, deviations, case.machine)
            if isinstance(followed, str):
                return Divergence(case, f"step {index} ({describe_step(step)})", followed)
            states = followed
        else:
            for state in states:
                apply_other(state, step)

    written = set().union(*(set(s.mmu.mem.populated_frames()) for s in states)) - set(memory)
    if written:
        # Frames only written during the run: supply them (as zeros) so unicorn returns them.
        memory = {**memory, **{frame: bytes(PAGE_SIZE) for frame in written}}
        again = runner(memory, case.machine, case.steps)
        assert again.results == run.results, "unicorn is not deterministic"
        run = again
    for state in states:
        if all(state.mmu.mem.frame_bytes(frame) == data for frame, data in run.memory.items()):
            return None
    return Divergence(case, "final memory", _memory_diff(run.memory, states))


def follow_access(states: list[ModelState], index: int, step: UcAccess, observed: UcResult,
                  factory: MmuFactory, deviations: frozenset[Deviation],
                  machine: UcMachine) -> list[ModelState] | str:
    """The states that continue from ``states`` through an access whose result unicorn
    reported as ``observed``; or why there are none."""
    merged: dict[tuple[object, ...], ModelState] = {}
    offered: list[str] = []
    for state in states:
        own, allowed = candidates(state, step, factory, deviations, machine)
        twin = next((c for c in allowed if c.deviation is None and c.result == own.result
                     and c.state.memory_key() == own.state.memory_key()), None)
        if twin is None:
            return _model_illegal(state, own, allowed)
        # The model's own state comes first: when it agrees, the model keeps its TLB.
        own.state.legal, own.state.kept = twin.state.legal, twin.state.kept
        for candidate in [replace(own, how=f"{own.how} (= {twin.how})"), *allowed]:
            offered.append(f"{candidate.how}: {describe_result(candidate.result)}")
            if candidate.result == observed:
                candidate.state.history += (f"{index}: {candidate.how}",)
                _merge(merged, candidate.state)
    if not merged:
        listing = "\n  ".join(dict.fromkeys(offered))
        return f"unicorn: {describe_result(observed)}\nthe model allows:\n  {listing}"
    if len(merged) > MAX_STATES:
        raise AssertionError(f"more than {MAX_STATES} model states after step {index}: case too ambiguous")
    return list(merged.values())


def _model_illegal(state: ModelState, own: Candidate, allowed: list[Candidate]) -> str:
    lines = [f"the model's own outcome {describe_result(own.result)} is not one the architecture allows",
             f"  legal translations: {sorted({describe_translation(c[0]) for c in state.legal})}",
             f"  model TLB: {[describe_translation(e) for e in state.mmu.tlb.entries()]}"]
    lines += [f"  allowed: {c.how}: {describe_result(c.result)}" for c in allowed if c.deviation is None]
    return "\n".join(lines)


def _memory_diff(final: Mapping[int, bytes], states: list[ModelState]) -> str:
    """The qwords in which unicorn's final memory differs from the closest state."""
    def diffs(state: ModelState) -> list[tuple[int, int, int, int]]:
        out = []
        for frame, data in sorted(final.items()):
            ours = state.mmu.mem.frame_bytes(frame)
            for offset in range(0, PAGE_SIZE, 8):
                if data[offset : offset + 8] != ours[offset : offset + 8]:
                    theirs = int.from_bytes(data[offset : offset + 8], "little")
                    mine = int.from_bytes(ours[offset : offset + 8], "little")
                    out.append((frame, offset, theirs, mine))
        return out

    best = min(states, key=lambda s: len(diffs(s)))
    lines = [f"unicorn's memory matches none of {len(states)} model state(s); closest (choices: "
             f"{'; '.join(best.history) or 'none'}):"]
    for frame, offset, theirs, mine in diffs(best):
        lines.append(f"  frame {frame:#x} qword {offset // 8}: unicorn {describe_entry(theirs)}, "
                     f"model {describe_entry(mine)} (differ in {theirs ^ mine:#x})")
    return "\n".join(lines)
