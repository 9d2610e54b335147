"""One logical processor's MMU: the TLB in front of the page walk, and the
instructions that manage them (SDM Vol. 3A 4.10).

:class:`Mmu` is the bare-metal machine the rest of refmodel builds on: physical
memory, a vCPU's architectural state, a TLB, and counters. Its methods are the
operations a trace can contain — loads, stores, fetches, MOV to CR0/CR3/CR4,
WRMSR EFER, INVLPG, INVPCID — and each returns the architectural outcome as a value.

TLB use (4.10.2, 4.10.4.3): a hit whose cached rights allow the access is used as is,
even if memory has changed since. A hit whose cached rights refuse the access, or a
write through an entry cached while the page was clean, is treated as a miss and
walked afresh (the SDM allows a re-walk at any time, and a processor must walk to set
D). A #PF invalidates the faulting page's entries for the current PCID, and any
global entry for it (4.10.4.1).
"""

from dataclasses import dataclass, replace

from ..account.events import Counters, Event
from ..errors import RefmodelError
from .access import Access, AccessKind
from .control import Cr4
from .fault import GeneralProtection, PageFault
from .physmem import PhysicalMemory
from .pte import PageSize
from .tlb import InvpcidType, Tlb, TlbEntry
from .types import PA, PAGE_SIZE, VA, page_offset
from .vcpu import ArchState, CrWrite, TlbEffect, write_cr0, write_cr3, write_cr4, write_efer
from .walk import PagingContext, Translation, access_denial, is_canonical, walk

Outcome = Translation | PageFault | GeneralProtection


@dataclass(frozen=True)
class LoadResult:
    """A successful load: the value read and where it came from."""

    value: int
    pa: PA


