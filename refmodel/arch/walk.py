"""The IA-32e 4-level page walk (SDM Vol. 3A 4.5), the access-rights rules (4.6),
reserved-bit checks (4.5, Tables 4-15..4-20) and the Accessed/Dirty updates (4.8).

This is the readable slow path. Every rule is one short function whose docstring
cites the SDM; :func:`walk` strings them together in the order the SDM describes a
translation: PML4E -> PDPTE (a 1 GiB page if PS) -> PDE (a 2 MiB page if PS) -> PTE.

A/D behaviour on a faulting walk (SDM 4.8: "whenever the processor uses a
paging-structure entry as part of linear-address translation, it sets the accessed
flag in that entry"): each non-leaf entry is *used* as soon as the walk steps
through it, so its A flag is set even if a lower level later faults. A leaf's A
(and, for a write, D) flag is set only when the access is allowed — a processor
never marks a page accessed or dirty for an access it refused. The entry that
faults (not present, reserved bit) is never written.
"""

from dataclasses import dataclass, field
from typing import Protocol

from .access import Access, AccessKind
from .control import Cr0, Cr4, Efer, Rflags
from .fault import FaultCause, PageFault, error_code_for
from .pte import Level, PageSize, PteFlag, entry_frame_address, phys_addr_mask, table_index
from .types import ENTRY_SIZE, PA, VA


class EntryMemory(Protocol):
    """Where paging-structure entries are read from and A/D updates written to.

    :class:`~refmodel.arch.physmem.PhysicalMemory` is one; the nested (EPT) walk
    supplies one that translates each guest-physical entry address first.
    """

    def read_u64(self, pa: int) -> int: ...

    def write_u64(self, pa: int, value: int) -> None: ...


@dataclass(frozen=True)
class PagingContext:
    """The register state a walk depends on (SDM 4.1.1, 4.6, 4.10.1)."""

    cr0: int = int(Cr0.PE | Cr0.PG | Cr0.WP)
    cr3: int = 0
    cr4: int = int(Cr4.PAE)
    efer: int = int(Efer.LME | Efer.LMA | Efer.NXE)
    rflags: int = int(Rflags.FIXED1)
    maxphyaddr: int = 46
    #: CPUID.80000001H:EDX.Page1GB: whether a PDPTE may map a 1 GiB page.
    page1gb: bool = True

    @property
    def wp(self) -> bool:
        return bool(self.cr0 & Cr0.WP)

    @property
    def nxe(self) -> bool:
        return bool(self.efer & Efer.NXE)

    @property
    def smep(self) -> bool:
        return bool(self.cr4 & Cr4.SMEP)

    @property
    def smap(self) -> bool:
        return bool(self.cr4 & Cr4.SMAP)

    @property
    def pge(self) -> bool:
        return bool(self.cr4 & Cr4.PGE)

    @property
    def pcide(self) -> bool:
        return bool(self.cr4 & Cr4.PCIDE)

    @property
    def ac(self) -> bool:
        return bool(self.rflags & Rflags.AC)

    @property
    def pml4_base(self) -> int:
        """CR3 bits M-1:12: the PML4 table (SDM 4.5, Table 4-12)."""
        return self.cr3 & phys_addr_mask(self.maxphyaddr)

    @property
    def pcid(self) -> int:
        """The current PCID: CR3[11:0] if CR4.PCIDE = 1, else 000H (SDM 4.10.1)."""
        return self.cr3 & 0xFFF if self.pcide else 0


@dataclass(frozen=True)
class Rights:
    """Access rights combined over every entry of a translation (SDM 4.6.1: for
    4-level paging a right is granted only if every level grants it)."""

    writable: bool = True  #: R/W = 1 in every entry
    user: bool = True  #: U/S = 1 in every entry: a "user-mode address"
    execute_disable: bool = False  #: XD = 1 in some entry (meaningful when NXE = 1)

    def narrowed_by(self, entry: int) -> "Rights":
        return Rights(
            writable=self.writable and bool(entry & PteFlag.RW),
            user=self.user and bool(entry & PteFlag.US),
            execute_disable=self.execute_disable or bool(entry & PteFlag.XD),
        )


