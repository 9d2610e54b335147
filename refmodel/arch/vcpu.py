"""A vCPU's architectural state and the control-register write rules that affect
paging (SDM Vol. 3A 2.5 "Control Registers", 4.1 "Paging Modes", 4.10.4.1
"Operations that Invalidate TLBs"; Vol. 2A MOV to CR, WRMSR).

The state is a frozen value: a register write returns a new state together with the
TLB invalidation the write implies, or a #GP. The model always runs in 64-bit mode
with 4-level paging, so writes that would leave it (clearing CR0.PG or CR4.PAE, setting
CR4.LA57) are the #GP the SDM prescribes in 64-bit mode.
"""

import enum
from dataclasses import dataclass, replace

from ..errors import RefmodelError
from .control import CR3_NOFLUSH, CR3_PCID_MASK, Cr0, Cr4, Efer, Rflags
from .fault import GeneralProtection
from .walk import PagingContext

NUM_GPRS = 16
GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi") + tuple(f"r{i}" for i in range(8, 16))

#: CR4 bits this model accepts; the others are reserved or model features it lacks.
CR4_MODELLED = int(
    Cr4.VME | Cr4.PVI | Cr4.TSD | Cr4.DE | Cr4.PSE | Cr4.PAE | Cr4.MCE | Cr4.PGE | Cr4.PCE
    | Cr4.OSFXSR | Cr4.OSXMMEXCPT | Cr4.UMIP | Cr4.VMXE | Cr4.SMXE | Cr4.FSGSBASE
    | Cr4.PCIDE | Cr4.OSXSAVE | Cr4.SMEP | Cr4.SMAP
)
EFER_WRITABLE = int(Efer.SCE | Efer.LME | Efer.NXE)


class TlbEffect(enum.Enum):
    """The invalidation a control-register write implies (SDM 4.10.4.1)."""

    NONE = "none"
    PCID_NONGLOBAL = "pcid-nonglobal"  #: MOV to CR3: non-global entries of the new PCID
    ALL_INCLUDING_GLOBAL = "all"  #: CR4.PGE changed, CR4.PCIDE 1 -> 0, or CR4.SMEP 0 -> 1


@dataclass(frozen=True)
class ArchState:
    """General registers, RIP, RFLAGS, CR0, CR2, CR3, CR4, IA32_EFER, and the CPL."""

    gprs: tuple[int, ...] = (0,) * NUM_GPRS
    rip: int = 0
    rflags: int = int(Rflags.FIXED1)
    cr0: int = int(Cr0.PE | Cr0.PG | Cr0.WP | Cr0.ET | Cr0.NE)
    cr2: int = 0
    cr3: int = 0
    cr4: int = int(Cr4.PAE)
    efer: int = int(Efer.LME | Efer.LMA | Efer.NXE)
    cpl: int = 0

    def __post_init__(self) -> None:
        if len(self.gprs) != NUM_GPRS:
            raise RefmodelError(f"gprs needs {NUM_GPRS} registers, got {len(self.gprs)}")
        if self.cpl not in (0, 1, 2, 3):
            raise RefmodelError(f"cpl must be 0..3, got {self.cpl}")

    def paging_context(self, maxphyaddr: int, page1gb: bool = True) -> PagingContext:
        """The part of the state the page walk reads."""
        cr3 = self.cr3 & ~CR3_NOFLUSH
        return PagingContext(
            cr0=self.cr0, cr3=cr3, cr4=self.cr4, efer=self.efer, rflags=self.rflags,
            maxphyaddr=maxphyaddr, page1gb=page1gb,
        )

    @property
    def pcid(self) -> int:
        """CR3[11:0] when CR4.PCIDE = 1, else PCID 000H (SDM 4.10.1)."""
        return self.cr3 & CR3_PCID_MASK if self.cr4 & Cr4.PCIDE else 0

    def with_gpr(self, index: int, value: int) -> "ArchState":
        regs = list(self.gprs)
        regs[index] = value & ((1 << 64) - 1)
        return replace(self, gprs=tuple(regs))


@dataclass(frozen=True)
class CrWrite:
    """A successful control-register write: the new state and its TLB effect."""

    state: ArchState
    effect: TlbEffect
    pcid: int = 0  #: the PCID an effect of PCID_NONGLOBAL applies to


