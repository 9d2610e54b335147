"""Run x86-64 4-level paging accesses on a real MMU: QEMU's TCG softmmu, via unicorn.

This module is a *test oracle* for the reference model.  It deliberately depends
on nothing else in :mod:`refmodel`: inputs and outputs are plain ints and bytes,
frozen dataclasses and enums.  Section numbers refer to the Intel SDM Vol. 3A
(chapter 4, "Paging") unless stated otherwise.

What it does
============
:func:`run_on_unicorn` takes a physical memory image (``frame number -> 4096
bytes``), a paging configuration (:class:`UcMachine`) and a list of steps
(:data:`UcStep`).  It puts unicorn's x86-64 CPU (QEMU 5.0 TCG, CPU model
Skylake-Server: NX, SMEP, SMAP, 1 GiB pages) into IA-32e mode with 4-level
paging (§4.5), ``CR3`` pointing at the caller's PML4, and executes every step as
a real instruction, so that each access goes through QEMU's software TLB and,
on a miss, QEMU's own page walker (unicorn's ``UC_TLB_CPU`` mode):

* :class:`UcAccess` READ  -> ``mov rax, [rbx]`` (8-byte load) at CPL 0 or 3;
* :class:`UcAccess` WRITE -> ``mov [rbx], rax`` (8-byte store);
  (these harness stubs end with INT3, which the harness's interrupt hook takes
  as "done");
* :class:`UcAccess` FETCH -> ``jmp rbx``, stopping when the CPU is about to
  execute at the target.  With its translated blocks flushed first (else its
  jump cache could serve a block at the target without any translation), QEMU
  must translate the target page with an instruction-fetch access before it can
  look up or translate code there, so the fetch is permission-checked (§4.6),
  A flags are set (§4.8) and a fault is reported, but no byte at the target is
  decoded or executed and memory is not changed.  ``UcResult.value`` of a FETCH
  is always 0.  (Implementation detail:
  a page-aligned target ``va`` is jumped to at ``va + 1`` -- same page, hence
  same translation -- and reported with ``CR2 = va``; see
  :meth:`UnicornEngine._access` for why.)
* :class:`UcInvlpg` -> ``invlpg [rbx]`` at CPL 0 (§4.10.4.1);
* :class:`UcMovCr3` -> ``mov cr3, rbx`` at CPL 0 (§4.10.4.1);
* :class:`UcPhysWrite` -> ``uc.mem_write`` of 8 bytes straight into physical
  memory, with no TLB invalidation.  QEMU's TLB keeps using a translation it
  cached before the edit until INVLPG / MOV CR3, as hardware may (§4.10.4.2,
  §4.10.4.3); the tests check this.

Every :class:`UcAccess` yields one :class:`UcResult`: ``ok``, ``page_fault``
(vector 14, CR2 and error code) or ``gp`` (vector 13, e.g. a non-canonical
linear address, SDM Vol. 1 §3.3.7.1).

Error codes
===========
unicorn never delivers an exception through the IDT: it calls the
``UC_HOOK_INTR`` hook with the vector number only.  QEMU keeps the error code
in ``CPUX86State.error_code``, which lies in the CPU context copied by
``uc_context_save``.  The engine finds that field once at start-up (it locates
the ``dr[8]`` array by writing distinctive debug-register values; in QEMU 5's
``CPUX86State`` the error code is the ``int`` 16 bytes before it) and validates
the location with six page faults whose error codes are unambiguous.  So the
error code is *observed*, every bit QEMU computes: P (bit 0), W/R (1), U/S (2),
RSVD (3), I/D (4) and PK (5; always 0 here since CR4.PKE = 0), §4.7 Figure 4-12.
The SS, HLAT and SGX bits do not exist in QEMU 5 and are always 0.

unicorn also never clears QEMU's "exception in flight" field
(``old_exception``), so a second fault would be turned into #DF and a third
into a triple fault (SDM §6.15, Table 6-5).  The engine resets it through the
same saved context after every exception, and after every run without one it
checks that it is still clear: a set value would reveal a fault raised by some
hidden translation (see :data:`KNOWN_QEMU_DEVIATIONS`), i.e. a page walk the
harness did not intend, and raises :class:`HarnessError`.

Harness-reserved resources
==========================
The harness has its own code pages, GDT, TSS and kernel stack, used to switch
between CPL 0 and CPL 3 without touching caller memory:

* PML4 slot :data:`HARNESS_PML4_SLOT` (511), i.e. linear addresses
  ``[HARNESS_VA_BASE, 2**64)``.  The harness writes its PML4E (P, R/W, U/S and
  A preset, so the CPU never writes it) into the last qword (offset 0xFF8) of
  **every frame used as a PML4** (``UcMachine.cr3`` and every
  ``UcMovCr3.cr3``).  The caller's value of that qword is ignored and put back
  in the returned memory.  So the caller's tables must not give that qword a
  meaning (e.g. by also using a PML4 frame as a PDPT/PD/PT); accesses and
  INVLPGs to linear addresses in slot 511, and a :class:`UcPhysWrite` to that
  qword, are rejected with :class:`ValueError`.
* Physical frames ``[HARNESS_FRAME_BASE, HARNESS_FRAME_LIMIT)`` (the top MiB
  below ``2**MAXPHYADDR``).  Caller frames must lie below
  :data:`HARNESS_FRAME_BASE`, and caller translations must not map harness
  frames.  After each run the harness checks that its page tables, code and
  GDT are unmodified and raises :class:`HarnessError` otherwise (a *read* of a
  harness frame through a caller mapping is not detected).

A/D updates made on behalf of the harness (code fetches, GDT/TSS reads, stack
pushes) can only land in harness frames, and even there every harness entry is
created with A=1 (and D=1 for leaves), so QEMU never writes them.

Caller physical memory ``[0, HARNESS_PHYS_BASE)`` is one unicorn MMIO region
backed by a sparse ``dict`` of frames in Python: page walks, A/D updates and
data accesses all go through it, memory outside the supplied frames reads as
zero, and :class:`UcPhysWrite` simply updates the ``dict`` (so it cannot
disturb QEMU's TLB or translated code).  QEMU's TLB caches translations to MMIO
pages like any other (only the data access itself is a callback).  Frames
written but not supplied are not part of the returned memory.

Other notes
===========
* EFER.SCE (needed by SYSRET), CR4.PAE, EFER.LME/LMA and CR0.PE/PG are always
  set; none of them is a caller choice.
* Control registers, RFLAGS and memory are reloaded and QEMU's whole TLB is
  flushed at the start of every run, so runs are independent although the
  engine (and the harness code QEMU has translated) is reused for speed.
* READ/WRITE are 8-byte accesses; one that crosses a 4 KiB boundary is two
  translations (QEMU splits it), and a fault on the second page reports CR2 =
  the first byte of that page.  Differential tests should use accesses that do
  not cross pages (see :data:`KNOWN_QEMU_DEVIATIONS` for the A/D behaviour).
* QEMU's TLB is direct-mapped on the low bits of the page number (64..256 sets
  per MMU mode, plus a small victim TLB), so a cached translation can be
  evicted by another fill, including fills for the harness's own pages (which
  sit at PT slots 0x1FC..0x1FF, i.e. page numbers ending in 0x3C..0x3F /
  0xFC..0xFF).  Whether a stale translation is still used after a
  :class:`UcPhysWrite` is therefore a "may" (as it is architecturally).
* Not thread-safe: use one :class:`UnicornEngine` per thread or process
  (:func:`run_on_unicorn` keeps one per process).

Deviations of QEMU 5 / unicorn 2.1.4 from the SDM found while writing this
harness are listed in :data:`KNOWN_QEMU_DEVIATIONS`.
"""

