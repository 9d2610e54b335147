"""The hypervisor's side of EPT: a domain's tables, built in Xen's own frames from the
domain's P2M and edited one entry at a time (Xen: xen/arch/x86/mm/p2m-ept.c,
``ept_set_entry`` and ``ept_next_level``; with HAP the EPT *is* Xen's P2M).

These are software operations on memory, not hardware: they read and write entries
directly, and count only the splitting of a large page (Event.EPT_SPLIT). The
hardware walk is :func:`.ept.ept_walk`.

Large pages: :meth:`Ept.from_p2m` maps a 1 GiB or 2 MiB guest-physical range with one
leaf when the P2M maps it to machine frames that are contiguous and aligned to the
same size (Xen's ``ept_set_entry`` with a superpage order, as ``p2m_set_entry``
chooses it from the alignment of GFN and MFN; KVM's ``kvm_mmu_hugepage_adjust``).
A later change to one 4 KiB page inside such a leaf first splits it into a table of
512 leaves one size smaller with the same frames and rights (Xen
``ept_split_super_page``), down to 4 KiB, then changes the one entry.
"""

from collections.abc import Iterator
from dataclasses import dataclass

from ...account.events import Event
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
#: Largest first: the leaf sizes :meth:`Ept.from_p2m` tries for each range.
LEAF_SIZES = (PageSize.SIZE_1G, PageSize.SIZE_2M, PageSize.SIZE_4K)
ENTRIES_PER_TABLE = 512


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
    def from_p2m(machine: Machine, domain: Domain, largest: PageSize = PageSize.SIZE_4K) -> "Ept":
        """Build the EPT of ``domain`` with read, write and execute (Xen's
        ``p2m_ram_rw``, ``ept_p2m_type_to_flags``): each GFN range the P2M maps
        contiguously and aligned gets one leaf of the largest size up to ``largest``
        that fits (:func:`leaf_size_at`), every other GFN a 4 KiB leaf."""
        ept = Ept(machine)
        rwx = EptFlag.R | EptFlag.W | EptFlag.X
        gfns = sorted(domain.p2m)
        covered = -1  #: the last GFN a large leaf already maps
        for gfn in gfns:
            if gfn <= covered:
                continue
            size = leaf_size_at(domain, gfn, largest)
            mfn = domain.p2m[gfn]
            if size is PageSize.SIZE_4K:
                ept.write_leaf(gfn, make_leaf(mfn, rwx))
            else:
                ept.write_large_leaf(gfn, size, make_leaf(mfn, rwx) | int(EptFlag.PS))
            covered = gfn + (size.value >> PAGE_SHIFT) - 1
        return ept

    @property
    def eptp(self) -> Eptp:
        return Eptp(self.root, EptMemType.WB)

    # -- finding and creating entries -----------------------------------------------------
    def entry_addr(self, gfn: int, level: Level = Level.L1, create: bool = False) -> int | None:
        """Machine address of the entry for ``gfn`` at ``level``; missing tables above
        it are created when ``create`` (Xen ``ept_next_level``), else None is returned.
        A large leaf above ``level`` is split when ``create`` (:meth:`split`); without
        ``create`` there is no entry at ``level`` and None is returned."""
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
                if not create:
                    return None
                entry = self.split(addr, lvl)
            table = entry & phys_addr_mask(self.mem.maxphyaddr)
        raise AssertionError("unreachable")

    def split(self, addr: int, level: Level) -> int:
        """Replace the large leaf at machine address ``addr`` (an EPT PDPTE or PDE) by
        a new table of 512 leaves one level down that map the same frames with the
        same bits (Xen ``ept_split_super_page``: each sub-entry inherits the
        superpage's attributes, its frame advanced by its index); returns the new
        table entry. Counted as Event.EPT_SPLIT. The translations do not change, so
        no invalidation is needed for the split itself; the change that caused it
        invalidates as usual (:meth:`HapBackend.ept_update`)."""
        large = self.mem.read_u64(addr)
        child = Level(level - 1)
        step = PageSize.for_leaf_level(child).value
        base = large & phys_addr_mask(self.mem.maxphyaddr) & ~(PageSize.for_leaf_level(level).value - 1)
        attrs = large & ~phys_addr_mask(self.mem.maxphyaddr)
        if child is Level.L1:
            attrs &= ~int(EptFlag.PS)  # bit 7 of an EPT PTE is ignored; Xen clears sp
        frame = self.machine.alloc_xen_frame()
        for i in range(ENTRIES_PER_TABLE):
            self.mem.write_u64((frame << PAGE_SHIFT) + i * ENTRY_SIZE, (base + i * step) | attrs)
        entry = make_table_entry(frame)
        self.mem.write_u64(addr, entry)
        self.machine.counters.add(Event.EPT_SPLIT)
        return entry

    def _new_table(self, addr: int) -> int:
        frame = self.machine.alloc_xen_frame()
        entry = make_table_entry(frame)
        self.mem.write_u64(addr, entry)
        return entry

    # -- leaves ---------------------------------------------------------------------------
    def read_leaf(self, gfn: int) -> int:
        """The EPT PTE for ``gfn`` (0 if no table reaches it, or a large leaf maps
        it: :meth:`lookup` sees those)."""
        addr = self.entry_addr(gfn)
        return 0 if addr is None else self.mem.read_u64(addr)

    def write_leaf(self, gfn: int, entry: int) -> int:
        """Store the EPT PTE for ``gfn``, creating tables (and splitting a large leaf
        that maps ``gfn``) as needed; returns the old entry — after a split, the 4 KiB
        entry the split made. Stores exactly what it is given: a bad value makes a
        misconfiguration."""
        addr = self.entry_addr(gfn, create=True)
        assert addr is not None
        old = self.mem.read_u64(addr)
        self.mem.write_u64(addr, entry)
        return old

    def write_large_leaf(self, gfn: int, size: PageSize, entry: int) -> int:
        """Store a 2 MiB or 1 GiB leaf mapping ``gfn`` (aligned to ``size``) and the
        frames after it; returns the old entry. Whatever hung below the old entry
        is no longer reached (Xen frees it: ``ept_free_entry``; here it is leaked)."""
        if size is PageSize.SIZE_4K or gfn % (size.value >> PAGE_SHIFT):
            raise RefmodelError(f"gfn {gfn:#x} is not the aligned start of a {size.name} EPT page")
        addr = self.entry_addr(gfn, size.leaf_level, create=True)
        assert addr is not None
        old = self.mem.read_u64(addr)
        self.mem.write_u64(addr, entry)
        return old

    def lookup(self, gfn: int) -> EptMapping | None:
        """The present leaf that maps ``gfn`` (of whatever size), or None."""
        gpa = gfn << PAGE_SHIFT
        table = self.root << PAGE_SHIFT
        for lvl in LEVELS:
            entry = self.mem.read_u64(table + table_index(gpa, lvl) * ENTRY_SIZE)
            if not is_present(entry):
                return None
            if is_ept_leaf(entry, lvl):
                size = PageSize.for_leaf_level(lvl)
                return self._mapping(gpa & ~(size.value - 1), entry, lvl)
            table = entry & phys_addr_mask(self.mem.maxphyaddr)
        raise AssertionError("unreachable: an EPT PTE is always a leaf")

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


def leaf_size_at(domain: Domain, gfn: int, largest: PageSize = PageSize.SIZE_1G) -> PageSize:
    """The largest EPT page, up to ``largest``, that can map ``gfn`` onwards: ``gfn``
    aligned to it and the P2M mapping all of its frames to contiguous machine frames
    starting at an equally aligned one (Xen ``p2m_set_entry`` picks the order from
    ``gfn | mfn`` alignment and the range; SDM Vol. 3C 29.3.2: a 2 MiB or 1 GiB EPT
    page's base must be aligned)."""
    mfn = domain.p2m.get(GFN(gfn))
    if mfn is None:
        raise RefmodelError(f"domain {domain.domid} has no gfn {gfn:#x}")
    for size in LEAF_SIZES:
        frames = size.value >> PAGE_SHIFT
        if size.value > largest.value or gfn % frames or mfn % frames:
            continue
        if all(domain.p2m.get(GFN(gfn + i)) == mfn + i for i in range(frames)):
            return size
    return PageSize.SIZE_4K