@dataclass(frozen=True)
class Translation:
    """A successful translation of one linear address."""

    va: VA
    pa: PA  #: physical address of the accessed byte
    size: PageSize
    rights: Rights
    global_page: bool  #: G = 1 in the leaf and CR4.PGE = 1 (SDM 4.10.2.4)
    dirty: bool  #: the leaf's D flag after this access
    leaf_addr: int  #: physical address of the leaf entry
    entry_addrs: tuple[int, ...]  #: every entry read, top level first

    @property
    def page_base(self) -> int:
        return self.pa & ~(self.size.value - 1)


@dataclass
class WalkResult:
    """Outcome of one walk plus the number of paging-structure memory reads."""

    outcome: Translation | PageFault
    refs: int
    entry_addrs: list[int] = field(default_factory=list)


def is_canonical(va: int) -> bool:
    """SDM 3.3.7.1: with 4-level paging, bits 63:47 of a linear address must all be
    equal (48-bit linear addresses sign-extended)."""
    top = va >> 47
    return top == 0 or top == (1 << 17) - 1


def reserved_bits(entry: int, level: Level, ctx: PagingContext) -> int:
    """The reserved bits set in a present entry (SDM 4.5, Tables 4-14..4-20):

    - bits 51:MAXPHYADDR of every entry;
    - bit 63 (XD) when IA32_EFER.NXE = 0;
    - bit 7 (PS) in a PML4E; in a PDPTE too if 1 GiB pages are not supported;
    - in a 1 GiB PDPTE bits 29:13, in a 2 MiB PDE bits 20:13 (the large page's
      base must be aligned; bit 12 is its PAT bit).
    """
    rsvd = ((1 << 52) - 1) & ~((1 << ctx.maxphyaddr) - 1)
    if not ctx.nxe:
        rsvd |= int(PteFlag.XD)
    if level is Level.L4 or (level is Level.L3 and not ctx.page1gb):
        rsvd |= int(PteFlag.PS)
    elif level in (Level.L3, Level.L2) and entry & PteFlag.PS:
        size = PageSize.for_leaf_level(level)
        rsvd |= (size.value - 1) & ~((1 << 13) - 1)
    return int(entry) & rsvd


def is_leaf(entry: int, level: Level) -> bool:
    """A PTE always maps a page; a PDPTE or PDE does when PS = 1 (SDM 4.5)."""
    return level is Level.L1 or (level in (Level.L3, Level.L2) and bool(entry & PteFlag.PS))


def supervisor_denial(rights: Rights, access: Access, ctx: PagingContext) -> FaultCause | None:
    """SDM 4.6.1, supervisor-mode accesses (CPL < 3, or implicit):

    - data reads/writes of a user-mode address fault if CR4.SMAP = 1 and either the
      access is implicit or RFLAGS.AC = 0;
    - writes need R/W = 1 at every level when CR0.WP = 1 (any address);
    - fetches from a user-mode address fault if CR4.SMEP = 1; fetches need XD = 0 at
      every level when IA32_EFER.NXE = 1.
    """
    if access.kind is AccessKind.FETCH:
        if rights.user and ctx.smep:
            return FaultCause.SMEP
        if ctx.nxe and rights.execute_disable:
            return FaultCause.EXECUTE_DISABLE
        return None
    if rights.user and ctx.smap and (access.implicit or not ctx.ac):
        return FaultCause.SMAP
    if access.kind is AccessKind.WRITE and ctx.wp and not rights.writable:
        return FaultCause.WRITE_PROTECT
    return None


def user_denial(rights: Rights, access: Access, ctx: PagingContext) -> FaultCause | None:
    """SDM 4.6.1, user-mode accesses (CPL 3): only user-mode addresses (U/S = 1 at
    every level); writes need R/W = 1 at every level whatever CR0.WP says; fetches
    need XD = 0 at every level when IA32_EFER.NXE = 1."""
    if not rights.user:
        return FaultCause.USER_SUPERVISOR
    if access.kind is AccessKind.WRITE and not rights.writable:
        return FaultCause.WRITE_PROTECT
    if access.kind is AccessKind.FETCH and ctx.nxe and rights.execute_disable:
        return FaultCause.EXECUTE_DISABLE
    return None