def write_cr3(state: ArchState, value: int, maxphyaddr: int) -> CrWrite | GeneralProtection:
    """MOV to CR3 (SDM 4.10.4.1, Vol. 2A MOV CR).

    With CR4.PCIDE = 1, bit 63 set means "do not invalidate" and is not stored;
    otherwise the non-global entries of the new PCID (000H without PCIDs) are
    invalidated. Bits 62:MAXPHYADDR (63 without PCIDs) are reserved: #GP.
    """
    pcide = bool(state.cr4 & Cr4.PCIDE)
    noflush = pcide and bool(value & CR3_NOFLUSH)
    stored = value & ~CR3_NOFLUSH if pcide else value
    if stored >> maxphyaddr:
        return GeneralProtection(f"MOV CR3 {value:#x}: reserved bits above MAXPHYADDR={maxphyaddr}")
    new = replace(state, cr3=stored)
    if noflush:
        return CrWrite(new, TlbEffect.NONE)
    return CrWrite(new, TlbEffect.PCID_NONGLOBAL, new.pcid)


def write_cr4(state: ArchState, value: int) -> CrWrite | GeneralProtection:
    """MOV to CR4 (SDM 2.5, 4.10.4.1, Vol. 2A MOV CR).

    #GP for reserved bits; for clearing PAE or changing LA57 in IA-32e mode; for
    setting PCIDE outside IA-32e mode or while CR3[11:0] != 0. Changing PGE, or
    clearing PCIDE, invalidates every TLB entry, global ones included. Setting SMEP
    (0 -> 1) must invalidate every entry of the current PCID; the model flushes
    everything, which the SDM permits ("always free to invalidate additional entries").
    """
    if value & Cr4.LA57 and not state.cr4 & Cr4.LA57:
        return GeneralProtection("MOV CR4: changing CR4.LA57 in IA-32e mode")
    if value & Cr4.PKE:
        raise RefmodelError("CR4.PKE: protection keys are not modelled")
    if value & ~CR4_MODELLED:
        return GeneralProtection(f"MOV CR4 {value:#x}: reserved bits {value & ~CR4_MODELLED:#x}")
    if state.efer & Efer.LMA and not value & Cr4.PAE:
        return GeneralProtection("MOV CR4: clearing CR4.PAE in IA-32e mode")
    if value & Cr4.PCIDE and not state.cr4 & Cr4.PCIDE:
        if not state.efer & Efer.LMA:
            return GeneralProtection("MOV CR4: setting CR4.PCIDE outside IA-32e mode")
        if state.cr3 & CR3_PCID_MASK:
            return GeneralProtection("MOV CR4: setting CR4.PCIDE while CR3[11:0] != 0")
    changed = value ^ state.cr4
    new = replace(state, cr4=value)
    smep_set = bool(value & Cr4.SMEP) and not state.cr4 & Cr4.SMEP
    if changed & Cr4.PGE or (state.cr4 & Cr4.PCIDE and not value & Cr4.PCIDE) or smep_set:
        return CrWrite(new, TlbEffect.ALL_INCLUDING_GLOBAL)
    return CrWrite(new, TlbEffect.NONE)


def write_cr0(state: ArchState, value: int) -> CrWrite | GeneralProtection:
    """MOV to CR0 (SDM 2.5, Vol. 2A MOV CR): #GP for bits 63:32; for PG without PE;
    for NW without CD; for clearing PG in 64-bit mode. CR0.WP takes effect on the next
    access: the TLB caches rights, not decisions, so no invalidation is needed."""
    if value >> 32:
        return GeneralProtection(f"MOV CR0 {value:#x}: bits 63:32 are reserved")
    if value & Cr0.PG and not value & Cr0.PE:
        return GeneralProtection("MOV CR0: PG = 1 with PE = 0")
    if value & Cr0.NW and not value & Cr0.CD:
        return GeneralProtection("MOV CR0: NW = 1 with CD = 0")
    if not value & Cr0.PG:
        return GeneralProtection("MOV CR0: clearing CR0.PG in 64-bit mode")
    return CrWrite(replace(state, cr0=value), TlbEffect.NONE)


def write_efer(state: ArchState, value: int) -> CrWrite | GeneralProtection:
    """WRMSR to IA32_EFER (SDM 2.2.1, Vol. 4 MSR C000_0080H): #GP for reserved bits
    or for changing LME while paging is on; LMA is read-only (kept). NXE takes effect
    on the next access; the TLB keeps XD as a cached right."""
    # int(): ~ of an IntFlag complements only the flag's own bits (0..11 here), which
    # would let every reserved bit above bit 11 through.
    if value & ~int(EFER_WRITABLE | Efer.LMA):
        return GeneralProtection(f"WRMSR EFER {value:#x}: reserved bits")
    if (value ^ state.efer) & Efer.LME and state.cr0 & Cr0.PG:
        return GeneralProtection("WRMSR EFER: changing LME while CR0.PG = 1")
    stored = (value & EFER_WRITABLE) | (state.efer & Efer.LMA)
    return CrWrite(replace(state, efer=stored), TlbEffect.NONE)
