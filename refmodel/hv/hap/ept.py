"""Extended page tables: the entry format, the EPT pointer, and the hardware's
translation of one guest-physical address (Intel SDM Vol. 3C 29.3, "The Extended
Page Table Mechanism (EPT)").

EPT is a second 4-level table, indexed by guest-physical address bits 47:12 exactly
as 4-level paging indexes linear addresses (the same 9-bit indices, so
:func:`refmodel.arch.pte.table_index` serves both), whose leaves hold machine frames.
An entry's bits 2:0 are its read, write and execute permissions (29.3.2, Tables
29-1..29-6); it is *present* if any of them is 1. Leaves carry an EPT memory type in
bits 5:3 and an ignore-PAT flag in bit 6; bit 7 makes an EPT PDPTE or PDE a 1 GiB or
2 MiB leaf.

Translating a guest-physical address ends in one of three ways (29.3.3):

- a translation: the machine address and the permissions combined over the levels
  (a right is granted only if every entry used grants it);
- an **EPT misconfiguration**: some entry holds a value reserved for the future —
  write without read (bits 2:0 = 010b or 110b), execute-only without processor
  support, a reserved bit, or a reserved memory type in the leaf (29.3.3.1);
- an **EPT violation**: an entry is not present, or the combined permissions refuse
  the access (29.3.3.2).

Both are VM exits; :class:`EptViolation` carries the exit qualification the
processor reports (Vol. 3C 28.2.1, "Exit Qualification for EPT Violations"; Xen's
``ept_qual_t`` in xen/arch/x86/include/asm/hvm/vmx/vmx.h).

Not modelled, by choice: EPT accessed/dirty flags (the EPTP enables them with bit 6;
refmodel leaves it 0, so bits 8 and 9 of every entry are ignored, as Xen does when
the processor lacks them); mode-based execute control (bit 10 is ignored and bit 2
governs every fetch); 5-level EPT; #VE (bit 63 is ignored); the "advanced VM-exit
information" bits 9-11 of the qualification (reported 0).
"""

import enum
from dataclasses import dataclass

from ...arch.access import AccessKind
from ...arch.physmem import PhysicalMemory
from ...arch.pte import Level, PageSize, entry_frame_address, phys_addr_mask, table_index
from ...arch.types import ENTRY_SIZE, GPA, MFN, MPA, PAGE_SHIFT
from ...errors import RefmodelError


class EptFlag(enum.IntFlag):
    """Bits of an EPT paging-structure entry (SDM Vol. 3C 29.3.2, Tables 29-1..29-6)."""

    R = 1 << 0  #: read access
    W = 1 << 1  #: write access
    X = 1 << 2  #: execute access (supervisor-mode execute, with mode-based control off)
    IGNORE_PAT = 1 << 6  #: leaves: the EPT memory type alone decides (Section 29.3.7)
    PS = 1 << 7  #: an EPT PDPTE / PDE that maps a 1 GiB / 2 MiB page
    A = 1 << 8  #: accessed, only if EPTP bit 6 = 1 (not modelled: ignored)
    D = 1 << 9  #: dirty, only if EPTP bit 6 = 1 (not modelled: ignored)


#: Bits 2:0: the permissions; the entry is present if any is 1 (SDM 29.3.2).
RWX = EptFlag.R | EptFlag.W | EptFlag.X
PERMISSION_MASK = 0x7
#: Bits 5:3 of a leaf: its EPT memory type.
MEMTYPE_SHIFT = 3
MEMTYPE_MASK = 0x7 << MEMTYPE_SHIFT
#: Bits 7:3 of an entry that references another EPT table are reserved.
NONLEAF_RESERVED = 0x1F << 3


class EptMemType(enum.IntEnum):
    """EPT memory types (SDM Vol. 3C 29.3.7; Vol. 3A 12.3 for their meaning). Values
    2, 3 and 7 are reserved: a leaf holding one is an EPT misconfiguration."""

    UC = 0
    WC = 1
    WT = 4
    WP = 5
    WB = 6


RESERVED_MEMTYPES = frozenset({2, 3, 7})


