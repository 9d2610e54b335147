"""Native: no hypervisor. The guest's physical frames are the machine's, its page
tables are the ones the MMU walks, and every operation is the bare instruction
(a store, MOV CR3, INVLPG). The baseline every other mode is compared with.
"""

from dataclasses import replace

from ..account.events import Counters
from ..arch.access import AccessKind
from ..arch.control import CR3_NOFLUSH, Cr4
from ..arch.fault import GeneralProtection, PageFault
from ..arch.mmu import LoadResult, Mmu
from ..arch.physmem import PhysicalMemory
from ..arch.pte import Level, PteFlag
from ..arch.tlb import Tlb
from ..arch.types import ENTRY_SIZE, GFN, PAGE_SHIFT
from ..arch.vcpu import ArchState
from ..errors import RefmodelError
from ..guest.ops import MmuBackend, Mode

#: Bits 51:12 of an entry: the frame it references.
FRAME_MASK = ((1 << 52) - 1) & ~((1 << PAGE_SHIFT) - 1)
#: TLB geometry shared by every mode: 1536 entries, 12-way (a Skylake-class L2 STLB).
TLB_CAPACITY = 1536
TLB_WAYS = 12


def hardware_access(mmu: Mmu, va: int, kind: AccessKind, cpl: int, value: int) -> int | PageFault:
    """Run one access on an :class:`Mmu` at ``cpl`` and reduce it to what the guest sees."""
    mmu.state = replace(mmu.state, cpl=cpl)
    if kind is AccessKind.READ:
        out: object = mmu.load(va)
    elif kind is AccessKind.WRITE:
        out = mmu.store(va, value)
    else:
        out = mmu.fetch(va)
    if isinstance(out, PageFault):
        return out
    if isinstance(out, GeneralProtection):
        raise RefmodelError(f"guest access {va:#x}: {out.reason}")
    return out.value if isinstance(out, LoadResult) else 0


class NativeBackend(MmuBackend):
    """Bare metal: guest frame numbers are physical frame numbers.

    With ``pcids`` the OS tags each address space with a PCID (CR4.PCIDE = 1, SDM
    4.10.1) and switches with CR3 bit 63 set — keeping the TLB — when nothing can
    have gone stale since that PCID last ran, as Linux's ``switch_mm_irqs_off`` does
    by comparing the mm's ``tlb_gen`` with the one the ASID last saw. Here each
    address space has its own generation, bumped by every write to one of its page
    tables (Linux bumps ``mm->context.tlb_gen`` only when a flush is needed: this is
    more conservative, never unsound). A table belongs to the address spaces whose
    root links it, directly or through other tables; a write to a table of no known
    address space bumps them all.
    """

    mode = Mode.NATIVE

    def __init__(self, nr_frames: int, maxphyaddr: int = 40, pcids: bool = False) -> None:
        self.counters = Counters()
        self.nr_frames = nr_frames
        self.mem = PhysicalMemory(maxphyaddr)
        state = ArchState(cr4=int(Cr4.PAE | Cr4.PCIDE)) if pcids else ArchState()
        self.mmu = Mmu(self.mem, state, Tlb(TLB_CAPACITY, TLB_WAYS, self.counters), self.counters)
        self.pcids = pcids
        self._pcid_of: dict[GFN, int] = {}
        #: address space (its root frame) -> writes to its tables so far
        self._generation: dict[GFN, int] = {}
        self._unowned_writes = 0  #: writes to tables of no known address space
        #: table frame -> the address spaces (roots) it belongs to
        self._spaces: dict[GFN, set[GFN]] = {}
        self._clean_at: dict[int, int] = {}  #: PCID -> its space's generation when it last left the CPU

    def _pa(self, gfn: GFN, offset: int = 0) -> int:
        if not 0 <= gfn < self.nr_frames:
            raise RefmodelError(f"frame {gfn:#x} is outside the guest's {self.nr_frames} frames")
        return (gfn << PAGE_SHIFT) + offset

    def read_frame_u64(self, gfn: GFN, offset: int) -> int:
        return self.mem.read_u64(self._pa(gfn, offset))

    def write_frame_u64(self, gfn: GFN, offset: int, value: int) -> None:
        self.mem.write_u64(self._pa(gfn, offset), value)

    def copy_frame(self, src: GFN, dst: GFN) -> None:
        self._pa(src), self._pa(dst)
        self.mem.load_frame(dst, self.mem.frame_bytes(src))

    def pte_frame(self, gfn: GFN) -> int:
        return int(gfn)

    def entry_gfn(self, frame: int) -> GFN:
        return GFN(frame)

    def read_pte(self, table: GFN, index: int) -> int:
        return self.mem.read_u64(self._pa(table, index * ENTRY_SIZE))

    def write_pte(self, table: GFN, index: int, level: Level, value: int) -> None:
        self._stale(table, level, value)
        self.mem.write_u64(self._pa(table, index * ENTRY_SIZE), value)

    def _stale(self, table: GFN, level: Level, value: int) -> None:
        """Bump the generation of every address space ``table`` belongs to; a table
        linked by this write joins them."""
        spaces = self._spaces.get(table)
        if spaces is None:
            self._unowned_writes += 1
            return
        for root in spaces:
            self._generation[root] = self._generation.get(root, 0) + 1
        if level is not Level.L1 and value & PteFlag.P and not value & PteFlag.PS:
            child = GFN((value & FRAME_MASK) >> PAGE_SHIFT)
            self._spaces.setdefault(child, set()).update(spaces)

    def generation(self, root: GFN) -> int:
        """How many writes may have changed the address space rooted at ``root``."""
        return self._generation.get(root, 0) + self._unowned_writes

    def new_table(self, table: GFN, level: Level) -> None:
        self._pa(table)
        if level is Level.L4:
            self._spaces[table] = {table}

    def lazy_begin(self) -> None:
        pass

    def lazy_end(self) -> None:
        pass

    def load_cr3(self, root: GFN) -> None:
        value = self._pa(root)
        if self.pcids:
            leaving = self.mmu.state.pcid
            self._clean_at[leaving] = self.generation(GFN(self.mmu.state.cr3 >> PAGE_SHIFT))
            pcid = self._pcid_of.setdefault(root, len(self._pcid_of) % 0xFFF + 1)
            keep = self._clean_at.get(pcid) == self.generation(root)
            value |= pcid | (CR3_NOFLUSH if keep else 0)
        self._mov_cr3(value)

    def _mov_cr3(self, value: int) -> None:
        fault = self.mmu.mov_cr3(value)
        if fault is not None:
            raise RefmodelError(f"load_cr3: {fault.reason}")

    def invlpg(self, va: int) -> None:
        self.mmu.invlpg(va)

    def flush_tlb(self) -> None:
        """MOV CR3 of the current value without bit 63: flushes the current PCID."""
        self._mov_cr3(self.mmu.state.cr3)

    def access(self, va: int, kind: AccessKind, cpl: int = 3, value: int = 0) -> int | PageFault:
        return hardware_access(self.mmu, va, kind, cpl, value)