def access_denial(rights: Rights, access: Access, ctx: PagingContext) -> FaultCause | None:
    """Whether the combined rights refuse this access (SDM 4.6), and why."""
    if access.user:
        return user_denial(rights, access, ctx)
    return supervisor_denial(rights, access, ctx)


def page_fault(va: int, access: Access, ctx: PagingContext, cause: FaultCause) -> PageFault:
    """Build the #PF for a walk that failed (SDM 4.7)."""
    present = cause is not FaultCause.NOT_PRESENT
    rsvd = cause is FaultCause.RESERVED_BIT
    return PageFault(
        cr2=va, error_code=error_code_for(access, present, rsvd, ctx.cr4, ctx.efer), cause=cause
    )


def set_accessed(mem: EntryMemory, addr: int, entry: int) -> int:
    """SDM 4.8: set A in an entry the walk used, if not already set."""
    if not entry & PteFlag.A:
        entry = entry | int(PteFlag.A)
        mem.write_u64(addr, entry)
    return entry


def set_leaf_flags(mem: EntryMemory, addr: int, entry: int, access: Access) -> int:
    """SDM 4.8: set A in the leaf; for a write also D ("the paging-structure entry
    that identifies the final physical address"). Written once, as one update."""
    new = entry | int(PteFlag.A)
    if access.kind is AccessKind.WRITE:
        new |= int(PteFlag.D)
    if new != entry:
        mem.write_u64(addr, new)
    return new


def walk(mem: EntryMemory, ctx: PagingContext, va: int, access: Access) -> WalkResult:
    """Translate ``va`` for ``access`` by walking the 4-level tables (SDM 4.5).

    The caller checks canonicality first (:func:`is_canonical`): a non-canonical
    address is a #GP, not a #PF. Returns the translation or the #PF, the number of
    entries read, and the addresses of those entries.
    """
    result = WalkResult(outcome=page_fault(va, access, ctx, FaultCause.NOT_PRESENT), refs=0)
    table = ctx.pml4_base
    rights = Rights()
    for level in (Level.L4, Level.L3, Level.L2, Level.L1):
        addr = table + table_index(va, level) * ENTRY_SIZE
        entry = mem.read_u64(addr)
        result.refs += 1
        result.entry_addrs.append(addr)
        if not entry & PteFlag.P:
            result.outcome = page_fault(va, access, ctx, FaultCause.NOT_PRESENT)
            return result
        if reserved_bits(entry, level, ctx):
            result.outcome = page_fault(va, access, ctx, FaultCause.RESERVED_BIT)
            return result
        rights = rights.narrowed_by(entry)
        if is_leaf(entry, level):
            return finish_walk(mem, ctx, va, access, level, addr, entry, rights, result)
        set_accessed(mem, addr, entry)
        table = entry_frame_address(entry, ctx.maxphyaddr)
    raise AssertionError("unreachable: a PTE is always a leaf")


def finish_walk(
    mem: EntryMemory,
    ctx: PagingContext,
    va: int,
    access: Access,
    level: Level,
    addr: int,
    entry: int,
    rights: Rights,
    result: WalkResult,
) -> WalkResult:
    """Check the combined rights at the leaf, then set its A/D flags (SDM 4.6, 4.8)."""
    denial = access_denial(rights, access, ctx)
    if denial is not None:
        result.outcome = page_fault(va, access, ctx, denial)
        return result
    entry = set_leaf_flags(mem, addr, entry, access)
    size = PageSize.for_leaf_level(level)
    base = entry_frame_address(entry, ctx.maxphyaddr, size)
    result.outcome = Translation(
        va=VA(va),
        pa=PA(base | (va & (size.value - 1))),
        size=size,
        rights=rights,
        global_page=ctx.pge and bool(entry & PteFlag.G),
        dirty=bool(entry & PteFlag.D),
        leaf_addr=addr,
        entry_addrs=tuple(result.entry_addrs),
    )
    return result