@dataclass(frozen=True)
class EptCapabilities:
    """What the processor supports, as IA32_VMX_EPT_VPID_CAP reports it (SDM Vol. 3C
    App. A.10; Xen's ``VMX_EPT_*`` bits in xen/arch/x86/include/asm/hvm/vmx/vmcs.h)."""

    execute_only: bool = True  #: bit 0: bits 2:0 = 100b is allowed
    page_2m: bool = True  #: bit 16: an EPT PDE may map a 2 MiB page
    page_1g: bool = True  #: bit 17: an EPT PDPTE may map a 1 GiB page


# -- the EPT pointer --------------------------------------------------------------------


@dataclass(frozen=True)
class Eptp:
    """The EPT pointer, a VMCS field (SDM Vol. 3C 25.6.11; Xen ``struct ept_data``):
    bits 2:0 the memory type used to read the EPT tables (UC or WB), bits 5:3 the
    walk length minus 1 (3 for 4 levels), bit 6 EPT A/D enable (0 here), bits N-1:12
    the address of the EPT PML4 table (the "EP4TA")."""

    pml4: MFN
    memtype: EptMemType = EptMemType.WB
    walk_length: int = 4

    def __post_init__(self) -> None:
        if self.memtype not in (EptMemType.UC, EptMemType.WB):
            raise RefmodelError(f"EPTP memory type must be UC or WB, got {self.memtype.name}")
        if self.walk_length != 4:
            raise RefmodelError(f"EPTP walk length {self.walk_length}: only 4-level EPT is modelled")

    @property
    def ep4ta(self) -> MPA:
        """The EPT PML4 table address: what tags combined translations (SDM 29.4)."""
        return MPA(self.pml4 << PAGE_SHIFT)

    @property
    def value(self) -> int:
        return int(self.memtype) | ((self.walk_length - 1) << 3) | self.ep4ta

    @staticmethod
    def decode(value: int) -> "Eptp":
        """An EPTP value as VM entry checks it (SDM Vol. 3C 27.2.1.1): a reserved
        memory type, another walk length, A/D enabled or bits 11:7 set fail."""
        if value & (1 << 6):
            raise RefmodelError("EPTP bit 6: EPT accessed/dirty flags are not modelled")
        if value & 0xF80:
            raise RefmodelError(f"EPTP {value:#x}: bits 11:7 are reserved")
        memtype = value & 0x7
        if memtype not in (EptMemType.UC, EptMemType.WB):
            raise RefmodelError(f"EPTP {value:#x}: memory type {memtype} is neither UC nor WB")
        return Eptp(MFN(value >> PAGE_SHIFT), EptMemType(memtype), ((value >> 3) & 0x7) + 1)


# -- entries --------------------------------------------------------------------------------


def make_leaf(mfn: int, perms: EptFlag | int, memtype: EptMemType = EptMemType.WB, ignore_pat: bool = True) -> int:
    """A 4 KiB EPT PTE mapping ``mfn`` (Xen ``ept_set_entry``; for RAM Xen chooses WB
    with ignore-PAT, ``epte_get_entry_emt``)."""
    if int(perms) & ~PERMISSION_MASK:
        raise RefmodelError(f"EPT permissions {int(perms):#x} have bits beyond R/W/X")
    entry = (mfn << PAGE_SHIFT) | int(perms) | (int(memtype) << MEMTYPE_SHIFT)
    return entry | int(EptFlag.IGNORE_PAT) if ignore_pat else entry


def make_table_entry(mfn: int) -> int:
    """An entry referencing the next EPT table: full permissions, so that the leaf
    alone decides (Xen ``ept_set_middle_entry`` sets R, W and X)."""
    return (mfn << PAGE_SHIFT) | int(RWX)


def is_present(entry: int) -> bool:
    """SDM 29.3.2: an EPT entry is present if any of bits 2:0 is 1; otherwise the
    processor ignores bits 63:3."""
    return bool(entry & PERMISSION_MASK)


def is_ept_leaf(entry: int, level: Level) -> bool:
    """An EPT PTE always maps a page; an EPT PDPTE or PDE does when bit 7 is 1."""
    return level is Level.L1 or (level in (Level.L3, Level.L2) and bool(entry & EptFlag.PS))


