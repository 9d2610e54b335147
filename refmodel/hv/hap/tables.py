"""The hypervisor's side of EPT: a domain's tables, built in Xen's own frames from the
domain's P2M and edited one entry at a time (Xen: xen/arch/x86/mm/p2m-ept.c,
``ept_set_entry`` and ``ept_next_level``; with HAP the EPT *is* Xen's P2M).

These are software operations on memory, not hardware: they read and write entries
directly and count nothing. The hardware walk is :func:`.ept.ept_walk`. Only 4 KiB
leaves are built; the walk understands 2 MiB and 1 GiB leaves a test writes by hand.
"""

from collections.abc import Iterator
from dataclasses import dataclass

from ...arch.pte import Level, PageSize, phys_addr_mask, table_index
from ...arch.types import ENTRY_SIZE, GFN, MFN, PAGE_SHIFT
from ...errors import RefmodelError
from ..machine import Domain, Machine
from .ept import (
    EptFlag,
    EptMemType,
    Eptp,
    EptRights,
    is_ept_leaf,
    is_present,
    make_leaf,
    make_table_entry,
)

LEVELS = (Level.L4, Level.L3, Level.L2, Level.L1)


@dataclass(frozen=True)
class EptMapping:
    """One present EPT leaf: guest frames ``gfn`` .. map to machine frames ``mfn`` .."""

    gfn: GFN
    mfn: MFN
    size: PageSize
    rights: EptRights  #: the leaf's own bits 2:0 (the tables above it are built RWX)

    @property
    def frames(self) -> int:
        return self.size.value >> PAGE_SHIFT


class Ept:
    """One domain's extended page tables, in hypervisor (``DOMID_XEN``) frames."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.mem = machine.mem
        self.root: MFN = machine.alloc_xen_frame()

    @staticmethod
    def from_p2m(machine: Machine, domain: Domain) -> "Ept":
        """Build the EPT of ``domain``: every P2M entry GFN -> MFN as a 4 KiB leaf
        with read, write and execute (Xen's ``p2m_ram_rw``, ``ept_p2m_type_to_flags``)."""
        ept = Ept(machine)
        for gfn, mfn in sorted(domain.p2m.items()):
            ept.write_leaf(gfn, make_leaf(mfn, EptFlag.R | EptFlag.W | EptFlag.X))
        return ept

    @property
    def eptp(self) -> Eptp:
        return Eptp(self.root, EptMemType.WB)

    # -- finding and creating entries -----------------------------------------------------
    def entry_addr(self, gfn: int, level: Level = Level.L1, create: bool = False) -> int | None:
        """Machine address of the entry for ``gfn`` at ``level``; missing tables above
        it are created when ``create`` (Xen ``ept_next_level``), else None is returned.
        A large leaf above ``level`` is a caller error: this editor does not split."""
        if not 0 <= gfn < (1 << 36):
            raise RefmodelError(f"gfn {gfn:#x} is beyond 4-level EPT's 48-bit guest-physical space")
        gpa = gfn << PAGE_SHIFT
        table = self.root << PAGE_SHIFT
        for lvl in LEVELS:
            addr = table + table_index(gpa, lvl) * ENTRY_SIZE
            if lvl is level:
                return addr
            entry = self.mem.read_u64(addr)
            if not is_present(entry):
                if not create:
                    return None
                entry = self._new_table(addr)
            elif is_ept_leaf(entry, lvl):
                raise RefmodelError(f"gfn {gfn:#x}: a large EPT leaf maps it at {lvl.entry_name}; splitting is not modelled")
            table = entry & phys_addr_mask(self.mem.maxphyaddr)
        raise AssertionError("unreachable")

    def _new_table(self, addr: int) -> int:
        frame = self.machine.alloc_xen_frame()
        entry = make_table_entry(frame)
        self.mem.write_u64(addr, entry)
        return entry

    # -- leaves ---------------------------------------------------------------------------
    def read_leaf(self, gfn: int) -> int:
        """The EPT PTE for ``gfn`` (0 if no table reaches it)."""
        addr = self.entry_addr(gfn)
        return 0 if addr is None else self.mem.read_u64(addr)

    def write_leaf(self, gfn: int, entry: int) -> int:
        """Store the EPT PTE for ``gfn``, creating tables as needed; returns the old
        entry. Stores exactly what it is given: a bad value makes a misconfiguration."""
        addr = self.entry_addr(gfn, create=True)
        assert addr is not None
        old = self.mem.read_u64(addr)
        self.mem.write_u64(addr, entry)
        return old

    def lookup(self, gfn: int) -> EptMapping | None:
        """The present 4 KiB leaf for ``gfn``, or None."""
        entry = self.read_leaf(gfn)
        return self._mapping(gfn << PAGE_SHIFT, entry, Level.L1) if is_present(entry) else None

    def _mapping(self, gpa: int, entry: int, level: Level) -> EptMapping:
        """Decode a present leaf of ``level`` that maps ``gpa``."""
        size = PageSize.for_leaf_level(level)
        frame = (entry & phys_addr_mask(self.mem.maxphyaddr) & ~(size.value - 1)) >> PAGE_SHIFT
        return EptMapping(GFN(gpa >> PAGE_SHIFT), MFN(frame), size, EptRights.of(entry))

    # -- the whole tree, as the hardware would reach it ---------------------------------------
    def mappings(self) -> Iterator[EptMapping]:
        """Every present leaf, in GFN order."""
        for node in self._walk_tree(self.root, Level.L4, 0):
            if isinstance(node, EptMapping):
                yield node

    def tables(self) -> list[MFN]:
        """Every EPT table frame reachable from the root, root first."""
        return [self.root] + [node for node in self._walk_tree(self.root, Level.L4, 0) if not isinstance(node, EptMapping)]

    def _walk_tree(self, table: MFN, level: Level, gpa_base: int) -> Iterator[EptMapping | MFN]:
        """Depth first: each present leaf as a mapping, each lower table as its frame."""
        mask = phys_addr_mask(self.mem.maxphyaddr)
        for index in range(512):
            entry = self.mem.read_u64((table << PAGE_SHIFT) + index * ENTRY_SIZE)
            if not is_present(entry):
                continue
            gpa = gpa_base | (index << level.index_shift)
            if is_ept_leaf(entry, level):
                yield self._mapping(gpa, entry, level)
            else:
                child = MFN((entry & mask) >> PAGE_SHIFT)
                yield child
                yield from self._walk_tree(child, Level(level - 1), gpa)