from __future__ import annotations

import ctypes
import enum
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import unicorn as _unicorn_module
from unicorn import x86_const as _x86_const_module

__all__ = [
    "HARNESS_FRAME_BASE",
    "HARNESS_FRAME_LIMIT",
    "HARNESS_PHYS_BASE",
    "HARNESS_PML4_SLOT",
    "HARNESS_VA_BASE",
    "KNOWN_QEMU_DEVIATIONS",
    "LINEAR_ADDRESS_BITS",
    "MAXPHYADDR",
    "PAGE_SIZE",
    "PF_ERR_ID",
    "PF_ERR_P",
    "PF_ERR_PK",
    "PF_ERR_RSVD",
    "PF_ERR_US",
    "PF_ERR_WR",
    "HarnessError",
    "UcAccess",
    "UcAccessKind",
    "UcInvlpg",
    "UcMachine",
    "UcMovCr3",
    "UcPhysWrite",
    "UcResult",
    "UcResultKind",
    "UcRun",
    "UcStep",
    "UnicornEngine",
    "run_on_unicorn",
]

# --------------------------------------------------------------------------
# Architectural constants
# --------------------------------------------------------------------------

PAGE_SIZE: Final = 4096
"""Size of a frame / 4 KiB page."""

MAXPHYADDR: Final = 40
"""Physical-address width of unicorn's x86-64 CPU (QEMU TCG default
``phys-bits``), as reported by CPUID.80000008H:EAX[7:0] (§4.1.4); checked when
an engine starts.  QEMU treats entry bits 51:40 as reserved (§4.5, Tables
4-15..4-20); bits 62:52 are ignored."""

LINEAR_ADDRESS_BITS: Final = 48
"""4-level paging translates 48-bit linear addresses (§4.5)."""

# Page-fault error-code bits (§4.7, Figure 4-12).
PF_ERR_P: Final = 1 << 0
PF_ERR_WR: Final = 1 << 1
PF_ERR_US: Final = 1 << 2
PF_ERR_RSVD: Final = 1 << 3
PF_ERR_ID: Final = 1 << 4
PF_ERR_PK: Final = 1 << 5

# --------------------------------------------------------------------------
# Harness-reserved resources
# --------------------------------------------------------------------------

HARNESS_PML4_SLOT: Final = 511
"""PML4 index owned by the harness (its PML4E is written at offset 0xFF8 of
every frame used as a PML4)."""

HARNESS_VA_BASE: Final = 0xFFFF_FF80_0000_0000
"""First (canonical) linear address translated through PML4 slot 511."""

HARNESS_FRAME_LIMIT: Final = 1 << (MAXPHYADDR - 12)
"""One past the highest frame number the CPU can address."""

HARNESS_FRAME_BASE: Final = HARNESS_FRAME_LIMIT - 256
"""Lowest harness-reserved frame number: frames ``>=`` this (physical addresses
``>= HARNESS_PHYS_BASE`` = 0xFF_FFF0_0000) belong to the harness."""

HARNESS_PHYS_BASE: Final = HARNESS_FRAME_BASE * PAGE_SIZE

KNOWN_QEMU_DEVIATIONS: Final[tuple[str, ...]] = (
    "Global pages are not special: MOV to CR3 flushes every TLB entry, G=1 ones "
    "included (QEMU ignores the G flag; §4.10.2.4 and §4.10.4.1 say global "
    "translations survive MOV CR3).  Allowed, since a TLB may drop entries at "
    "any time, but hardware may keep a stale global translation where QEMU does not.",
    "A 1 GiB PDPTE gets its accessed flag set before the reserved-bit (29:13) and "
    "permission checks, so A is set even when the access page-faults on that very "
    "entry (reserved bit or protection).  2 MiB and 4 KiB leaves get A only on "
    "success.  §4.8 sets A on entries used for a translation; a faulting access "
    "has none (§4.7), and an entry with a reserved bit set is never used (§4.5).",
    "No paging-structure caches and no split ITLB/DTLB: a TLB miss re-walks all "
    "levels from CR3 in current memory, and one TLB entry per 4 KiB page and MMU "
    "mode (CPL 3 / CPL<3 with SMAP checks / CPL<3 without) serves reads, writes "
    "and fetches (§4.10.3 allows but does not require such caches).",
    "Only permissions are cached: a TLB entry is consulted only if it grants the "
    "access; otherwise the access re-walks memory.  So a stale entry never causes "
    "a page fault, and permission upgrades (R/W 0->1, XD 1->0, P 0->1) and writes "
    "to clean (D=0) pages take effect without INVLPG.  Allowed (§4.10.4.3), "
    "but hardware may fault on, or write through, the stale entry.",
    "A page fault does not invalidate: a translation cached for the page before the "
    "#PF (in any MMU mode) is still used afterwards, e.g. a read through a read-only "
    "entry after a write faulted on the PTE made not present.  §4.10.4.1: a #PF "
    "invalidates the TLB entries for the faulting page number (current PCID), so "
    "the fault recurs unless memory changes.",
    "Large pages are cached per 4 KiB: after a page-table edit, an untouched 4 KiB "
    "part of a 2 MiB/1 GiB page translates with the new entry while a touched "
    "part stays stale until invalidated (allowed, §4.10.2.3, §4.10.4.3).",
    "The TLB is direct-mapped (64..256 sets per MMU mode) with an 8-entry victim "
    "TLB that only matches entries without flag bits (such as the MMIO flag of "
    "every caller page here), so a translation evicted by a conflicting fill is "
    "re-walked on its next use.  Allowed (TLB capacity is implementation-specific).",
    "unicorn never finishes exception delivery, so QEMU's 'exception in flight' "
    "state is not cleared and the next #PF would be reported as #DF and the one "
    "after as a triple fault (SDM §6.15 Table 6-5 concerns faults *during* "
    "delivery).  The harness resets that state after every exception.",
    "unicorn side effects (not QEMU's): after each emu_start it translates, as an "
    "instruction fetch, the byte before the stop address; uc_mem_unmap translates "
    "the unmapped *physical* range as if it were linear addresses; uc_mem_map "
    "flushes the whole TLB.  Each walks page tables or drops translations behind "
    "the guest's back.  The harness avoids them: page-aligned FETCH targets are "
    "entered at va+1, stubs end with INT3 and run with a stop address in their "
    "own page, and caller memory is one permanent MMIO region (never remapped).",
    "An 8-byte store that crosses into a page where it faults first translates the "
    "first page for writing, setting its A and D flags, and then faults with CR2 = "
    "the start of the second page; nothing is stored.  (§4.8 ties D to an actual "
    "write; avoid page-crossing accesses in differential tests.)",
    "A jump to a non-canonical address faults (#GP(0)) on the fetch at the target "
    "rather than on the jump (SDM Vol. 1 §3.3.7.1); same vector, different RIP "
    "(RIP is not reported by this harness).",
)
"""QEMU 5 (unicorn 2.1.4) behaviours that differ from the SDM or are one narrow
choice among those it allows; each was observed while building this harness."""


