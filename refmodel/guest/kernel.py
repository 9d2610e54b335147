"""A minimal guest kernel, written once against :class:`~refmodel.guest.ops.MmuBackend`.

It keeps processes with their own 4-level page tables and offers the operations a
workload is made of — map a range (on demand or populated at once), unmap, protect,
fork with copy-on-write, switch process, touch memory — with its own page-fault
handler (demand paging and copy-on-write breaking, as Linux's ``handle_mm_fault``).

Its TLB discipline follows Linux (arch/x86/mm/tlb.c): after changing live mappings
it invalidates page by page up to ``tlb_single_page_flush_ceiling`` = 33 pages, and
flushes the whole TLB above that. Page-table updates that belong together run in a
lazy-MMU section, which a PV backend turns into batched hypercalls.

Everything the guest can observe is recorded in :attr:`GuestKernel.observations`,
and :meth:`GuestKernel.page_table_view` reads its leaf entries back (A/D included):
the same workload must give the same record under every mode, up to the bits a
hypervisor adds to the entries it stores (:func:`as_stored_by`).

Which flags it writes (:class:`PteFlavour`): by default the ones Linux writes —
A in every user leaf, D in every writable anonymous leaf, A and D in every table
entry — so that a hypervisor meets the entries a real guest gives it. The
``AD_CLEAR`` flavour writes A and D clear everywhere, leaving the processor (or a
shadowing hypervisor, with a hidden fault per first touch) to set them: a named
variant that shows what those hidden faults cost.

Simplifications, stated: user pages only (the kernel reaches its memory through an
unmodelled direct map, :meth:`MmuBackend.read_frame_u64`); frames are never reused
once freed, so a freed page-table frame never comes back as data.
"""

import enum
from dataclasses import dataclass, field

from ..account.events import Event
from ..arch.access import AccessKind
from ..arch.fault import PageFault, PfErrorCode
from ..arch.pte import Level, PteFlag, table_index
from ..arch.types import GFN, PAGE_SHIFT, PAGE_SIZE
from ..errors import RefmodelError
from .ops import MmuBackend

#: Linux arch/x86/mm/tlb.c: above this many pages a full flush is cheaper.
TLB_SINGLE_PAGE_FLUSH_CEILING = 33
#: Flags of a non-leaf entry: the leaf alone restricts rights.
TABLE_ENTRY_FLAGS = PteFlag.P | PteFlag.RW | PteFlag.US
#: Linux's ``_PAGE_TABLE`` (arch/x86/include/asm/pgtable_types.h): ``__PP | __RW |
#: _USR | ___A | __D`` — a table entry is written accessed and dirty, so the
#: processor never has to set either in it (``pmd_populate``, ``pud_populate``...).
LINUX_PAGE_TABLE = TABLE_ENTRY_FLAGS | PteFlag.A | PteFlag.D
#: Accessed and Dirty, the flags the two flavours disagree on.
AD = int(PteFlag.A | PteFlag.D)
#: User-space addresses end below the canonical hole.
USER_TOP = 1 << 47
FRAME_MASK = ((1 << 52) - 1) & ~(PAGE_SIZE - 1)


class FaultLoop(RefmodelError):
    """The handler resolved a fault four times and the access still faults: the
    page tables are not what the kernel believes (a bug, unless the guest stored
    into its own page tables through a self-mapping)."""


@dataclass(frozen=True)
class Observation:
    """One guest-visible event: a completed access, or a #PF the guest received."""

    event: str  #: "read", "write", "fetch" or "fault"
    va: int
    value: int | None = None  #: the value loaded (reads, fetches)
    error_code: int | None = None  #: faults: the #PF error code (CR2 is ``va``)