def reserved_bits(entry: int, level: Level, maxphyaddr: int, caps: EptCapabilities) -> int:
    """The reserved bits set in a present EPT entry (SDM 29.3.2, Tables 29-1..29-6):

    - bits 51:N (beyond MAXPHYADDR) of every entry;
    - bits 7:3 of an EPT PML4E, and of a PDPTE/PDE that references a table;
    - bit 7 of a PDPTE or PDE if the processor lacks that page size;
    - bits 29:12 of a 1 GiB PDPTE, bits 20:12 of a 2 MiB PDE (the page's base must be
      aligned).
    """
    rsvd = ((1 << 52) - 1) & ~((1 << maxphyaddr) - 1)
    large_ok = {Level.L3: caps.page_1g, Level.L2: caps.page_2m}.get(level, False)
    if level is Level.L1:
        pass
    elif entry & EptFlag.PS and large_ok:
        rsvd |= (PageSize.for_leaf_level(level).value - 1) & ~((1 << PAGE_SHIFT) - 1)
    else:
        rsvd |= NONLEAF_RESERVED
    return int(entry) & rsvd


def misconfiguration(entry: int, level: Level, maxphyaddr: int, caps: EptCapabilities) -> str | None:
    """Why a present EPT entry is an EPT misconfiguration, or None (SDM 29.3.3.1)."""
    perms = entry & PERMISSION_MASK
    if perms in (0b010, 0b110):
        return f"bits 2:0 = {perms:03b}b: write access without read access"
    if perms == 0b100 and not caps.execute_only:
        return "bits 2:0 = 100b: execute-only is not supported by this processor"
    rsvd = reserved_bits(entry, level, maxphyaddr, caps)
    if rsvd:
        return f"reserved bits {rsvd:#x} set"
    memtype = (entry & MEMTYPE_MASK) >> MEMTYPE_SHIFT
    if is_ept_leaf(entry, level) and memtype in RESERVED_MEMTYPES:
        return f"memory type {memtype} (bits 5:3) is reserved"
    return None


@dataclass(frozen=True)
class EptRights:
    """Permissions combined over every EPT entry used (SDM 29.3.3.2: an access is
    refused if the bit is clear in *any* entry used)."""

    read: bool = True
    write: bool = True
    execute: bool = True

    def narrowed_by(self, entry: int) -> "EptRights":
        return EptRights(
            self.read and bool(entry & EptFlag.R),
            self.write and bool(entry & EptFlag.W),
            self.execute and bool(entry & EptFlag.X),
        )

    def allows(self, kind: AccessKind) -> bool:
        """SDM 29.3.3.2: a data read needs bit 0, a data write bit 1, an instruction
        fetch bit 2 (mode-based execute control off)."""
        return {AccessKind.READ: self.read, AccessKind.WRITE: self.write, AccessKind.FETCH: self.execute}[kind]

    @staticmethod
    def of(entry: EptFlag | int) -> "EptRights":
        """The rights bits 2:0 of one entry grant."""
        return EptRights().narrowed_by(int(entry))


# -- outcomes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EptTranslation:
    """A guest-physical address translated to a machine-physical one."""

    gpa: GPA
    mpa: MPA
    size: PageSize  #: the EPT page size (4 KiB, 2 MiB or 1 GiB)
    rights: EptRights
    leaf_addr: int  #: machine address of the EPT leaf entry

    @property
    def mfn(self) -> MFN:
        return MFN(self.mpa >> PAGE_SHIFT)


@dataclass(frozen=True)
class EptQualification:
    """The exit qualification of an EPT violation (SDM Vol. 3C 28.2.1, "Exit
    Qualification for EPT Violations"; Xen ``ept_qual_t``)."""

    read: bool  #: bit 0: the access was a data read
    write: bool  #: bit 1: the access was a data write
    fetch: bool  #: bit 2: the access was an instruction fetch
    readable: bool  #: bit 3: AND of bit 0 over the EPT entries used
    writable: bool  #: bit 4: AND of bit 1
    executable: bool  #: bit 5: AND of bit 2
    gla_valid: bool  #: bit 7: the guest-linear-address field is valid
    final: bool  #: bit 8 (if bit 7): the access was to the translation of the linear
    #: address (1), not to a guest paging-structure entry during the walk (0)

    @property
    def raw(self) -> int:
        bits = (self.read, self.write, self.fetch, self.readable, self.writable, self.executable)
        value = sum(1 << i for i, b in enumerate(bits) if b)
        if self.gla_valid:
            value |= 1 << 7
            value |= (1 << 8) if self.final else 0
        return value