class HarnessError(RuntimeError):
    """The harness misbehaved or a harness reservation was violated."""


# --------------------------------------------------------------------------
# Public data types
# --------------------------------------------------------------------------


class UcAccessKind(enum.Enum):
    """Kind of linear-address access; §4.6 distinguishes data reads, data
    writes and instruction fetches."""

    READ = "read"
    WRITE = "write"
    FETCH = "fetch"


@dataclass(frozen=True)
class UcAccess:
    """One access to linear address ``va`` at privilege level ``cpl``.

    ``cpl`` is 0 (supervisor-mode access) or 3 (user-mode access), §4.6.
    READ and WRITE are 8-byte accesses; ``value`` is the 8-byte value a WRITE
    stores, little endian (ignored otherwise).  FETCH transfers control to ``va``
    and stops before anything there is decoded or executed.
    """

    kind: UcAccessKind
    va: int
    cpl: int = 0
    value: int = 0


@dataclass(frozen=True)
class UcPhysWrite:
    """An 8-byte little-endian store of ``value`` to physical address ``pa``
    (8-aligned) by "someone else": not through the MMU, no TLB invalidation."""

    pa: int
    value: int


@dataclass(frozen=True)
class UcInvlpg:
    """``INVLPG [va]`` executed at CPL 0 (§4.10.4.1)."""

    va: int


@dataclass(frozen=True)
class UcMovCr3:
    """``MOV CR3, cr3`` executed at CPL 0 (§4.10.4.1; CR4.PCIDE is 0)."""

    cr3: int


UcStep = UcAccess | UcPhysWrite | UcInvlpg | UcMovCr3
"""One step of a run."""

UcResultKind = Literal["ok", "page_fault", "gp"]


@dataclass(frozen=True)
class UcResult:
    """Outcome of one :class:`UcAccess`.

    * ``kind``: ``"ok"``, ``"page_fault"`` (#PF, vector 14) or ``"gp"``
      (#GP, vector 13).
    * ``value``: the 8 bytes loaded (little endian) for an ``ok`` READ; 0 for
      WRITE, FETCH and faults.
    * ``cr2``: for a page fault, CR2: the access's ``va``, or for a READ/WRITE
      crossing into a faulting page the first byte of that page (§4.7); else 0.
    * ``error_code``: the error code QEMU pushed (for #PF, §4.7 Figure 4-12;
      0 for the #GP of a non-canonical address); 0 for ``ok``.
    """

    kind: UcResultKind
    value: int = 0
    cr2: int = 0
    error_code: int = 0


@dataclass(frozen=True)
class UcMachine:
    """Paging-related control state (§4.1.3, §4.6).

    ``cr3``: physical address of the PML4 (bits 3/4 = PWT/PCD accepted and
    ignored; CR4.PCIDE is 0).  ``rflags_ac``: RFLAGS.AC, which matters for
    supervisor-mode data accesses when ``cr4_smap`` is set (§4.6.1).
    """

    cr3: int
    cr0_wp: bool = True
    efer_nxe: bool = True
    cr4_smep: bool = False
    cr4_smap: bool = False
    cr4_pge: bool = False
    rflags_ac: bool = False


@dataclass(frozen=True)
class UcRun:
    """Outcome of :func:`run_on_unicorn`.

    ``results``: one entry per :class:`UcAccess`, in step order.
    ``memory``: final contents of exactly the frames the caller supplied (with
    the caller's own qword at offset 0xFF8 of every PML4 frame, see the module
    docstring).
    """

    results: tuple[UcResult, ...]
    memory: dict[int, bytes]


# --------------------------------------------------------------------------
# Typed facade over unicorn (its bundled annotations are incomplete and mypy
# resolves its Python-2 module), so everything untyped stays in this section.
# --------------------------------------------------------------------------

_uc_mod: Any = _unicorn_module
_uc_x86: Any = _x86_const_module

_REG_RAX: Final[int] = _uc_x86.UC_X86_REG_RAX
_REG_RBX: Final[int] = _uc_x86.UC_X86_REG_RBX
_REG_RCX: Final[int] = _uc_x86.UC_X86_REG_RCX
_REG_RDX: Final[int] = _uc_x86.UC_X86_REG_RDX
_REG_R11: Final[int] = _uc_x86.UC_X86_REG_R11
_REG_R12: Final[int] = _uc_x86.UC_X86_REG_R12
_REG_RIP: Final[int] = _uc_x86.UC_X86_REG_RIP
_REG_RFLAGS: Final[int] = _uc_x86.UC_X86_REG_RFLAGS
_REG_CR0: Final[int] = _uc_x86.UC_X86_REG_CR0
_REG_CR2: Final[int] = _uc_x86.UC_X86_REG_CR2
_REG_CR3: Final[int] = _uc_x86.UC_X86_REG_CR3
_REG_CR4: Final[int] = _uc_x86.UC_X86_REG_CR4
_REG_GDTR: Final[int] = _uc_x86.UC_X86_REG_GDTR
_REG_TR: Final[int] = _uc_x86.UC_X86_REG_TR
_REG_DR: Final[tuple[int, ...]] = tuple(getattr(_uc_x86, f"UC_X86_REG_DR{i}") for i in range(8))