class Mmu:
    """Bare-metal paging: physical memory + one vCPU's state + a TLB."""

    def __init__(
        self,
        mem: PhysicalMemory | None = None,
        state: ArchState | None = None,
        tlb: Tlb | None = None,
        counters: Counters | None = None,
        vpid: int = 0,
        page1gb: bool = True,
    ) -> None:
        self.counters = counters if counters is not None else Counters()
        self.mem = mem if mem is not None else PhysicalMemory()
        self.state = state if state is not None else ArchState()
        self.tlb = tlb if tlb is not None else Tlb(counters=self.counters)
        self.vpid = vpid
        self.page1gb = page1gb

    # -- translation -------------------------------------------------------------
    @property
    def ctx(self) -> PagingContext:
        return self.state.paging_context(self.mem.maxphyaddr, self.page1gb)

    def translate(self, va: int, access: Access) -> Outcome:
        """Translate through the TLB, walking on a miss (SDM 4.10.2)."""
        if not 0 <= va < (1 << 64):
            raise RefmodelError(f"linear address {va:#x} is not a 64-bit value")
        if not is_canonical(va):
            return GeneralProtection(f"non-canonical linear address {va:#x}")
        ctx = self.ctx
        hit = self.tlb.lookup(va, self.vpid, ctx.pcid)
        if hit is not None and self.hit_usable(hit, access, ctx):
            self.counters.add(Event.TLB_HIT)
            return translation_from_entry(hit, va)
        self.counters.add(Event.TLB_MISS)
        outcome = self.walk_on_miss(ctx, va, access)
        if isinstance(outcome, PageFault):
            # SDM 4.10.4.1: the #PF invalidates the entries for the faulting page that
            # the current PCID would use, a global one included.
            self.tlb.invalidate_page(va, self.vpid, ctx.pcid, include_global=True, counted=False)
            self.state = _with_cr2(self.state, outcome.cr2)
            return outcome
        self.tlb.fill(self.tlb_entry(outcome, ctx.pcid))
        return outcome

    # -- the three steps a virtualizing MMU replaces (refmodel.hv.hap: the 2-D walk) --
    def hit_usable(self, entry: TlbEntry, access: Access, ctx: PagingContext) -> bool:
        """Whether a TLB hit may satisfy ``access`` without a walk (:func:`usable`)."""
        return usable(entry, access, ctx)

    def walk_on_miss(self, ctx: PagingContext, va: int, access: Access) -> Translation | PageFault:
        """The page walk on a TLB miss (SDM 4.5), counting its entry reads."""
        result = walk(self.mem, ctx, va, access)
        self.counters.add(Event.WALK_REF, result.refs)
        return result.outcome

    def tlb_entry(self, translation: Translation, pcid: int) -> TlbEntry:
        """What the TLB caches from a walk (:func:`entry_from_translation`)."""
        return entry_from_translation(translation, self.vpid, pcid)

    # -- data and instruction accesses ---------------------------------------------
    def _checked(self, va: int, size: int) -> None:
        if size not in (1, 2, 4, 8):
            raise RefmodelError(f"access size must be 1, 2, 4 or 8 bytes, got {size}")
        if page_offset(va) + size > PAGE_SIZE:
            raise RefmodelError(f"access at {va:#x} of {size} bytes crosses a 4 KiB page")

    def load(self, va: int, size: int = 8, implicit: bool = False) -> LoadResult | PageFault | GeneralProtection:
        """A data read at the current CPL."""
        self._checked(va, size)
        out = self.translate(va, Access(AccessKind.READ, self.state.cpl, implicit))
        if not isinstance(out, Translation):
            return out
        return LoadResult(self.mem.read_uint(out.pa, size), out.pa)

    def store(self, va: int, value: int, size: int = 8, implicit: bool = False) -> Translation | PageFault | GeneralProtection:
        """A data write at the current CPL."""
        self._checked(va, size)
        out = self.translate(va, Access(AccessKind.WRITE, self.state.cpl, implicit))
        if isinstance(out, Translation):
            self.mem.write_uint(out.pa, size, value)
        return out

    def fetch(self, va: int) -> LoadResult | PageFault | GeneralProtection:
        """An instruction fetch of one byte at the current CPL."""
        out = self.translate(va, Access(AccessKind.FETCH, self.state.cpl))
        if not isinstance(out, Translation):
            return out
        return LoadResult(self.mem.read_uint(out.pa, 1), out.pa)

    # -- control registers and TLB-management instructions --------------------------
    def _apply(self, result: CrWrite | GeneralProtection) -> GeneralProtection | None:
        if isinstance(result, GeneralProtection):
            return result
        self.state = result.state
        if result.effect is TlbEffect.PCID_NONGLOBAL:
            self.tlb.invalidate_pcid(self.vpid, result.pcid)
        elif result.effect is TlbEffect.ALL_INCLUDING_GLOBAL:
            self.tlb.invalidate_all(self.vpid)
        return None

    def mov_cr3(self, value: int) -> GeneralProtection | None:
        return self._apply(write_cr3(self.state, value, self.mem.maxphyaddr))

    def mov_cr4(self, value: int) -> GeneralProtection | None:
        return self._apply(write_cr4(self.state, value))

    def mov_cr0(self, value: int) -> GeneralProtection | None:
        return self._apply(write_cr0(self.state, value))

    def wrmsr_efer(self, value: int) -> GeneralProtection | None:
        return self._apply(write_efer(self.state, value))

    def invlpg(self, va: int) -> None:
        """INVLPG (SDM 4.10.4.1): a no-op for a non-canonical address."""
        if is_canonical(va):
            self.tlb.invalidate_page(va, self.vpid, self.state.pcid)

    def invpcid(self, kind: int, pcid: int, va: int = 0) -> GeneralProtection | None:
        """INVPCID (SDM Vol. 2A): #GP for a type above 3, a PCID above 0FFFH, a
        nonzero PCID with type 0 or 1 while CR4.PCIDE = 0, or a non-canonical address
        with type 0."""
        if kind not in (0, 1, 2, 3):
            return GeneralProtection(f"INVPCID type {kind} is invalid")
        if pcid > 0xFFF:
            return GeneralProtection(f"INVPCID PCID {pcid:#x} exceeds 0FFFH")
        t = InvpcidType(kind)
        if kind in (0, 1) and pcid and not self.state.cr4 & Cr4.PCIDE:
            return GeneralProtection(f"INVPCID type {kind} with PCID {pcid:#x} while CR4.PCIDE = 0")
        if t is InvpcidType.INDIVIDUAL_ADDRESS and not is_canonical(va):
            return GeneralProtection(f"INVPCID type 0 with non-canonical address {va:#x}")
        self.tlb.invpcid(t, self.vpid, pcid, va)
        return None


def usable(entry: TlbEntry, access: Access, ctx: PagingContext) -> bool:
    """Whether a TLB hit may satisfy ``access`` without a walk: its cached rights
    allow it, and a write does not need the D flag set (SDM 4.8, 4.10.2.2)."""
    if access_denial(entry.rights, access, ctx) is not None:
        return False
    return not (access.kind is AccessKind.WRITE and not entry.dirty)


def entry_from_translation(t: Translation, vpid: int, pcid: int) -> TlbEntry:
    """What a TLB caches from a walk (SDM 4.10.2.2)."""
    return TlbEntry(
        vpid=vpid, pcid=pcid, vpn=t.va >> t.size.shift, size=t.size, frame=t.page_base,
        rights=t.rights, global_page=t.global_page, dirty=t.dirty,
    )


def translation_from_entry(e: TlbEntry, va: int) -> Translation:
    """A translation served from the TLB: no entry addresses, no memory references."""
    return Translation(
        va=VA(va), pa=PA(e.translate(va)), size=PageSize(e.size), rights=e.rights,
        global_page=e.global_page, dirty=e.dirty, leaf_addr=-1, entry_addrs=(),
    )


def _with_cr2(state: ArchState, cr2: int) -> ArchState:
    """SDM 4.7: a page fault loads CR2 with the faulting linear address."""
    return replace(state, cr2=cr2)
