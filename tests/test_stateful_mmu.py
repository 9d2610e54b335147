"""Operation sequences on the bare-metal MMU: raw page-table writes, loads, stores and
fetches at CPL 0 and 3, MOV to CR0/CR3/CR4, WRMSR EFER, INVLPG and INVPCID, on two
logical processors (VPIDs 1 and 2) sharing one memory and one TLB.

The TLB is checked against a *may-cache* reference (SDM Vol. 3A 4.10.2-4.10.4): the
set of translations a processor is allowed to hold. A walk adds the translation it
produced; each invalidating operation removes what the SDM says it must invalidate
(the minimum — a processor may always drop more). After every step each entry of
the model's TLB must be in that set, so a missing invalidation (a no-op INVLPG, a
MOV CR3 that forgets its PCID, a #PF that keeps the faulting page) is found however
many steps later the stale entry would have been used. Capacity, ways and LRU are
free to differ: the reference has none.

Each access is also checked on the spot: exactly one TLB hit or miss is counted; a
hit must be explained by an allowed entry usable for this access; a miss must give
what the SDM walk of the memory as it was gives (A/D writes included).
"""

from collections.abc import Callable
from dataclasses import replace

import hypothesis.strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from refmodel.account.events import Event
from refmodel.arch.access import Access, AccessKind
from refmodel.arch.control import CR3_NOFLUSH, Cr0, Cr4, Efer
from refmodel.arch.fault import GeneralProtection, PageFault
from refmodel.arch.mmu import LoadResult, Mmu, entry_from_translation, usable
from refmodel.arch.physmem import PhysicalMemory
from refmodel.arch.pte import Level, PteFlag, table_index
from refmodel.arch.tlb import Tlb, TlbEntry
from refmodel.arch.types import ENTRY_SIZE, PAGE_SHIFT
from refmodel.arch.walk import Translation, is_canonical, walk
from stateful_support import machine_settings

#: Page-table frames the raw writes may use (frame 0x10 and 0x11 are the two roots).
TABLE_FRAMES = tuple(range(0x10, 0x18))
#: Data frames, each filled with a recognisable pattern.
DATA_FRAMES = tuple(range(0x20, 0x28))
#: Linear addresses the sequences use: shared and distinct indices at every level,
#: both halves of the canonical space, and one non-canonical address.
VAS = (
    0x0000_0000_0040_0000,
    0x0000_0000_0040_1000,
    0x0000_0000_0060_0000,
    0x0000_0000_4000_0000,
    0x0000_7FFF_FFFF_F000,
    0xFFFF_8000_0000_0000,
    0xFFFF_FFFF_FFFF_F000,
)
NON_CANONICAL = 0x0000_8000_0000_0000
#: Physical targets a raw leaf may name: tables, data, and 2 MiB / 1 GiB aligned bases.
TARGET_FRAMES = TABLE_FRAMES + DATA_FRAMES + (0x200, 0x40000)
PCIDS = (0, 1, 2)
#: Every flag a raw entry may carry, plus reserved bits (51 is above MAXPHYADDR 40).
FLAG_BITS = (
    int(PteFlag.P), int(PteFlag.RW), int(PteFlag.US), int(PteFlag.A), int(PteFlag.D),
    int(PteFlag.PS), int(PteFlag.G), int(PteFlag.XD), 1 << 51,
)
VPIDS = (1, 2)


def flags_strategy() -> st.SearchStrategy[int]:
    """Mostly present entries; any subset of the other flags, reserved bits rarely."""
    common = st.sets(st.sampled_from(FLAG_BITS[1:8])).map(sum)
    rare = st.sampled_from((0, 0, 0, 0, 0, 1 << 51))
    present = st.sampled_from((1, 1, 1, 0))
    return st.builds(lambda p, c, r: p | c | r, present, common, rare)


