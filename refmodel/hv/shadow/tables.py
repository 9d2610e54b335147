"""Shadow tables: where they live, what they shadow, and the reverse map.

Each shadow table is a hypervisor frame (owned by ``DOMID_XEN``) that shadows one
guest table frame used at one level — Xen's shadow page of type
``SH_type_l<N>_64_shadow`` with the guest frame as its "backpointer"
(xen/arch/x86/mm/shadow/common.c, ``shadow_hash_lookup``/``shadow_hash_insert``).
One guest table has at most one shadow per level, so a table reached along several
paths (a shared L1) has one shadow that every parent links to; and because shadow
entries copy the guest's rights level by level, that shadow is the same whatever the
path.

A guest frame with a shadow is *shadowed*: it is a guest page table the hypervisor
tracks and write-protects (Xen: ``sh_mfn_is_a_page_table``).

The reverse map (KVM's rmap, Documentation/virt/kvm/x86/mmu.rst "Reverse map") lists,
for every guest machine frame, the shadow leaf entries that map it. Write protection
uses it: when a frame becomes a page table, every writable shadow mapping of it is
found and made read-only (Xen ``sh_remove_write_access``, which finds them by
heuristics and a brute-force search instead).
"""

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from ...arch.pte import Level, PteFlag, entry_frame_address
from ...arch.types import ENTRIES_PER_TABLE, ENTRY_SIZE, GFN, MFN, PAGE_SHIFT
from ..machine import Machine
from .propagate import perms_strictly_increased

_TABLE_FORMAT = f"<{ENTRIES_PER_TABLE}Q"


@dataclass(frozen=True)
class ShadowPage:
    """The shadow (in hypervisor frame ``smfn``) of guest table ``gfn`` at ``level``."""

    gfn: GFN
    level: Level
    smfn: MFN

    def entry_address(self, index: int) -> int:
        """Machine address of shadow entry ``index``."""
        return (self.smfn << PAGE_SHIFT) + index * ENTRY_SIZE

    def describe(self) -> str:
        return f"shadow {self.level.name} of gfn {self.gfn:#x} (smfn {self.smfn:#x})"


class ShadowTables:
    """Every shadow table of one domain, and the reverse map of its leaves."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self._pages: dict[tuple[GFN, Level], ShadowPage] = {}
        self._by_smfn: dict[MFN, ShadowPage] = {}
        self._levels: dict[GFN, set[Level]] = {}
        #: guest MFN -> machine addresses of the present shadow leaf entries mapping it
        self._rmap: dict[MFN, set[int]] = {}

    # -- lookup ----------------------------------------------------------------------------
    def lookup(self, gfn: GFN, level: Level) -> ShadowPage | None:
        return self._pages.get((gfn, level))

    def by_smfn(self, smfn: int) -> ShadowPage | None:
        return self._by_smfn.get(MFN(smfn))

    def is_shadowed(self, gfn: GFN) -> bool:
        """Whether ``gfn`` is a guest page table with at least one shadow."""
        return gfn in self._levels

    def levels_of(self, gfn: GFN) -> frozenset[Level]:
        return frozenset(self._levels.get(gfn, ()))

    def pages(self) -> Iterator[ShadowPage]:
        return iter(list(self._pages.values()))

    def __len__(self) -> int:
        return len(self._pages)

    # -- allocation ------------------------------------------------------------------------
    def allocate(self, gfn: GFN, level: Level) -> ShadowPage:
        """A new, empty shadow for ``gfn`` at ``level`` (Xen ``shadow_alloc``)."""
        page = ShadowPage(gfn, level, self.machine.alloc_xen_frame())
        self._pages[(gfn, level)] = page
        self._by_smfn[page.smfn] = page
        self._levels.setdefault(gfn, set()).add(level)
        return page

    # -- entries ---------------------------------------------------------------------------
    def read(self, page: ShadowPage, index: int) -> int:
        return self.machine.mem.read_u64(page.entry_address(index))

    def entries(self, page: ShadowPage) -> tuple[int, ...]:
        """All 512 entries at once (for audits and resyncs)."""
        return struct.unpack(_TABLE_FORMAT, self.machine.mem.frame_bytes(page.smfn))

    def set_leaf(self, page: ShadowPage, index: int, value: int) -> None:
        """Write a shadow leaf entry, keeping the reverse map exact. Never needs a
        flush: "Unlike higher-level sets, never need an extra flush when writing an
        l1e. Because it points to the same guest frame as the guest l1e did, it's the
        guest's responsibility to trigger a flush later" (Xen set.c ``shadow_set_l1e``)."""
        addr = page.entry_address(index)
        old = self.machine.mem.read_u64(addr)
        if old == value:
            return
        if old & PteFlag.P:
            self._rmap_discard(self._target(old), addr)
        if value & PteFlag.P:
            self._rmap.setdefault(self._target(value), set()).add(addr)
        self.machine.mem.write_u64(addr, value)

    def set_upper(self, page: ShadowPage, index: int, value: int) -> bool:
        """Write a shadow PML4E/PDPTE/PDE; returns whether the TLB must be flushed:
        the old entry was present and the new one points elsewhere or does not
        strictly increase its rights (Xen set.c ``shadow_set_l{2,3,4}e``)."""
        addr = page.entry_address(index)
        old = self.machine.mem.read_u64(addr)
        if old == value:
            return False
        self.machine.mem.write_u64(addr, value)
        if not old & PteFlag.P:
            return False
        moved = not value & PteFlag.P or self._target(old) != self._target(value)
        return moved or not perms_strictly_increased(old, value)

    def link_target(self, entry: int) -> ShadowPage | None:
        """The shadow table a present upper-level shadow entry links to."""
        if not entry & PteFlag.P:
            return None
        return self.by_smfn(self._target(entry))

    # -- the reverse map and write protection -------------------------------------------------
    def mappings_of(self, mfn: MFN) -> frozenset[int]:
        """Machine addresses of the present shadow leaf entries mapping ``mfn``."""
        return frozenset(self._rmap.get(mfn, ()))

    def remove_write_access(self, mfn: MFN) -> int:
        """Make every shadow mapping of ``mfn`` read-only; returns how many were
        writable (non-zero: the TLB may still hold them, flush — Xen common.c
        ``sh_remove_write_access``, "We killed at least one writeable mapping, so
        must flush TLBs")."""
        removed = 0
        for addr in sorted(self._rmap.get(mfn, ())):
            entry = self.machine.mem.read_u64(addr)
            if entry & PteFlag.RW:
                self.machine.mem.write_u64(addr, entry & ~int(PteFlag.RW | PteFlag.D))
                removed += 1
        return removed

    def _target(self, entry: int) -> MFN:
        return MFN(entry_frame_address(entry, self.machine.mem.maxphyaddr) >> PAGE_SHIFT)

    def _rmap_discard(self, mfn: MFN, addr: int) -> None:
        entries = self._rmap.get(mfn)
        if entries is not None:
            entries.discard(addr)
            if not entries:
                del self._rmap[mfn]