@dataclass(frozen=True)
class Vma:
    """A user mapping the process asked for: pages ``start`` .. ``start + npages``."""

    start: int
    npages: int
    writable: bool

    def covers(self, va: int) -> bool:
        return self.start <= va < self.end

    @property
    def end(self) -> int:
        return self.start + self.npages * PAGE_SIZE

    def without(self, va: int, npages: int) -> list["Vma"]:
        """What is left of this mapping after unmapping ``npages`` from ``va``: none,
        one or two pieces (munmap may split a mapping, as Linux's do_vmi_munmap)."""
        end = va + npages * PAGE_SIZE
        if end <= self.start or va >= self.end:
            return [self]
        parts = []
        if self.start < va:
            parts.append(Vma(self.start, (va - self.start) // PAGE_SIZE, self.writable))
        if end < self.end:
            parts.append(Vma(end, (self.end - end) // PAGE_SIZE, self.writable))
        return parts

    def with_protection(self, va: int, npages: int, writable: bool) -> list["Vma"]:
        """This mapping after mprotect of ``npages`` from ``va``: the overlap takes the
        new protection, the rest keeps its own (mprotect may split, as Linux's)."""
        lo, hi = max(self.start, va), min(self.end, va + npages * PAGE_SIZE)
        if lo >= hi:
            return [self]
        return self.without(va, npages) + [Vma(lo, (hi - lo) // PAGE_SIZE, writable)]


@dataclass
class Process:
    pid: int
    root: GFN
    vmas: list[Vma] = field(default_factory=list)
    #: every page table below the root: (level, first VA it covers) -> frame
    tables: dict[tuple[Level, int], GFN] = field(default_factory=dict)
    #: pages currently mapped (page-aligned VAs)
    mapped: set[int] = field(default_factory=set)

    def vma_for(self, va: int) -> Vma | None:
        return next((v for v in self.vmas if v.covers(va)), None)


class PteFlavour(enum.Enum):
    """Which A/D flags the guest kernel writes into the entries it creates."""

    #: As Linux on x86-64 (each method cites where).
    LINUX = "linux"
    #: A and D clear in every new entry: the processor sets them on first use, and a
    #: shadowing hypervisor pays a hidden fault for each (an upper bound on that cost).
    AD_CLEAR = "ad-clear"

    def table(self) -> int:
        """A table entry: Linux's ``_PAGE_TABLE`` (P, RW, US, A, D)."""
        return int(LINUX_PAGE_TABLE if self is PteFlavour.LINUX else TABLE_ENTRY_FLAGS)

    def leaf(self, writable: bool) -> int:
        """A freshly allocated anonymous user page: present, user, not executable,
        writable if the mapping is. Linux takes ``vma->vm_page_prot`` — ``PAGE_SHARED``
        or ``PAGE_COPY``, both with ``_PAGE_ACCESSED`` (pgtable_types.h) — and
        ``do_anonymous_page`` (mm/memory.c) makes a writable one dirty:
        ``pte_mkwrite(pte_mkdirty(entry), vma)``. (MAP_POPULATE faults the pages in
        with FOLL_WRITE for a private writable mapping, ``populate_vma_page_range``;
        the read-fault zero page is not modelled: every fault allocates.)"""
        flags = int(PteFlag.P | PteFlag.US | PteFlag.XD)
        if writable:
            flags |= int(PteFlag.RW)
        if self is PteFlavour.LINUX:
            flags |= int(PteFlag.A) | (int(PteFlag.D) if writable else 0)
        return flags

    def migrated(self, old_flags: int) -> int:
        """A page moved to a new frame keeps its young and dirty state: Linux's
        ``remove_migration_pte`` (mm/migrate.c) re-creates A and D from the migration
        entry (``is_migration_entry_young`` / ``_dirty``)."""
        return old_flags if self is PteFlavour.LINUX else old_flags & ~AD

    def forked(self, parent_flags: int) -> int:
        """The child's copy of a private entry: ``copy_present_pte`` (mm/memory.c)
        makes it old (``pte_mkold``) and keeps D (``pte_mkclean`` is for shared
        mappings only)."""
        return parent_flags & ~int(PteFlag.A) if self is PteFlavour.LINUX else parent_flags & ~AD

    def cow_copy(self, flags: int) -> int:
        """The writer's new copy after a copy-on-write fault: ``wp_page_copy``
        (mm/memory.c) builds it from ``vm_page_prot`` (with A) and
        ``maybe_mkwrite(pte_mkdirty(entry), vma)``."""
        return flags | AD if self is PteFlavour.LINUX else flags & ~AD

    def cow_reuse(self, flags: int) -> int:
        """The last sharer gets its frame back writable: ``wp_page_reuse``
        (mm/memory.c): ``pte_mkyoung`` then ``maybe_mkwrite(pte_mkdirty(entry))``."""
        return flags | AD if self is PteFlavour.LINUX else flags


def leaf_flags(writable: bool, flavour: PteFlavour = PteFlavour.LINUX) -> int:
    """A new user data page's flags (:meth:`PteFlavour.leaf`)."""
    return flavour.leaf(writable)


class GuestKernel:
    """Processes, their page tables, and a page-fault handler."""

    def __init__(
        self, backend: MmuBackend, nr_frames: int, first_frame: int = 1, flavour: PteFlavour = PteFlavour.LINUX
    ) -> None:
        self.mmu = backend
        self.flavour = flavour
        self.nr_frames = nr_frames
        self._next_frame = first_frame
        self.processes: dict[int, Process] = {}
        self.current: Process | None = None
        self.observations: list[Observation] = []
        self.sharers: dict[GFN, int] = {}  #: copy-on-write: how many PTEs share a frame

    # -- frames ----------------------------------------------------------------------
    def alloc_frame(self) -> GFN:
        """A fresh, zeroed guest frame (never one used before)."""
        if self._next_frame >= self.nr_frames:
            raise RefmodelError(f"guest out of memory: all {self.nr_frames} frames used")
        gfn = GFN(self._next_frame)
        self._next_frame += 1
        return gfn

    def alloc_table(self, level: Level) -> GFN:
        gfn = self.alloc_frame()
        self.mmu.new_table(gfn, level)
        return gfn

    def entry(self, frame: GFN, flags: int) -> int:
        return (self.mmu.pte_frame(frame) << PAGE_SHIFT) | flags

    def frame_of(self, pte: int) -> GFN:
        return self.mmu.entry_gfn((pte & FRAME_MASK) >> PAGE_SHIFT)

    # -- processes -----------------------------------------------------------------------
    def create_process(self) -> int:
        pid = len(self.processes) + 1
        self.processes[pid] = Process(pid, self.alloc_table(Level.L4))
        if self.current is None:
            self.switch_to(pid)
        return pid

    def process(self, pid: int) -> Process:
        try:
            return self.processes[pid]
        except KeyError:
            raise RefmodelError(f"no process {pid}") from None

    def switch_to(self, pid: int) -> None:
        """Context switch between processes: a CR3 load."""
        proc = self.process(pid)
        self.current = proc
        self.mmu.load_cr3(proc.root)

    # -- page-table structure -------------------------------------------------------------
    def l1_table(self, proc: Process, va: int) -> GFN:
        """The L1 table for ``va``, creating (and linking) missing L3/L2/L1 tables."""
        table = proc.root
        for level in (Level.L4, Level.L3, Level.L2):
            child_level = Level(level - 1)
            key = (child_level, va & ~((1 << level.index_shift) - 1))
            child = proc.tables.get(key)
            if child is None:
                child = self.alloc_table(child_level)
                proc.tables[key] = child
                self.mmu.write_pte(table, table_index(va, level), level, self.entry(child, self.flavour.table()))
            table = child
        return table

    def _check_range(self, va: int, npages: int) -> None:
        if va % PAGE_SIZE or npages <= 0 or va < 0 or va + npages * PAGE_SIZE > USER_TOP:
            raise RefmodelError(f"range {va:#x} + {npages} pages is not page-aligned user space")

    def _set_leaf(self, proc: Process, va: int, value: int) -> None:
        self.mmu.write_pte(self.l1_table(proc, va), table_index(va, Level.L1), Level.L1, value)

    def _read_leaf(self, proc: Process, va: int) -> int:
        return self.mmu.read_pte(self.l1_table(proc, va), table_index(va, Level.L1))

    def _invalidate(self, pages: list[int]) -> None:
        """Linux's flush_tlb_range policy: INVLPG each page up to the ceiling."""
        if len(pages) > TLB_SINGLE_PAGE_FLUSH_CEILING:
            self.mmu.flush_tlb()
        else:
            for va in pages:
                self.mmu.invlpg(va)

    def _is_current(self, proc: Process) -> bool:
        return self.current is proc

    # -- workload operations ----------------------------------------------------------------
    def map_range(self, pid: int, va: int, npages: int, writable: bool = True, populate: bool = False) -> None:
        """mmap: record the range; with ``populate`` (MAP_POPULATE) also allocate every
        page now — tables first, then all leaf entries in one lazy section."""
        self._check_range(va, npages)
        proc = self.process(pid)
        if any(proc.vma_for(va + i * PAGE_SIZE) for i in range(npages)):
            raise RefmodelError(f"range {va:#x} + {npages} pages overlaps an existing mapping")
        proc.vmas.append(Vma(va, npages, writable))
        if not populate:
            return
        pages = [va + i * PAGE_SIZE for i in range(npages)]
        self.mmu.lazy_begin()
        for page in pages:
            self.l1_table(proc, page)
        self.mmu.lazy_end()
        self.mmu.lazy_begin()
        for page in pages:
            self._set_leaf(proc, page, self.entry(self.alloc_frame(), self.flavour.leaf(writable)))
            proc.mapped.add(page)
        self.mmu.lazy_end()

    def unmap_range(self, pid: int, va: int, npages: int) -> None:
        """munmap: clear the entries, then invalidate (the frames are not reused)."""
        self._check_range(va, npages)
        proc = self.process(pid)
        pages = [va + i * PAGE_SIZE for i in range(npages) if va + i * PAGE_SIZE in proc.mapped]
        self.mmu.lazy_begin()
        for page in pages:
            self._set_leaf(proc, page, 0)
            proc.mapped.discard(page)
        if self._is_current(proc):
            self._invalidate(pages)
        self.mmu.lazy_end()
        proc.vmas = [part for v in proc.vmas for part in v.without(va, npages)]

    def protect(self, pid: int, va: int, npages: int, writable: bool) -> None:
        """mprotect: change R/W of every mapped page in the range, then invalidate."""
        self._check_range(va, npages)
        proc = self.process(pid)
        pages = [va + i * PAGE_SIZE for i in range(npages) if va + i * PAGE_SIZE in proc.mapped]
        self.mmu.lazy_begin()
        for page in pages:
            old = self._read_leaf(proc, page)
            new = old | int(PteFlag.RW) if writable and not self._shared(old) else old & ~int(PteFlag.RW)
            self._set_leaf(proc, page, new)
        if self._is_current(proc):
            self._invalidate(pages)
        self.mmu.lazy_end()
        proc.vmas = sorted(
            (part for v in proc.vmas for part in v.with_protection(va, npages, writable)), key=lambda v: v.start
        )

    def remap(self, pid: int, va: int, npages: int) -> None:
        """Move every mapped page of the range to a new frame (as page migration
        does): copy, rewrite the live entry, invalidate that page."""
        self._check_range(va, npages)
        proc = self.process(pid)
        self.mmu.lazy_begin()
        for page in (va + i * PAGE_SIZE for i in range(npages)):
            if page not in proc.mapped:
                continue
            old = self._read_leaf(proc, page)
            new_frame = self.alloc_frame()
            self.mmu.copy_frame(self.frame_of(old), new_frame)
            flags = self.flavour.migrated(old & ~FRAME_MASK)
            self._set_leaf(proc, page, self.entry(new_frame, flags))
            if self._is_current(proc):
                self.mmu.invlpg(page)
        self.mmu.lazy_end()

    def fork(self, pid: int) -> int:
        """fork: the child gets the parent's mappings copy-on-write; both sides lose
        R/W on shared writable pages; the parent's TLB is flushed."""
        parent = self.process(pid)
        child_pid = self.create_process()
        child = self.processes[child_pid]
        child.vmas = list(parent.vmas)
        self.mmu.lazy_begin()
        for page in sorted(parent.mapped):
            self.l1_table(child, page)
        self.mmu.lazy_end()
        self.mmu.lazy_begin()
        for page in sorted(parent.mapped):
            pte = self._read_leaf(parent, page)
            shared = pte & ~int(PteFlag.RW)
            if pte & PteFlag.RW:
                self._set_leaf(parent, page, shared)
            frame = self.frame_of(pte)
            self.sharers[frame] = self.sharers.get(frame, 1) + 1
            self._set_leaf(child, page, self.flavour.forked(shared))
            child.mapped.add(page)
        if self._is_current(parent) and parent.mapped:
            self.mmu.flush_tlb()
        self.mmu.lazy_end()
        return child_pid

    def _shared(self, pte: int) -> bool:
        return self.sharers.get(self.frame_of(pte), 1) > 1

    # -- touching memory and the page-fault handler ------------------------------------------
    def touch(self, va: int, kind: AccessKind = AccessKind.READ, value: int = 0) -> None:
        """A user-mode access by the current process; faults go to the handler, and
        the access is retried after a fault the handler resolved."""
        if self.current is None:
            raise RefmodelError("no process is running")
        if not 0 <= va < USER_TOP or va % 8:
            raise RefmodelError(f"touch {va:#x}: need an 8-byte aligned user address")
        for _ in range(4):
            out = self.mmu.access(va, kind, 3, value)
            if not isinstance(out, PageFault):
                self.observations.append(Observation(kind.value, va, None if kind is AccessKind.WRITE else out))
                return
            self.observations.append(Observation("fault", out.cr2, error_code=int(out.error_code)))
            self.mmu.counters.add(Event.GUEST_PAGE_FAULT)
            if not self.handle_page_fault(self.current, out):
                return  # SIGSEGV: the process just does not get its access
        raise FaultLoop(f"touch {va:#x}: fault handler did not make progress")

    def handle_page_fault(self, proc: Process, fault: PageFault) -> bool:
        """Demand paging and copy-on-write (Linux ``handle_mm_fault``). Returns False
        for a fault no mapping explains."""
        va = fault.cr2 & ~(PAGE_SIZE - 1)
        vma = proc.vma_for(va)
        if vma is None:
            return False
        write = bool(fault.error_code & PfErrorCode.W)
        if not fault.error_code & PfErrorCode.P:
            if va in proc.mapped:
                return False
            self._set_leaf(proc, va, self.entry(self.alloc_frame(), self.flavour.leaf(vma.writable)))
            proc.mapped.add(va)
            return True
        if write and vma.writable:
            self.break_cow(proc, va)
            return True
        return False

    def break_cow(self, proc: Process, va: int) -> None:
        """Give the writer its own copy (or its frame back, if it is the last sharer)."""
        pte = self._read_leaf(proc, va)
        frame = self.frame_of(pte)
        sharers = self.sharers.get(frame, 1)
        flags = (pte & ~FRAME_MASK) | int(PteFlag.RW)
        if sharers > 1:
            self.sharers[frame] = sharers - 1
            new = self.alloc_frame()
            self.mmu.copy_frame(frame, new)
            self._set_leaf(proc, va, self.entry(new, self.flavour.cow_copy(flags)))
        else:
            self.sharers.pop(frame, None)
            self._set_leaf(proc, va, self.entry(frame, self.flavour.cow_reuse(flags)))
        self.mmu.invlpg(va)

    # -- what the guest can see ----------------------------------------------------------------
    def page_table_view(self) -> dict[int, dict[int, tuple[int, int]]]:
        """Every mapped leaf of every process as (gfn, flags), flags incl. A/D and
        any bits the hypervisor added (:meth:`MmuBackend.stored_entry`)."""
        view: dict[int, dict[int, tuple[int, int]]] = {}
        for pid, proc in sorted(self.processes.items()):
            view[pid] = {}
            for va in sorted(proc.mapped):
                pte = self._read_leaf(proc, va)
                view[pid][va] = (int(self.frame_of(pte)), pte & ~FRAME_MASK)
        return view


PageTableView = dict[int, dict[int, tuple[int, int]]]


def as_stored_by(view: PageTableView, backend: MmuBackend) -> PageTableView:
    """``view`` (of a guest under a mode that stores entries as written, such as
    native) with every leaf's flags as ``backend`` would store them: what the same
    guest reads back under ``backend``'s mode if it behaves the same."""
    return {
        pid: {va: (gfn, backend.stored_entry(flags, Level.L1)) for va, (gfn, flags) in leaves.items()}
        for pid, leaves in view.items()
    }