class MmuMachine(RuleBasedStateMachine):
    """Two processors on one memory and one TLB, against the may-cache reference."""

    def __init__(self) -> None:
        super().__init__()
        self.mem = PhysicalMemory(40)
        self.tlb = Tlb(capacity=16, ways=2)  # small: evictions happen
        self.counters = self.tlb.counters
        self.cpus = {vpid: Mmu(self.mem, tlb=self.tlb, counters=self.counters, vpid=vpid) for vpid in VPIDS}
        self.allowed: set[TlbEntry] = set()
        self.accesses = 0
        for frame in TABLE_FRAMES:
            self.mem.load_frame(frame, bytes(1 << PAGE_SHIFT))
        for frame in DATA_FRAMES:
            self.mem.load_frame(frame, b"".join((frame << 16 | i).to_bytes(8, "little") for i in range(512)))
        self._link(0x10)
        self._link(0x11)
        for mmu in self.cpus.values():
            assert mmu.mov_cr3(0x10 << PAGE_SHIFT) is None

    def _link(self, root: int) -> None:
        """A small valid tree under ``root`` so that sequences start with hits to have."""
        table_flags = int(PteFlag.P | PteFlag.RW | PteFlag.US)
        self.mem.write_u64((root << PAGE_SHIFT) + table_index(VAS[0], Level.L4) * 8, (0x12 << PAGE_SHIFT) | table_flags)
        self.mem.write_u64((0x12 << PAGE_SHIFT) + table_index(VAS[0], Level.L3) * 8, (0x13 << PAGE_SHIFT) | table_flags)
        self.mem.write_u64((0x13 << PAGE_SHIFT) + table_index(VAS[0], Level.L2) * 8, (0x14 << PAGE_SHIFT) | table_flags)
        for i, va in enumerate(VAS[:2]):
            leaf = (DATA_FRAMES[i] << PAGE_SHIFT) | table_flags
            self.mem.write_u64((0x14 << PAGE_SHIFT) + table_index(va, Level.L1) * 8, leaf)

    # -- the reference: what the SDM obliges each operation to invalidate -------------------
    def _drop(self, doomed: Callable[[TlbEntry], bool]) -> None:
        self.allowed = {e for e in self.allowed if not doomed(e)}

    def _pcid(self, mmu: Mmu) -> int:
        return mmu.state.pcid

    # -- page-table writes (software: no invalidation) -----------------------------------------
    @rule(
        table=st.sampled_from(TABLE_FRAMES),
        va=st.sampled_from(VAS),
        level=st.sampled_from(list(Level)),
        frame=st.sampled_from(TARGET_FRAMES),
        flags=flags_strategy(),
    )
    def write_entry(self, table: int, va: int, level: Level, frame: int, flags: int) -> None:
        """A raw store of an entry into any table frame, at the index ``va`` uses at
        ``level`` — any structure, loops and large pages included."""
        self.mem.write_u64((table << PAGE_SHIFT) + table_index(va, level) * ENTRY_SIZE, (frame << PAGE_SHIFT) | flags)

    # -- accesses ------------------------------------------------------------------------------
    @rule(
        vpid=st.sampled_from(VPIDS),
        va=st.sampled_from(VAS + (NON_CANONICAL,)),
        offset=st.sampled_from((0, 8, 0xFF8)),
        kind=st.sampled_from(list(AccessKind)),
        cpl=st.sampled_from((0, 3)),
        value=st.integers(0, (1 << 64) - 1),
    )
    def access(self, vpid: int, va: int, offset: int, kind: AccessKind, cpl: int, value: int) -> None:
        mmu = self.cpus[vpid]
        mmu.state = replace(mmu.state, cpl=cpl)
        addr = va + offset
        ctx = mmu.ctx
        before_mem = self.mem.copy()
        before = self.counters.copy()
        candidates = [e for e in self.allowed if e.matches(addr, vpid, ctx.pcid)]
        if kind is AccessKind.READ:
            out: object = mmu.load(addr)
        elif kind is AccessKind.WRITE:
            out = mmu.store(addr, value)
        else:
            out = mmu.fetch(addr)
        delta = self.counters.since(before)
        if not is_canonical(addr):
            assert isinstance(out, GeneralProtection)
            assert delta[Event.TLB_HIT] + delta[Event.TLB_MISS] == 0
            return
        self.accesses += 1
        assert delta[Event.TLB_HIT] + delta[Event.TLB_MISS] == 1, delta.as_dict()
        access = Access(kind, cpl)
        if delta[Event.TLB_HIT]:
            pa = _pa_of(out)
            usable_ones = [e for e in candidates if usable(e, access, ctx)]
            assert any(e.translate(addr) == pa for e in usable_ones), (
                f"TLB hit at {addr:#x} gave pa {pa:#x}; allowed: {usable_ones}"
            )
            return
        expected = walk(before_mem, ctx, addr, access).outcome
        if isinstance(expected, PageFault):
            assert out == expected, f"miss at {addr:#x}: {out} but the walk faults {expected}"
            assert mmu.state.cr2 == addr
            # SDM 4.10.4.1: a #PF invalidates the page's entries for the current PCID
            # and any global entry for it.
            self._drop(lambda e: e.vpid == vpid and e.vpn == addr >> e.size.shift and (e.pcid == ctx.pcid or e.global_page))
            return
        assert _pa_of(out) == expected.pa, f"miss at {addr:#x}: pa {_pa_of(out):#x}, walk says {expected.pa:#x}"
        for entry_addr in expected.entry_addrs:  # the A/D flags the walk set (SDM 4.8)
            assert self.mem.read_u64(entry_addr) == before_mem.read_u64(entry_addr) or kind is AccessKind.WRITE
        self.allowed.add(entry_from_translation(expected, vpid, ctx.pcid))

    # -- control registers -------------------------------------------------------------------------
    @rule(vpid=st.sampled_from(VPIDS), root=st.sampled_from((0x10, 0x11)), pcid=st.sampled_from(PCIDS), noflush=st.booleans())
    def mov_cr3(self, vpid: int, root: int, pcid: int, noflush: bool) -> None:
        mmu = self.cpus[vpid]
        pcide = mmu.ctx.pcide
        value = (root << PAGE_SHIFT) | (pcid if pcide else 0) | (CR3_NOFLUSH if noflush and pcide else 0)
        assert mmu.mov_cr3(value) is None
        if not (noflush and pcide):
            new = mmu.state.pcid
            # SDM 4.10.4.1: every non-global entry of the new PCID (000H without PCIDs).
            self._drop(lambda e: e.vpid == vpid and e.pcid == new and not e.global_page)

    @rule(vpid=st.sampled_from(VPIDS), bit=st.sampled_from((Cr4.PGE, Cr4.PCIDE, Cr4.SMEP, Cr4.SMAP)))
    def toggle_cr4(self, vpid: int, bit: Cr4) -> None:
        mmu = self.cpus[vpid]
        old = mmu.state.cr4
        result = mmu.mov_cr4(old ^ int(bit))
        if result is not None:
            assert mmu.state.cr4 == old  # a #GP leaves CR4 alone
            return
        pge_changed = bit is Cr4.PGE
        pcide_cleared = bit is Cr4.PCIDE and old & Cr4.PCIDE
        if pge_changed or pcide_cleared:
            # SDM 4.10.4.1: every entry of the logical processor, global ones included.
            self._drop(lambda e: e.vpid == vpid)
        elif bit is Cr4.SMEP and not old & Cr4.SMEP:
            # "MOV to CR4 that sets SMEP ... invalidates all TLB entries associated with PCID 000H" —
            # refmodel's rule (vcpu.write_cr4) is stricter; the minimum the SDM asks:
            cur = mmu.state.pcid
            self._drop(lambda e: e.vpid == vpid and e.pcid == cur)

    @rule(vpid=st.sampled_from(VPIDS), bit=st.sampled_from((Cr0.WP,)))
    def toggle_cr0(self, vpid: int, bit: Cr0) -> None:
        """CR0.WP changes take effect on the next access; nothing is invalidated."""
        mmu = self.cpus[vpid]
        assert mmu.mov_cr0(mmu.state.cr0 ^ int(bit)) is None

    @rule(vpid=st.sampled_from(VPIDS))
    def toggle_nxe(self, vpid: int) -> None:
        mmu = self.cpus[vpid]
        assert mmu.wrmsr_efer(mmu.state.efer ^ int(Efer.NXE)) is None

    # -- TLB-management instructions -------------------------------------------------------------------
    @rule(vpid=st.sampled_from(VPIDS), va=st.sampled_from(VAS + (NON_CANONICAL,)))
    def invlpg(self, vpid: int, va: int) -> None:
        mmu = self.cpus[vpid]
        pcid = mmu.state.pcid
        mmu.invlpg(va)
        if is_canonical(va):
            # SDM 4.10.4.1: the page's entries for the current PCID, and global ones.
            self._drop(lambda e: e.vpid == vpid and e.vpn == va >> e.size.shift and (e.pcid == pcid or e.global_page))

    @rule(
        vpid=st.sampled_from(VPIDS),
        kind=st.sampled_from((0, 1, 2, 3, 4)),
        pcid=st.sampled_from(PCIDS + (0x1000,)),
        va=st.sampled_from(VAS + (NON_CANONICAL,)),
    )
    def invpcid(self, vpid: int, kind: int, pcid: int, va: int) -> None:
        mmu = self.cpus[vpid]
        result = mmu.invpcid(kind, pcid, va)
        pcide = mmu.ctx.pcide
        must_fault = (
            kind > 3 or pcid > 0xFFF or (kind in (0, 1) and pcid and not pcide) or (kind == 0 and not is_canonical(va))
        )
        assert (result is not None) == must_fault, f"INVPCID {kind} {pcid:#x} {va:#x}: {result}"
        if must_fault:
            return
        if kind == 0:
            self._drop(lambda e: e.vpid == vpid and e.pcid == pcid and e.vpn == va >> e.size.shift and not e.global_page)
        elif kind == 1:
            self._drop(lambda e: e.vpid == vpid and e.pcid == pcid and not e.global_page)
        elif kind == 2:
            self._drop(lambda e: e.vpid == vpid)
        else:
            self._drop(lambda e: e.vpid == vpid and not e.global_page)

    # -- after every step ----------------------------------------------------------------------------------
    @invariant()
    def tlb_holds_only_what_it_may(self) -> None:
        stale = [e for e in self.tlb.entries() if e not in self.allowed]
        assert not stale, f"TLB holds translations the SDM says were invalidated: {stale}"

    @invariant()
    def hits_and_misses_count_accesses(self) -> None:
        assert self.counters[Event.TLB_HIT] + self.counters[Event.TLB_MISS] == self.accesses


def _pa_of(out: object) -> int:
    if isinstance(out, LoadResult):
        return out.pa
    if isinstance(out, Translation):
        return out.pa
    raise AssertionError(f"expected a completed access, got {out}")


TestMmuSequences = MmuMachine.TestCase
TestMmuSequences.settings = machine_settings(examples=300, steps=40)