class _Uc:
    """The few unicorn operations the engine uses, with types."""

    def __init__(self) -> None:
        raw: Any = _uc_mod.Uc(_uc_mod.UC_ARCH_X86, _uc_mod.UC_MODE_64)
        # Must precede anything that creates the vCPU.
        raw.ctl_set_cpu_model(_uc_x86.UC_CPU_X86_SKYLAKE_SERVER)
        raw.ctl_set_tlb_mode(_uc_mod.UC_TLB_CPU)
        self._raw = raw
        self._ctx: Any = None

    def reg_read(self, reg: int) -> int:
        return int(self._raw.reg_read(reg))

    def reg_write(self, reg: int, value: int) -> None:
        self._raw.reg_write(reg, value)

    def reg_write_mmr(self, reg: int, selector: int, base: int, limit: int, flags: int) -> None:
        """Write GDTR/TR (selector, base, limit, access flags)."""
        self._raw.reg_write(reg, (selector, base, limit, flags))

    def msr_write(self, msr: int, value: int) -> None:
        self._raw.msr_write(msr, value)

    def mem_map(self, address: int, size: int) -> None:
        self._raw.mem_map(address, size)

    def mmio_map(
        self,
        address: int,
        size: int,
        read: Callable[[int, int], int],
        write: Callable[[int, int, int], None],
    ) -> None:
        """Back ``[address, address + size)`` by ``read(offset, size) -> value``
        and ``write(offset, size, value)`` (accesses of at most 4 bytes)."""

        def read_cb(uc: Any, offset: int, size: int, user_data: Any) -> int:
            return read(offset, size)

        def write_cb(uc: Any, offset: int, size: int, value: int, user_data: Any) -> None:
            write(offset, size, value)

        self._raw.mmio_map(address, size, read_cb, None, write_cb, None)

    def mem_read(self, address: int, size: int) -> bytes:
        return bytes(self._raw.mem_read(address, size))

    def mem_write(self, address: int, data: bytes) -> None:
        self._raw.mem_write(address, data)

    def emu_start(self, begin: int, until: int) -> None:
        """Run from ``begin`` until ``until`` is reached (or a hook stops it)."""
        try:
            self._raw.emu_start(begin, until)
        except _uc_mod.UcError as exc:
            raise HarnessError(f"unicorn stopped with {exc}") from exc

    def emu_stop(self) -> None:
        self._raw.emu_stop()

    def flush_tlb(self) -> None:
        self._raw.ctl(_uc_mod.UC_CTL_TLB_FLUSH, _uc_mod.UC_CTL_IO_WRITE)

    def flush_tb(self) -> None:
        """Drop every translated block and the jump cache (not the TLB)."""
        self._raw.ctl_flush_tb()

    def hook_interrupt(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(vector)`` on every exception / interrupt."""

        def hook(uc: Any, intno: int, user_data: Any) -> None:
            callback(intno)

        self._raw.hook_add(_uc_mod.UC_HOOK_INTR, hook)

    def context_blob(self) -> bytes:
        """Snapshot the CPU context (``uc_context`` header + ``CPUX86State`` prefix)."""
        self.context_capture()
        return bytes(self._ctx)

    def context_capture(self) -> int:
        """Save the CPU context into a reused buffer; return the buffer's address."""
        if self._ctx is None:
            self._ctx = self._raw.context_save()
        else:
            self._raw.context_update(self._ctx)
        address = self._ctx.context.value
        assert isinstance(address, int)
        return address

    def context_restore(self) -> None:
        """Load the CPU context from the buffer of the last :meth:`context_capture`."""
        self._raw.context_restore(self._ctx)


# --------------------------------------------------------------------------
# Harness layout
# --------------------------------------------------------------------------

_U64 = (1 << 64) - 1
_PFN_MASK = ((1 << MAXPHYADDR) - 1) & ~0xFFF
_PML4_SLOT_OFFSET = HARNESS_PML4_SLOT * 8

# Paging-entry flag bits (Tables 4-15..4-20).
_P, _RW, _US, _A, _D = 1 << 0, 1 << 1, 1 << 2, 1 << 5, 1 << 6

# Control-register / MSR bits.
_CR0_PE, _CR0_WP, _CR0_PG = 1 << 0, 1 << 16, 1 << 31
_CR4_PAE, _CR4_PGE, _CR4_SMEP, _CR4_SMAP = 1 << 5, 1 << 7, 1 << 20, 1 << 21
_EFER_SCE, _EFER_LME, _EFER_LMA, _EFER_NXE = 1 << 0, 1 << 8, 1 << 10, 1 << 11
_RFLAGS_FIXED, _RFLAGS_AC = 1 << 1, 1 << 18
_MSR_EFER, _MSR_STAR = 0xC000_0080, 0xC000_0081

# Harness frames (offsets from HARNESS_FRAME_BASE).
_HF_PDPT, _HF_PD, _HF_PT, _HF_KCODE, _HF_UCODE, _HF_GDT, _HF_KSTACK = range(7)
_HARNESS_FRAMES: Final = 7


def _hpa(index: int) -> int:
    """Physical address of harness frame ``index``."""
    return HARNESS_PHYS_BASE + index * PAGE_SIZE


# Harness linear pages: PML4[511] -> PDPT[0] -> PD[0] -> PT[slot].  The last PT
# slots keep the harness pages out of the TLB sets of small caller addresses.
_PT_KCODE, _PT_UCODE, _PT_GDT, _PT_KSTACK = 0x1FC, 0x1FD, 0x1FE, 0x1FF
_KCODE_VA: Final = HARNESS_VA_BASE + _PT_KCODE * PAGE_SIZE
_UCODE_VA: Final = HARNESS_VA_BASE + _PT_UCODE * PAGE_SIZE
_GDT_VA: Final = HARNESS_VA_BASE + _PT_GDT * PAGE_SIZE
_KSTACK_VA: Final = HARNESS_VA_BASE + _PT_KSTACK * PAGE_SIZE
_TSS_OFFSET: Final = 0x800
_TSS_VA: Final = _GDT_VA + _TSS_OFFSET

# Selectors (SDM §3.4.2; IA-32e call gates §5.8.3.1; SYSRET in Vol. 2B).
_SEL_KCODE = 0x08
_SEL_KDATA = 0x10
_SEL_STAR_USER_BASE = 0x18  # SYSRET loads CS = base+16 | 3, SS = base+8 | 3
_SEL_UDATA = 0x20 | 3
_SEL_UCODE = 0x28 | 3
_SEL_GATE = 0x30 | 3  # 16-byte call gate at GDT offsets 0x30..0x3F
_SEL_TSS = 0x40  # 16-byte TSS descriptor at 0x40..0x4F
_GDT_LIMIT: Final = _SEL_TSS + 16 - 1

# Stub offsets in the kernel (CPL 0) and user (CPL 3) code pages.
_K_READ, _K_WRITE, _K_FETCH, _K_INVLPG, _K_MOVCR3 = 0x00, 0x10, 0x20, 0x30, 0x40
_K_SYSRET, _K_GATE_ENTRY, _K_CPUID = 0x50, 0x60, 0x70
_U_READ, _U_WRITE, _U_FETCH, _U_CALLGATE, _U_FARPTR = 0x00, 0x10, 0x20, 0x30, 0x40
# The READ/WRITE/INVLPG/MOV CR3/CPUID stubs end with INT3, which the interrupt
# hook treats as "done".  They are *not* stopped with unicorn's ``until``
# address: unicorn re-translates the (empty) stop block on every run, which
# costs time and ~230 bytes of never-reclaimed code buffer per run.  Their
# runs get a never-reached ``until`` address in the code page of the privilege
# level they end at: after each run unicorn translates ``until - 1`` for an
# instruction fetch at the current CPL, which must be a TLB hit (a kernel page
# at CPL 3 would raise a hidden #PF and leave QEMU's exception state dirty).
_UNREACHED = 0x801

_INSN_READ = bytes.fromhex("488b03")  # mov rax, [rbx]
_INSN_WRITE = bytes.fromhex("488903")  # mov [rbx], rax
_INSN_JMP_RBX = bytes.fromhex("ffe3")  # jmp rbx
_INSN_INVLPG = bytes.fromhex("0f013b")  # invlpg [rbx]
_INSN_MOVCR3 = bytes.fromhex("0f22db")  # mov cr3, rbx
_INSN_SYSRETQ = bytes.fromhex("480f07")  # sysretq: rip <- rcx, rflags <- r11, CPL 3
_INSN_JMP_R12 = bytes.fromhex("41ffe4")  # jmp r12
_INSN_CPUID = bytes.fromhex("0fa2")  # cpuid
# call far [rip + disp32], m16:32 far pointer to the call gate (offset ignored)
_INSN_CALLF = bytes.fromhex("ff1d") + struct.pack("<i", _U_FARPTR - (_U_CALLGATE + 6))

_VEC_BP, _VEC_GP, _VEC_PF = 3, 13, 14


def _q(value: int) -> bytes:
    return struct.pack("<Q", value & _U64)


def _code_page(stubs: Sequence[tuple[int, bytes]]) -> bytes:
    """A code page of HLT (0xF4) bytes with the given stubs placed in it."""
    page = bytearray(b"\xf4" * PAGE_SIZE)
    for offset, code in stubs:
        page[offset : offset + len(code)] = code
    return bytes(page)


def _then_int3(offset: int, code: bytes) -> tuple[int, bytes]:
    """Stub at ``offset``: ``code`` followed by INT3 (vector 3 = stub done)."""
    return offset, code + b"\xcc"


def _segment_descriptor(access: int, flags: int) -> int:
    """Flat code/data descriptor: base 0, limit 0xFFFFF, given access byte
    (accessed bit preset) and G/D/L flags nibble (SDM §3.4.5)."""
    return 0xFFFF | (access << 40) | (0xF << 48) | (flags << 52)


def _system_descriptor(kind: int, offset_or_base: int, selector_or_limit: int) -> tuple[int, int]:
    """16-byte IA-32e system descriptor (call gate or TSS), as two qwords."""
    if kind == 0xEC:  # call gate, DPL 3, present (SDM §5.8.3.1, Figure 5-8)
        low = (
            (offset_or_base & 0xFFFF)
            | (selector_or_limit << 16)
            | (kind << 40)
            | (((offset_or_base >> 16) & 0xFFFF) << 48)
        )
    else:  # 64-bit TSS descriptor (SDM §7.2.3, Figure 7-4)
        low = (
            selector_or_limit
            | ((offset_or_base & 0xFF_FFFF) << 16)
            | (kind << 40)
            | (((offset_or_base >> 24) & 0xFF) << 56)
        )
    return low, offset_or_base >> 32


def _harness_image() -> dict[int, bytes]:
    """Contents of the harness frames, keyed by harness frame index."""
    upper = _P | _RW | _US | _A

    def table(entries: Mapping[int, int]) -> bytes:
        data = bytearray(PAGE_SIZE)
        for index, entry in entries.items():
            data[index * 8 : index * 8 + 8] = _q(entry)
        return bytes(data)

    kcode = _code_page(
        [
            _then_int3(_K_READ, _INSN_READ),
            _then_int3(_K_WRITE, _INSN_WRITE),
            (_K_FETCH, _INSN_JMP_RBX),
            _then_int3(_K_INVLPG, _INSN_INVLPG),
            _then_int3(_K_MOVCR3, _INSN_MOVCR3),
            (_K_SYSRET, _INSN_SYSRETQ),
            (_K_GATE_ENTRY, _INSN_JMP_R12),
            _then_int3(_K_CPUID, _INSN_CPUID),
        ]
    )
    ucode = _code_page(
        [
            _then_int3(_U_READ, _INSN_READ),
            _then_int3(_U_WRITE, _INSN_WRITE),
            (_U_FETCH, _INSN_JMP_RBX),
            (_U_CALLGATE, _INSN_CALLF),
            (_U_FARPTR, struct.pack("<IH", 0, _SEL_GATE)),
        ]
    )

    gdt = bytearray(PAGE_SIZE)
    gate = _system_descriptor(0xEC, _KCODE_VA + _K_GATE_ENTRY, _SEL_KCODE)
    tss = _system_descriptor(0x89, _TSS_VA, 0x67)
    descriptors = {
        _SEL_KCODE: _segment_descriptor(0x9B, 0xA),  # 64-bit code, DPL 0
        _SEL_KDATA: _segment_descriptor(0x93, 0xC),  # data, DPL 0
        _SEL_STAR_USER_BASE: _segment_descriptor(0xFB, 0xC),  # 32-bit code, DPL 3
        _SEL_UDATA & ~3: _segment_descriptor(0xF3, 0xC),  # data, DPL 3
        _SEL_UCODE & ~3: _segment_descriptor(0xFB, 0xA),  # 64-bit code, DPL 3
        _SEL_GATE & ~3: gate[0],
        (_SEL_GATE & ~3) + 8: gate[1],
        _SEL_TSS: tss[0],
        _SEL_TSS + 8: tss[1],
    }
    for offset, descriptor in descriptors.items():
        gdt[offset : offset + 8] = _q(descriptor)
    # 64-bit TSS: RSP0 at offset 4 (SDM §7.7, Figure 7-11).
    gdt[_TSS_OFFSET + 4 : _TSS_OFFSET + 12] = _q(_KSTACK_VA + PAGE_SIZE)

    leaf = _P | _A | _D
    return {
        _HF_PDPT: table({0: _hpa(_HF_PD) | upper}),
        _HF_PD: table({0: _hpa(_HF_PT) | upper}),
        _HF_PT: table(
            {
                _PT_KCODE: _hpa(_HF_KCODE) | leaf,
                _PT_UCODE: _hpa(_HF_UCODE) | leaf | _US,
                _PT_GDT: _hpa(_HF_GDT) | leaf | _RW,
                _PT_KSTACK: _hpa(_HF_KSTACK) | leaf | _RW,
            }
        ),
        _HF_KCODE: kcode,
        _HF_UCODE: ucode,
        _HF_GDT: bytes(gdt),
        _HF_KSTACK: bytes(PAGE_SIZE),
    }


_HARNESS_PML4E: Final = _hpa(_HF_PDPT) | _P | _RW | _US | _A
_CHECKED_HARNESS_FRAMES: Final = tuple(i for i in range(_HARNESS_FRAMES) if i != _HF_KSTACK)


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _is_canonical(va: int) -> bool:
    """Bits 63:47 all equal (SDM Vol. 1 §3.3.7.1 with 48-bit linear addresses)."""
    top = va >> (LINEAR_ADDRESS_BITS - 1)
    return top in (0, (1 << (64 - LINEAR_ADDRESS_BITS + 1)) - 1)


def _check_u64(name: str, value: int) -> None:
    if not 0 <= value <= _U64:
        raise ValueError(f"{name}={value:#x} is not a 64-bit unsigned value")


def _check_linear(name: str, va: int) -> None:
    _check_u64(name, va)
    if va >= HARNESS_VA_BASE:
        raise ValueError(f"{name}={va:#x} is in the harness PML4 slot {HARNESS_PML4_SLOT}")


def _check_cr3(cr3: int) -> int:
    """Validate a CR3 value; return its PML4 frame number."""
    _check_u64("cr3", cr3)
    if cr3 & ~(_PFN_MASK | 0x18):
        raise ValueError(f"cr3={cr3:#x} sets bits other than PWT, PCD and address bits")
    if cr3 >> 12 >= HARNESS_FRAME_BASE:
        raise ValueError(f"cr3={cr3:#x} points into harness-reserved memory")
    return cr3 >> 12


def _validate(memory: Mapping[int, bytes], machine: UcMachine, steps: Sequence[UcStep]) -> set[int]:
    """Check the caller's inputs against the harness reservations.

    Returns the set of frames used as PML4s.
    """
    for frame, data in memory.items():
        if not 0 <= frame < HARNESS_FRAME_BASE:
            raise ValueError(f"frame {frame:#x} is not in [0, HARNESS_FRAME_BASE)")
        if len(data) != PAGE_SIZE:
            raise ValueError(f"frame {frame:#x} has {len(data)} bytes, expected {PAGE_SIZE}")
    pml4s = {_check_cr3(machine.cr3)}
    pml4s.update(_check_cr3(step.cr3) for step in steps if isinstance(step, UcMovCr3))
    for step in steps:
        if isinstance(step, UcAccess):
            if not isinstance(step.kind, UcAccessKind):
                raise TypeError(f"kind={step.kind!r} is not a UcAccessKind")
            _check_linear("va", step.va)
            _check_u64("value", step.value)
            if step.cpl not in (0, 3):
                raise ValueError(f"cpl={step.cpl} must be 0 or 3")
        elif isinstance(step, UcInvlpg):
            _check_linear("va", step.va)
        elif isinstance(step, UcPhysWrite):
            _check_u64("value", step.value)
            if not 0 <= step.pa < HARNESS_PHYS_BASE or step.pa % 8:
                raise ValueError(f"pa={step.pa:#x} is not an 8-aligned caller physical address")
            if step.pa >> 12 in pml4s and step.pa % PAGE_SIZE == _PML4_SLOT_OFFSET:
                raise ValueError(f"pa={step.pa:#x} is the harness-owned PML4 entry")
        elif not isinstance(step, UcMovCr3):
            raise TypeError(f"not a UcStep: {step!r}")
    return pml4s


# --------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------


class UnicornEngine:
    """A reusable unicorn instance set up as a 4-level-paging x86-64 machine.

    Creating one costs a few milliseconds (CPU model, harness image, error-code
    calibration); :meth:`run` resets all caller-visible state, so one engine
    runs any number of independent cases.  Not thread-safe.
    """

    def __init__(self) -> None:
        self._uc = _Uc()
        self._cpl = 0  # current privilege level of the emulated CPU
        self._rflags = _RFLAGS_FIXED
        self._frames: dict[int, bytearray] = {}  # caller physical memory (sparse)
        self._exc: tuple[int, int, int] | None = None  # (vector, CR2, error code)
        self._harness = _harness_image()
        # Successful FETCHes so far.  Each translates a one-shot block at the
        # target (caller memory is MMIO) whose ~300 bytes of code buffer QEMU
        # only reclaims when the 1 GiB buffer is full; see run_on_unicorn.
        self.fetch_stops = 0

        uc = self._uc
        uc.mem_map(HARNESS_PHYS_BASE, _HARNESS_FRAMES * PAGE_SIZE)
        for index, data in self._harness.items():
            uc.mem_write(_hpa(index), data)
        uc.mmio_map(0, HARNESS_PHYS_BASE, self._phys_read, self._phys_store)
        uc.hook_interrupt(self._on_interrupt)
        uc.reg_write_mmr(_REG_GDTR, 0, _GDT_VA, _GDT_LIMIT, 0)
        # TR cache: 64-bit busy TSS (type 0xB), present (SDM §7.2.4).
        uc.reg_write_mmr(_REG_TR, _SEL_TSS, _TSS_VA, 0x67, 0x8B00)
        uc.msr_write(_MSR_STAR, (_SEL_STAR_USER_BASE << 48) | (_SEL_KCODE << 32))
        self._err_off, self._old_exc_off = self._locate_exception_fields()
        self._calibrate()

    # -- hooks -----------------------------------------------------------------

    def _on_interrupt(self, vector: int) -> None:
        """Record vector, CR2 and error code of the first exception, then stop.

        Vector 3 is the INT3 that ends a harness stub.  CR2 and the error code
        are captured here because after the CPU loop returns unicorn may
        translate more addresses (see :meth:`_access`), which can overwrite them.
        """
        if self._exc is None:
            if vector == _VEC_BP:
                self._exc = (vector, 0, 0)
            else:
                self._exc = (vector, self._uc.reg_read(_REG_CR2), self._error_code())
        self._uc.emu_stop()

    def _phys_read(self, pa: int, size: int) -> int:
        """MMIO read of caller physical memory (page walks and data accesses)."""
        frame = self._frames.get(pa >> 12)
        if frame is None:
            return 0
        offset = pa & 0xFFF
        return int.from_bytes(frame[offset : offset + size], "little")

    def _phys_store(self, pa: int, size: int, value: int) -> None:
        """MMIO write of caller physical memory (A/D updates and data writes)."""
        frame = self._frames.get(pa >> 12)
        if frame is None:
            frame = self._frames[pa >> 12] = bytearray(PAGE_SIZE)
        offset = pa & 0xFFF
        frame[offset : offset + size] = value.to_bytes(size, "little")

    # -- QEMU exception state ------------------------------------------------------

    def _locate_exception_fields(self) -> tuple[int, int]:
        """Offsets of ``error_code`` and ``old_exception`` in the context blob.

        QEMU 5's ``CPUX86State`` has ``int error_code; int exception_is_int;
        target_ulong exception_next_eip; target_ulong dr[8]; void *bp[4];
        int old_exception;``.  ``dr[8]`` is found by value.
        """
        uc = self._uc
        marks = [0x5EED_0000_1234_5670 | (i << 32) | i for i in range(8)]
        for reg, mark in zip(_REG_DR, marks):
            uc.reg_write(reg, mark)
        blob = uc.context_blob()
        pattern = b"".join(_q(mark) for mark in marks)
        where = blob.find(pattern)
        for reg, value in zip(_REG_DR, (0, 0, 0, 0, 0xFFFF0FF0, 0x400, 0xFFFF0FF0, 0x400)):
            uc.reg_write(reg, value)
        if where < 16 or blob.find(pattern, where + 1) >= 0:
            raise HarnessError("cannot locate QEMU's dr[] array in the CPU context")
        return where - 16, where + 64 + 32

    def _error_code(self) -> int:
        """QEMU's ``env->error_code`` (read through a saved CPU context)."""
        base = self._uc.context_capture()
        return ctypes.c_uint32.from_address(base + self._err_off).value

    def _exception_in_flight(self) -> int:
        """QEMU's ``env->old_exception`` (-1: none)."""
        base = self._uc.context_capture()
        return ctypes.c_int32.from_address(base + self._old_exc_off).value

    def _clear_exception_in_flight(self) -> None:
        """Set QEMU's ``env->old_exception`` to -1, as completed delivery would."""
        base = self._uc.context_capture()
        ctypes.c_int32.from_address(base + self._old_exc_off).value = -1
        self._uc.context_restore()

    # -- start-up checks -------------------------------------------------------

    def _check_cpuid(self) -> None:
        """MAXPHYADDR, NX, 1 GiB pages, SMEP and SMAP as expected (§4.1.4)."""

        def cpuid(leaf: int) -> tuple[int, int, int, int]:
            self._uc.reg_write(_REG_RAX, leaf)
            self._uc.reg_write(_REG_RCX, 0)
            self._run_kernel_stub(_K_CPUID, len(_INSN_CPUID))
            regs = (_REG_RAX, _REG_RBX, _REG_RCX, _REG_RDX)
            a, b, c, d = (self._uc.reg_read(reg) for reg in regs)
            return a, b, c, d

        if cpuid(0x8000_0008)[0] & 0xFF != MAXPHYADDR:
            raise HarnessError("CPUID reports an unexpected MAXPHYADDR")
        edx = cpuid(0x8000_0001)[3]
        ebx7 = cpuid(7)[1]
        if not (edx >> 20 & 1 and edx >> 26 & 1 and ebx7 >> 7 & 1 and ebx7 >> 20 & 1):
            raise HarnessError("CPU model lacks NX, 1 GiB pages, SMEP or SMAP")

    def _calibrate(self) -> None:
        """Enter long mode with paging; check CPUID and the error-code location.

        Uses a scratch PML4 (frame 0, nothing mapped outside the harness slot)
        and page faults with unambiguous error codes (§4.7), which also
        exercise both privilege transitions and both FETCH target forms.
        """
        self._prepare({0: bytes(PAGE_SIZE)}, UcMachine(cr3=0, efer_nxe=True), {0})
        self._check_cpuid()
        probes = [
            (UcAccess(UcAccessKind.WRITE, 0x1000, cpl=3), PF_ERR_WR | PF_ERR_US),
            (UcAccess(UcAccessKind.FETCH, 0x2000, cpl=3), PF_ERR_ID | PF_ERR_US),
            (UcAccess(UcAccessKind.READ, 0x3008, cpl=0), 0),
            (UcAccess(UcAccessKind.WRITE, 0x4010, cpl=0), PF_ERR_WR),
            (UcAccess(UcAccessKind.FETCH, 0x5123, cpl=0), PF_ERR_ID),
            (UcAccess(UcAccessKind.READ, 0x6000, cpl=3), PF_ERR_US),
        ]
        for access, expected in probes:
            result = self._access(access)
            if result != UcResult("page_fault", 0, access.va, expected):
                raise HarnessError(f"error-code calibration failed: {access} -> {result}")
        self._check_harness_intact()

    # -- running -----------------------------------------------------------------

    def _start(self, begin: int, until: int) -> tuple[int, int, int] | None:
        """Run from ``begin``; return the first exception (vector, CR2, error
        code), or None if the CPU reached ``until``."""
        self._exc = None
        self._uc.emu_start(begin, until)
        exc = self._exc
        if exc is not None and exc[0] != _VEC_BP:
            self._clear_exception_in_flight()
        elif self._exception_in_flight() != -1:
            # A fault nobody reported: unicorn's post-run translation of
            # ``until - 1`` faulted, so it walked page tables it should not have.
            raise HarnessError(f"hidden exception after a run from {begin:#x} to {until:#x}")
        return exc

    def _enter(self, cpl: int, kernel_stub: int, user_stub: int) -> int:
        """Prepare the privilege transition to ``cpl``; return the start address.

        CPL 0 -> 3: SYSRETQ (no memory access).  CPL 3 -> 0: far CALL through a
        64-bit call gate, which reads the harness GDT and TSS and pushes onto
        the harness kernel stack (§5.8.3.1, §5.8.5).  unicorn turns SYSCALL and
        SYSENTER into hooks, so they cannot be used to enter CPL 0.
        """
        uc = self._uc
        if cpl == 0:
            if self._cpl == 0:
                return _KCODE_VA + kernel_stub
            uc.reg_write(_REG_R12, _KCODE_VA + kernel_stub)
            return _UCODE_VA + _U_CALLGATE
        if self._cpl == 3:
            return _UCODE_VA + user_stub
        uc.reg_write(_REG_RCX, _UCODE_VA + user_stub)
        uc.reg_write(_REG_R11, self._rflags)
        return _KCODE_VA + _K_SYSRET

    def _access(self, access: UcAccess) -> UcResult:
        """Execute one access.

        READ/WRITE stubs end with INT3.  FETCH must stop *at* the target, so it
        uses unicorn's ``until`` address: unicorn translates a block there that
        only halts, and after *every* run it invalidates that block by
        translating ``until - 1`` with an instruction-fetch access
        (``uc_exit_invalidate_iter``).  So a page-aligned ``va`` is entered at
        ``va + 1``: same page, hence the same translation, permission checks and
        A-flag updates, and ``until - 1`` then lies in the page just translated
        (a TLB hit, or the same faulting walk again, whose side effects were
        already made; CR2 and the error code are captured before it).
        """
        kind = access.kind
        if kind is UcAccessKind.READ:
            kernel_stub, user_stub, length = _K_READ, _U_READ, len(_INSN_READ)
        elif kind is UcAccessKind.WRITE:
            kernel_stub, user_stub, length = _K_WRITE, _U_WRITE, len(_INSN_WRITE)
        else:
            kernel_stub, user_stub, length = _K_FETCH, _U_FETCH, 0
        begin = self._enter(access.cpl, kernel_stub, user_stub)
        if kind is UcAccessKind.FETCH:
            target = access.va + 1 if access.va % PAGE_SIZE == 0 else access.va
            until = done = target
            # QEMU finds a block translated at ``target`` by an earlier FETCH in its
            # jump cache without translating the page, and a TLB flush of one MMU
            # mode (INVLPG in a large page) or an eviction does not clear that
            # cache: the jump would "succeed" with no permission check, and the
            # post-run translation of ``until - 1`` would fault behind our back.
            self._uc.flush_tb()
        else:
            page_va = _KCODE_VA if access.cpl == 0 else _UCODE_VA
            target, until = access.va, page_va + _UNREACHED
            done = page_va + (kernel_stub if access.cpl == 0 else user_stub) + length + 1
        self._uc.reg_write(_REG_RBX, target)
        self._uc.reg_write(_REG_RAX, access.value if kind is UcAccessKind.WRITE else 0)
        exc = self._start(begin, until)
        self._cpl = access.cpl

        if exc is None or exc[0] == _VEC_BP:
            if exc is None:
                self.fetch_stops += 1
            rip = self._uc.reg_read(_REG_RIP)
            if (exc is None) != (kind is UcAccessKind.FETCH) or rip != done:
                raise HarnessError(f"{access}: stopped at {rip:#x}, expected {done:#x}")
            value = self._uc.reg_read(_REG_RAX) if kind is UcAccessKind.READ else 0
            return UcResult("ok", value)
        vector, cr2, error_code = exc
        if vector == _VEC_GP and error_code == 0 and not _is_canonical(target):
            return UcResult("gp", 0, 0, 0)
        # CR2 is the target; for a READ/WRITE that crosses a page boundary it
        # may be the first byte of the second page.
        last = target if kind is UcAccessKind.FETCH else target + 7
        if vector != _VEC_PF or not target <= cr2 <= last:
            raise HarnessError(
                f"{access}: vector {vector}, CR2 {cr2:#x}, error code {error_code:#x} "
                "(a fault inside the harness?)"
            )
        return UcResult("page_fault", 0, access.va if kind is UcAccessKind.FETCH else cr2, error_code)

    def _run_kernel_stub(self, stub: int, length: int) -> None:
        """Run one harness instruction (+ INT3) at CPL 0; it must not fault."""
        begin = self._enter(0, stub, stub)
        exc = self._start(begin, _KCODE_VA + _UNREACHED)
        self._cpl = 0
        rip = self._uc.reg_read(_REG_RIP)
        if exc is None or exc[0] != _VEC_BP or rip != _KCODE_VA + stub + length + 1:
            raise HarnessError(f"harness stub {stub:#x} failed: {exc}, rip {rip:#x}")

    def _prepare(self, memory: Mapping[int, bytes], machine: UcMachine, pml4s: set[int]) -> None:
        """Load caller memory and control registers; flush QEMU's TLB."""
        frames = {frame: bytearray(data) for frame, data in memory.items()}
        for frame in pml4s:
            table = frames.setdefault(frame, bytearray(PAGE_SIZE))
            table[_PML4_SLOT_OFFSET : _PML4_SLOT_OFFSET + 8] = _q(_HARNESS_PML4E)
        self._frames = frames

        uc = self._uc
        self._rflags = _RFLAGS_FIXED | (_RFLAGS_AC if machine.rflags_ac else 0)
        cr4 = _CR4_PAE
        cr4 |= _CR4_PGE if machine.cr4_pge else 0
        cr4 |= _CR4_SMEP if machine.cr4_smep else 0
        cr4 |= _CR4_SMAP if machine.cr4_smap else 0
        efer = _EFER_SCE | _EFER_LME | _EFER_LMA | (_EFER_NXE if machine.efer_nxe else 0)
        cr0 = _CR0_PE | _CR0_PG | (_CR0_WP if machine.cr0_wp else 0)
        uc.reg_write(_REG_CR4, cr4)
        uc.msr_write(_MSR_EFER, efer)
        uc.reg_write(_REG_CR3, machine.cr3)
        uc.reg_write(_REG_CR0, cr0)
        uc.reg_write(_REG_RFLAGS, self._rflags)
        uc.reg_write(_REG_CR2, 0)
        uc.flush_tlb()
        self._clear_exception_in_flight()

    def _check_harness_intact(self) -> None:
        """The harness tables, code and GDT/TSS must be unmodified."""
        for index in _CHECKED_HARNESS_FRAMES:
            if self._uc.mem_read(_hpa(index), PAGE_SIZE) != self._harness[index]:
                raise HarnessError(
                    f"harness frame {HARNESS_FRAME_BASE + index:#x} was modified: "
                    "a caller translation maps harness-reserved physical memory"
                )

    def run(self, memory: Mapping[int, bytes], machine: UcMachine, steps: Sequence[UcStep]) -> UcRun:
        """Run ``steps`` on ``memory`` under ``machine``; see :func:`run_on_unicorn`."""
        pml4s = _validate(memory, machine, steps)
        self._prepare(memory, machine, pml4s)
        results: list[UcResult] = []
        for step in steps:
            if isinstance(step, UcAccess):
                results.append(self._access(step))
            elif isinstance(step, UcPhysWrite):
                self._phys_store(step.pa, 8, step.value)
            elif isinstance(step, UcInvlpg):
                self._uc.reg_write(_REG_RBX, step.va)
                self._run_kernel_stub(_K_INVLPG, len(_INSN_INVLPG))
            else:
                self._uc.reg_write(_REG_RBX, step.cr3)
                self._run_kernel_stub(_K_MOVCR3, len(_INSN_MOVCR3))
        self._check_harness_intact()

        slot = slice(_PML4_SLOT_OFFSET, _PML4_SLOT_OFFSET + 8)
        final: dict[int, bytes] = {}
        for frame, original in memory.items():
            data = bytes(self._frames[frame])
            if frame in pml4s:
                data = data[: slot.start] + bytes(original[slot]) + data[slot.stop :]
            final[frame] = data
        return UcRun(tuple(results), final)


_ENGINE: UnicornEngine | None = None
_MAX_FETCH_STOPS: Final = 50_000  # then replace the engine (bounds growth to ~15 MB)


def run_on_unicorn(memory: Mapping[int, bytes], config: UcMachine, steps: Sequence[UcStep]) -> UcRun:
    """Execute ``steps`` on unicorn's x86-64 MMU and report what happened.

    ``memory`` maps frame numbers (``< HARNESS_FRAME_BASE``) to 4096-byte
    contents; every other caller frame reads as zero.  ``config`` gives CR3 and
    the paging controls.  Returns one :class:`UcResult` per :class:`UcAccess`
    and the final contents of the supplied frames.

    One engine per process is created on first use and reused (about 1 ms of
    CPU to create; a case of 5 frames and 4 steps then costs about 0.13 ms);
    it is replaced after 50 000 successful FETCHes, which bounds the growth of
    QEMU's code buffer.  Runs are independent: memory, control registers and
    the whole TLB are reset.  Invalid input raises
    :class:`ValueError` / :class:`TypeError`; if the harness fails, the engine
    is discarded and :class:`HarnessError` propagates.
    """
    global _ENGINE
    _validate(memory, config, steps)
    engine = _ENGINE if _ENGINE is not None else UnicornEngine()
    _ENGINE = None
    result = engine.run(memory, config, steps)
    if engine.fetch_stops < _MAX_FETCH_STOPS:
        _ENGINE = engine
    return result
