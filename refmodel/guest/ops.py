"""The abstract MMU interface a guest kernel is written against — refmodel's
counterpart of Linux's paravirt MMU operations (arch/x86/include/asm/paravirt.h:
``set_pte``, ``flush_tlb_*``, ``write_cr3``, ``arch_enter/leave_lazy_mmu_mode``).

A backend decides what each operation *costs* (plain store, trap and emulate,
hypercall, nested walk); it must never change what the guest *sees*. What the guest
sees is the values it loads, the page faults delivered to it (CR2 and error code),
and the contents of its own page tables read back through :meth:`MmuBackend.read_pte`
(so Accessed/Dirty flags are guest-visible too).
"""

import enum
from abc import ABC, abstractmethod

from ..account.events import Counters
from ..arch.access import AccessKind
from ..arch.fault import PageFault
from ..arch.pte import Level
from ..arch.types import GFN


class Mode(enum.Enum):
    """The ways refmodel runs a guest."""

    NATIVE = "native"  #: no hypervisor
    SHADOW = "shadow"  #: shadow paging, every guest page-table write trapped
    SHADOW_OOS = "shadow-oos"  #: shadow paging with out-of-sync L1 tables
    PV = "pv"  #: Xen PV MMU hypercalls (batch size decides batched or not)
    HAP = "hap"  #: nested paging (EPT) with VPID


class MmuBackend(ABC):
    """What a guest kernel may ask of "its MMU". Frame arguments are the guest's own
    frame numbers (GFNs); :meth:`pte_frame` says what number goes into an entry."""

    mode: Mode
    counters: Counters

    # -- the guest's physical memory ------------------------------------------------
    @abstractmethod
    def read_frame_u64(self, gfn: GFN, offset: int) -> int:
        """A kernel load from its own physical memory (its direct map)."""

    @abstractmethod
    def write_frame_u64(self, gfn: GFN, offset: int, value: int) -> None:
        """A kernel store to one of its *data* frames (never a page-table frame:
        those are written with :meth:`write_pte`)."""

    @abstractmethod
    def copy_frame(self, src: GFN, dst: GFN) -> None:
        """The kernel's memcpy of a whole 4 KiB data frame (copy-on-write, remap)."""

    # -- page tables -----------------------------------------------------------------
    @abstractmethod
    def pte_frame(self, gfn: GFN) -> int:
        """The frame number the guest stores in an entry that references ``gfn``: the
        GFN itself, except for a PV guest, whose tables hold machine frame numbers
        (Linux: ``pfn_to_mfn`` in ``xen_make_pte``)."""

    @abstractmethod
    def entry_gfn(self, frame: int) -> GFN:
        """Inverse of :meth:`pte_frame` (PV: the M2P lookup)."""

    @abstractmethod
    def read_pte(self, table: GFN, index: int) -> int:
        """Read entry ``index`` of the guest page table in frame ``table``."""

    @abstractmethod
    def write_pte(self, table: GFN, index: int, level: Level, value: int) -> None:
        """Set entry ``index`` of the level-``level`` table in frame ``table``. Inside a
        lazy section a backend may queue it; it takes effect at the latest at
        :meth:`lazy_end`."""

    def stored_entry(self, entry: int, level: Level) -> int:
        """The entry a page-table write of ``entry`` at ``level`` leaves behind, as
        the guest reads it back: what it wrote, unless the hypervisor rewrites
        entries as it stores them (Xen PV, :mod:`refmodel.hv.pv.adjust`)."""
        return entry

    @abstractmethod
    def new_table(self, table: GFN, level: Level) -> None:
        """Frame ``table`` (zeroed) is about to become a page table of ``level``
        (Linux: ``paravirt_alloc_pte``/``pmd``/``pud``; Xen PV pins top levels)."""

    @abstractmethod
    def lazy_begin(self) -> None:
        """Enter lazy MMU mode: updates and flushes may be batched until
        :meth:`lazy_end` (Linux ``arch_enter_lazy_mmu_mode``)."""

    @abstractmethod
    def lazy_end(self) -> None:
        """Leave lazy MMU mode: every queued update and flush takes effect."""

    # -- the processor -----------------------------------------------------------------
    @abstractmethod
    def load_cr3(self, root: GFN) -> None:
        """Switch address space to the L4 table in ``root`` (flushes non-global entries)."""

    @abstractmethod
    def invlpg(self, va: int) -> None:
        """Invalidate the TLB entry for one page."""

    @abstractmethod
    def flush_tlb(self) -> None:
        """Invalidate every non-global TLB entry of the current address space."""

    @abstractmethod
    def access(self, va: int, kind: AccessKind, cpl: int = 3, value: int = 0) -> int | PageFault:
        """A load (returns the 8-byte value), store (returns 0) or fetch (returns the
        byte) at ``va``, or the page fault the guest receives."""