@dataclass(frozen=True)
class EptViolation:
    """An EPT violation VM exit (SDM 29.3.3.2): the guest-physical address, the
    guest-linear address when there is one, and the qualification."""

    gpa: GPA
    gla: int | None
    qualification: EptQualification

    @property
    def gfn(self) -> int:
        return self.gpa >> PAGE_SHIFT


@dataclass(frozen=True)
class EptMisconfiguration:
    """An EPT misconfiguration VM exit (SDM 29.3.3.1): the guest-physical address
    whose translation met the entry, and why the entry is misconfigured."""

    gpa: GPA
    level: Level
    entry: int
    reason: str


EptOutcome = EptTranslation | EptViolation | EptMisconfiguration


@dataclass(frozen=True)
class EptAccess:
    """What is being done with a guest-physical address, for the exit qualification:
    the access kind, and whether it belongs to the translation of a linear address
    (``gla``) and is the final access (``final``) rather than a guest paging-structure
    entry read or A/D update."""

    kind: AccessKind
    gla: int | None = None
    final: bool = True


@dataclass(frozen=True)
class EptWalkResult:
    outcome: EptOutcome
    refs: int  #: EPT entries read


def violation(gpa: int, access: EptAccess, rights: EptRights) -> EptViolation:
    """Build the EPT violation exit for ``access`` refused with ``rights`` (the
    permissions ANDed over the entries used, the not-present one included)."""
    return EptViolation(
        gpa=GPA(gpa),
        gla=access.gla,
        qualification=EptQualification(
            read=access.kind is AccessKind.READ,
            write=access.kind is AccessKind.WRITE,
            fetch=access.kind is AccessKind.FETCH,
            readable=rights.read,
            writable=rights.write,
            executable=rights.execute,
            gla_valid=access.gla is not None,
            final=access.final,
        ),
    )


def ept_walk(
    mem: PhysicalMemory, eptp: Eptp, gpa: int, access: EptAccess, caps: EptCapabilities = EptCapabilities()
) -> EptWalkResult:
    """Translate ``gpa`` through the EPT (SDM 29.3.2) and check ``access`` against
    the combined permissions (29.3.3). Reads one entry per level, top first; stops
    at the first not-present or misconfigured entry."""
    if not 0 <= gpa < (1 << 48):
        raise RefmodelError(f"guest-physical address {gpa:#x} is beyond 4-level EPT's 48 bits")
    table: int = eptp.ep4ta
    rights = EptRights()
    refs = 0
    for level in (Level.L4, Level.L3, Level.L2, Level.L1):
        addr = table + table_index(gpa, level) * ENTRY_SIZE
        entry = mem.read_u64(addr)
        refs += 1
        rights = rights.narrowed_by(entry)
        if not is_present(entry):
            return EptWalkResult(violation(gpa, access, rights), refs)
        reason = misconfiguration(entry, level, mem.maxphyaddr, caps)
        if reason is not None:
            return EptWalkResult(EptMisconfiguration(GPA(gpa), level, entry, reason), refs)
        if is_ept_leaf(entry, level):
            if not rights.allows(access.kind):
                return EptWalkResult(violation(gpa, access, rights), refs)
            size = PageSize.for_leaf_level(level)
            base = entry_frame_address(entry, mem.maxphyaddr, size)
            mpa = MPA(base | (gpa & (size.value - 1)))
            return EptWalkResult(EptTranslation(GPA(gpa), mpa, size, rights, addr), refs)
        table = entry & phys_addr_mask(mem.maxphyaddr)
    raise AssertionError("unreachable: an EPT PTE is always a leaf")
