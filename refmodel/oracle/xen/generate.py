"""Programs for the real-Xen differential test: valid and hostile PV memory
management, generated with the model in the loop.

The generator keeps a model of dom0 (:func:`.layout.synthetic_layout`) and runs each
operation on it as it emits it, so it can aim at live state: link tables it built,
flip single bits of entries that are in use, pin what is validated, switch to a base
it prepared, and read back what Xen wrote. It uses the model only to *choose*; what
Xen and the model then do is compared by :mod:`.differential`.

A program works in a sandbox of dom0's own frames, far above what Xen's initial
mapping uses, with roles: L4 candidates (slot 0 names the boot L3, so the kernel
stays mapped when one becomes the base), L3, L2 and L1 tables, data frames and code
frames (prefilled with ``ret`` at :data:`CODE_OFFSET`). Roles are intentions, not
rules: hostile requests use frames in the wrong role, foreign frames, frames that do
not exist, wrong levels, Xen's L4 slots, forbidden flags.

Hostile *or* not, some things the kernel must survive, and the generator never asks
them: writing boot L4 slot 0 or any boot table below it, unpinning the boot L4,
switching to a base whose slot 0 is not the boot L3, writing through a translation
(any the TLB may hold) that reaches anything but a data frame, or fetching from
anything but a code frame. A write through a read-only mapping of an L1 table is
avoided too: Xen emulates it for the hardware domain (``pv_ro_page_fault`` ->
``ptwr_do_page_fault``, xen/arch/x86/traps.c ``fixup_page_fault``), which the model
does not (docs/xen-differential.md).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from ...arch.pte import Level, PteFlag
from ...arch.types import PAGE_SHIFT
from ...errors import RefmodelError
from ...hv.pv.backend import PvBackend
from ...hv.pv.pagetype import PageType
from ..replay import HypervisorModel, build_model
from ..trace import (
    Fetch,
    Hypercall,
    MmuextEntry,
    MmuextOp,
    MmuUpdate,
    MmuUpdateReq,
    Multicall,
    Observation,
    Op,
    Read,
    UpdateVaMapping,
    Write,
)
from .layout import Dom0Layout, dom0_header, synthetic_layout
from .program import (
    ADDR_BITS,
    FOREIGN_BASE,
    MASK_VA,
    NR_FOREIGN,
    SCRATCH_VA,
    SYM_BOOT_L3,
    SYM_BOOT_L4,
    to_machine,
)

DOMID_SELF = 0x7FF0
#: The sandbox: guest frames dom0's initial mapping never reaches (it ends a few MiB
#: above the 2 MiB kernel base; dom0 has 16384 frames).
SANDBOX_BASE = 0x2000
#: Where fetch targets sit in a code frame: a ``ret`` (0xC3) instruction.
CODE_OFFSET = 0x800
RET8 = 0xC3C3_C3C3_C3C3_C3C3
#: A frame number that is all ones: INVALID_MFN (``PADDR_MASK >> PAGE_SHIFT``).
INVALID_FRAME = (1 << 40) - 1
#: A frame above MAXPHYADDR (40 bits) that is not INVALID_MFN: not RAM and outside
#: dom0's I/O memory, refused with -EPERM.
FAR_FRAME = 1 << 32

#: Entry flags a present upper-level entry usually carries (P|RW|US|A|D).
TABLE_FLAGS = 0x67
#: Flags new upper-level entries start from: mostly TABLE_FLAGS, but also without U,
#: A or D, which Xen adds (``adjust_guest_l2e`` .. ``_l4e``) or the walk sets.
UPPER_BASES = (TABLE_FLAGS, TABLE_FLAGS, 0x63, 0x47, 0x43, 0x27)
#: Flags new leaves start from: user read-write and read-only, and kernel mappings
#: (no U: Xen adds U and ``_PAGE_GUEST_KERNEL``), some global.
LEAF_BASES = (0x67, 0x67, 0x25, 0x63, 0x23, 0x167, 0x163)
#: How many recently written entries a read-back chooses from.
RECENT = 16
#: Bits a bit flip may touch: flags 0-11, Xen's AVAIL_HIGH 52-62, NX 63.
FLIP_BITS = tuple(range(12)) + tuple(range(52, 64))

#: Program-visible windows: (boot L4 slot, purpose). Slots 256..271 are Xen's.
DATA_SLOTS = (1, 300)
CODE_SLOT = 2
SPARE_SLOTS = (3, 4, 511)
#: The windows the prologue builds (a data window, the code window, a data window in
#: the upper half), each mapping its first WINDOW_PAGES pages.
WINDOW_SLOTS = (DATA_SLOTS[0], CODE_SLOT, DATA_SLOTS[1])
WINDOW_PAGES = 8


def canonical(va: int) -> int:
    return va | (0xFFFF << 48) if va & (1 << 47) else va


def window_va(l4: int, l3: int = 0, l2: int = 0, l1: int = 0) -> int:
    return canonical((l4 << 39) | (l3 << 30) | (l2 << 21) | (l1 << 12))


@dataclass
class Roles:
    l4: list[int]
    l3: list[int]
    l2: list[int]
    l1: list[int]
    data: list[int]
    code: list[int]

    def all(self) -> list[int]:
        return self.l4 + self.l3 + self.l2 + self.l1 + self.data + self.code

    def of_level(self, level: int) -> list[int]:
        return {4: self.l4, 3: self.l3, 2: self.l2, 1: self.l1}[level]


class ProgramGenerator:
    """Generates one program; :meth:`program` returns it."""

    def __init__(self, seed: int, layout: Dom0Layout | None = None) -> None:
        self.rng = random.Random(seed)
        self.layout = layout or synthetic_layout()
        self.fmap = self.layout.frame_map()
        model = build_model(dom0_header(self.layout))
        assert isinstance(model, HypervisorModel)
        self.model = model
        backend = model.backend
        assert isinstance(backend, PvBackend)
        self.vcpu = backend.vcpu
        self.ops: list[Op] = []
        frames = list(range(SANDBOX_BASE, SANDBOX_BASE + 64))
        self.rng.shuffle(frames)
        self.roles = Roles(frames[0:3], frames[3:8], frames[8:14], frames[14:24], frames[24:58], frames[58:64])
        self.code = set(self.roles.code)
        self.data = set(self.roles.data)
        self.sandbox = set(frames)
        self.written: list[tuple[int, int]] = []  #: (frame, slot) of the latest requests
        self.inverse = {mfn: f for f, mfn in enumerate(self.layout.p2m)}
        for k, mfn in enumerate(self.layout.foreign):
            self.inverse[mfn] = FOREIGN_BASE + k
        self.inverse[self.layout.boot_l4] = SYM_BOOT_L4
        self.inverse[self.layout.boot_l3] = SYM_BOOT_L3
        self.boot_l3_entry = (SYM_BOOT_L3 << PAGE_SHIFT) | TABLE_FLAGS

    # -- running on the model ----------------------------------------------------------------
    def emit(self, op: Op) -> Observation:
        obs = self.model.step(to_machine(op, self.fmap))
        self.ops.append(op)
        return obs

    def read_entry(self, frame: int, slot: int) -> int:
        """An entry of a program frame's table, in program frames."""
        mfn = self.fmap.frame(frame)
        value = self.model.machine.mem.read_u64((mfn << PAGE_SHIFT) + slot * 8)
        return self.program_entry(value)

    def program_entry(self, value: int) -> int:
        mfn = (value & ADDR_BITS) >> PAGE_SHIFT
        frame = self.inverse.get(mfn, mfn)
        return (value & ~ADDR_BITS) | (frame << PAGE_SHIFT)

    def page_type(self, frame: int) -> PageType | None:
        """The frame's type if its type count is above zero."""
        info = self.vcpu.frames.info(self.fmap.frame(frame))
        return info.type if info.count else None

    def current_base(self) -> int:
        base = self.vcpu.guest_table
        assert base is not None
        return self.inverse.get(base, base)

    def targets(self, va: int) -> set[int] | None:
        """Every program frame an access to ``va`` may reach: a walk of the current
        tables (rights ignored) and every translation a TLB may still hold. None
        if some reachable frame is not a program frame we know, or if the walk
        reads a table whose content only real Xen knows: dom0's own boot tables
        other than the boot L4 (the generator's model runs on a synthetic dom0,
        :func:`~.layout.synthetic_layout`; a recursive boot-L4 entry leads a walk
        into them, and a fetch or write it predicts to fault may, on Xen, run
        dom0's page-table bytes or overwrite them — seed 121)."""
        found: set[int] = set()
        base = self.vcpu.guest_table
        assert base is not None
        table = int(base)
        mem = self.model.machine.mem
        for level in (Level.L4, Level.L3, Level.L2, Level.L1):
            known = self.inverse.get(table, -1)
            if known != SYM_BOOT_L4 and known not in self.sandbox:
                return None
            entry = mem.read_u64((table << PAGE_SHIFT) + ((va >> level.index_shift) & 511) * 8)
            if not entry & PteFlag.P:
                break
            table = (entry & ADDR_BITS) >> PAGE_SHIFT
            if level is Level.L1:
                found.add(table)
        mmu = self.model.hardware()
        for e in self.model.tlb.cacheable.for_access(va, mmu.vpid, mmu.state.pcid):
            found.add(e.translate(va) >> PAGE_SHIFT)
        out = {self.inverse.get(m, -1) for m in found}
        return None if -1 in out else out

    # -- choices --------------------------------------------------------------------------------
    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def hostile_frame(self) -> int:
        r = self.rng.random()
        if r < 0.3:
            return FOREIGN_BASE + self.rng.randrange(NR_FOREIGN)
        if r < 0.5:
            return INVALID_FRAME
        if r < 0.65:
            return FAR_FRAME + self.rng.randrange(16)
        return self.rng.choice(self.roles.all())

    def flags(self, base: int) -> int:
        """``base`` with a few random changes: mostly safe bits, sometimes forbidden."""
        f = base
        for _ in range(self.rng.choice((0, 0, 1, 1, 2, 3))):
            f ^= 1 << self.rng.choice(FLIP_BITS)
        return f

    def table_frame(self, level: int) -> int:
        if self.chance(0.85):
            return self.rng.choice(self.roles.of_level(level))
        return self.rng.choice(self.roles.all())

    def slot(self, level: int, frame: int) -> int | None:
        """A slot to write, None if none is safe."""
        if frame == SYM_BOOT_L4:
            return self.rng.choice(DATA_SLOTS + (CODE_SLOT,) + SPARE_SLOTS + (256, 262, 271, 272))
        if frame in self.roles.l4 or frame == self.current_base():
            slot = self.rng.choice((1, 2, 3, 300, 256, 511))
            return slot
        return self.rng.choice((0, 0, 1, 2, 3, 7, 511, self.rng.randrange(512)))

    def writable_slot(self, frame: int, slot: int) -> bool:
        """Never touch slot 0 of an L4 candidate or of the loaded base; never a boot
        table other than the boot L4's non-zero slots."""
        if slot == 0 and (frame in self.roles.l4 or frame == self.current_base() or frame == SYM_BOOT_L4):
            return False
        if frame in self.code:
            return False  # its bytes are the ret instructions fetches return through
        return frame == SYM_BOOT_L4 or frame in self.sandbox or frame >= self.layout.nr_pages

    def cmd_bits(self) -> int:
        return self.rng.choice((0, 0, 0, 0, 2, 3))

    def pt_req(self, frame: int, slot: int, value: int) -> MmuUpdateReq:
        self.written.append((frame, slot))
        del self.written[:-RECENT]
        return MmuUpdateReq((frame << PAGE_SHIFT) | (slot * 8) | self.cmd_bits(), value)

    # -- requests ------------------------------------------------------------------------------
    def link_req(self) -> MmuUpdateReq | None:
        level = self.rng.choice((4, 4, 3, 3, 2, 2))
        table = SYM_BOOT_L4 if level == 4 and self.chance(0.6) else self.table_frame(level)
        slot = self.slot(level, table)
        if slot is None or not self.writable_slot(table, slot):
            return None
        child = self.rng.choice(self.roles.of_level(level - 1)) if self.chance(0.8) else self.hostile_frame()
        if self.chance(0.1):
            child = table  # a linear (recursive) entry
        value = (child << PAGE_SHIFT) | self.flags(self.rng.choice(UPPER_BASES))
        if self.chance(0.1):
            value &= ~int(PteFlag.RW)
        return self.pt_req(table, slot, value)

    def leaf_req(self) -> MmuUpdateReq | None:
        l1 = self.rng.choice(self.roles.l1[: len(WINDOW_SLOTS)]) if self.chance(0.6) else self.table_frame(1)
        slot = self.rng.randrange(WINDOW_PAGES) if self.chance(0.8) else self.rng.randrange(512)
        if not self.writable_slot(l1, slot):
            return None
        pool = self.roles.data if self.chance(0.7) else self.roles.code
        target = self.rng.choice(pool) if self.chance(0.8) else self.hostile_frame()
        value = (target << PAGE_SHIFT) | self.flags(self.rng.choice(LEAF_BASES))
        if self.chance(0.1):
            value = self.rng.choice((0, 0x2 | (target << PAGE_SHIFT), self.rng.getrandbits(64) & ~1))
        return self.pt_req(l1, slot, value)

    def flip_req(self) -> MmuUpdateReq | None:
        """One bit of a live entry: what every fast path must get right."""
        frame = self.rng.choice([SYM_BOOT_L4] + [f for f in self.roles.all() if f not in self.code])
        live = [s for s in range(512) if self.read_entry(frame, s) & 1 and self.writable_slot(frame, s)]
        if not live:
            return None
        slot = self.rng.choice(live)
        if frame == SYM_BOOT_L4 and 256 <= slot <= 271:
            return None
        value = self.read_entry(frame, slot) ^ (1 << self.rng.choice(FLIP_BITS))
        return self.pt_req(frame, slot, value)

    def mmu_req(self) -> MmuUpdateReq | None:
        r = self.rng.random()
        if r < 0.35:
            return self.link_req()
        if r < 0.75:
            return self.leaf_req()
        if r < 0.95:
            return self.flip_req()
        frame = self.rng.choice(self.roles.data)
        return MmuUpdateReq((frame << PAGE_SHIFT) | 1, self.rng.choice((frame, frame + 1, 0x1234)))

    def foreigndom(self, mmuext: bool) -> int:
        r = self.rng.random()
        if r < 0.9:
            return DOMID_SELF
        if mmuext and r < 0.95:
            return 0x10000 | DOMID_SELF  # domid_t is 16 bits: still DOMID_SELF
        return self.rng.choice((0, 1, 0x7FEF))

    def mmuext_entry(self) -> MmuextEntry | None:
        r = self.rng.random()
        if r < 0.2:  # pin
            level = self.rng.choice((1, 2, 3, 4))
            frame = self.table_frame(level) if self.chance(0.9) else self.hostile_frame()
            return MmuextEntry(level - 1, frame)
        if r < 0.3:
            frame = self.rng.choice(self.roles.all() + [self.hostile_frame()])
            return MmuextEntry(4, frame)  # unpin (never the boot L4)
        if r < 0.4:
            return self.baseptr_entry()
        if r < 0.65:
            return self.flush_entry()
        if r < 0.7:
            return MmuextEntry(15, self.rng.choice(self.roles.l4 + [0]))  # NEW_USER_BASEPTR
        if r < 0.78:
            ents = self.rng.choice((0, 1, 8192, 8193, 1 << 32, (1 << 32) | 5))
            ptr = self.rng.choice((0, 0x1000, window_va(1), 0x1234, window_va(260)))
            return MmuextEntry(13, ptr, ents)  # SET_LDT
        if r < 0.84:
            return MmuextEntry(16, self.rng.choice(self.roles.data + self.roles.l1 + [self.hostile_frame()]))
        if r < 0.9:
            dst = self.rng.choice(self.roles.data + self.roles.l2)
            return MmuextEntry(17, dst, self.rng.choice(self.roles.data + self.roles.l1 + [self.hostile_frame()]))
        return MmuextEntry(self.rng.choice((12, 14, 18, 19, 20, 21, 99)), self.rng.choice(self.roles.data))

    def baseptr_entry(self) -> MmuextEntry | None:
        if self.chance(0.4):
            return MmuextEntry(5, SYM_BOOT_L4)
        frame = self.rng.choice(self.roles.l4) if self.chance(0.8) else self.rng.choice(self.roles.all())
        if self.read_entry(frame, 0) & ~0x60 != self.boot_l3_entry & ~0x60:
            return None  # the kernel would lose its own mapping
        return MmuextEntry(5, frame)

    def window(self) -> int:
        """A VA where programs map things: mostly the pages the prologue mapped."""
        if self.chance(0.75):
            return window_va(self.rng.choice(WINDOW_SLOTS), 0, 0, self.rng.randrange(WINDOW_PAGES))
        slot = self.rng.choice(DATA_SLOTS + (CODE_SLOT,) + SPARE_SLOTS)
        return window_va(slot, self.rng.choice((0, 0, 1, 511)), self.rng.choice((0, 0, 1, 511)), self.rng.randrange(8))

    def flush_entry(self) -> MmuextEntry:
        cmd = self.rng.choice((6, 6, 7, 7, 8, 9, 10, 11))
        va = self.window() if self.chance(0.9) else 0x8000_0000_0000
        return MmuextEntry(cmd, va, MASK_VA if cmd in (8, 9) else 0)

    def uvm_op(self) -> UpdateVaMapping | None:
        va = self.window()
        pool = self.roles.code if va >> 39 == CODE_SLOT else self.roles.data
        target = self.rng.choice(pool) if self.chance(0.85) else self.hostile_frame()
        val = (target << PAGE_SHIFT) | self.flags(0x67)
        if self.chance(0.1):
            val = 0
        flags = self.rng.choice((0, 1, 2, 2, 2, 4, 5, 6, MASK_VA | 1, MASK_VA | 2, 3, 7))
        return UpdateVaMapping(va, val, flags)

    # -- operations ----------------------------------------------------------------------------
    def op_mmu_update(self) -> Op | None:
        reqs = [r for r in (self.mmu_req() for _ in range(self.rng.choice((1, 1, 1, 2, 3, 5)))) if r is not None]
        return MmuUpdate(tuple(reqs), self.foreigndom(False)) if reqs else None

    def op_mmuext(self) -> Op | None:
        ops = [e for e in (self.mmuext_entry() for _ in range(self.rng.choice((1, 1, 1, 2, 3)))) if e is not None]
        if not ops:
            return None
        if any(e.cmd in (8, 9) for e in ops):
            self.emit(Write(MASK_VA, self.rng.choice((1, 1, 0, 2, 3))))
        return MmuextOp(tuple(ops), self.foreigndom(True))

    def op_uvm(self) -> Op | None:
        op = self.uvm_op()
        if op is not None and op.flags & ~7:
            self.emit(Write(MASK_VA, self.rng.choice((1, 1, 0, 2))))
        return op

    def op_multicall(self) -> Op | None:
        calls: list[Hypercall] = []
        for _ in range(self.rng.choice((2, 2, 3, 4))):
            pick = self.rng.choice((self.op_mmu_update, self.op_mmuext, self.op_uvm))
            call = pick()
            if isinstance(call, (MmuUpdate, MmuextOp, UpdateVaMapping)):
                calls.append(call)
        return Multicall(tuple(calls)) if calls else None

    def op_read(self) -> Op:
        if self.chance(0.03):
            return Read(0x8000_0000_0000)  # not canonical: #GP
        return Read(self.window() + 8 * self.rng.randrange(512))

    def op_write(self) -> Op | None:
        va = self.window() + 8 * self.rng.randrange(512)
        targets = self.targets(va)
        if targets is None or not targets <= self.data:
            return None
        if any(self.page_type(f) is PageType.L1 for f in targets):
            return None  # Xen would emulate it (ptwr); the model does not
        return Write(va, self.rng.getrandbits(64))

    def op_fetch(self) -> Op | None:
        va = window_va(CODE_SLOT, 0, self.rng.choice((0, 0, 0, 1)), self.rng.randrange(WINDOW_PAGES)) + CODE_OFFSET
        targets = self.targets(va)
        if targets is None or not targets <= self.code:
            return None
        mem = self.model.machine.mem
        if any(mem.read_u64((self.fmap.frame(f) << PAGE_SHIFT) + CODE_OFFSET) != RET8 for f in targets):
            return None
        return Fetch(va)

    def op_read_back(self) -> Op:
        """Map a frame read-only at SCRATCH_VA and read one entry of it: half the
        time one a recent request wrote (what Xen stored there), else any."""
        if self.written and self.chance(0.5):
            frame, slot = self.rng.choice(self.written)  # an entry a request named lately
        else:
            frame = self.rng.choice([SYM_BOOT_L4] + self.roles.all())
            slot = self.rng.choice((0, 1, 2, 3, 300, 511, self.rng.randrange(512)))
        self.emit(UpdateVaMapping(SCRATCH_VA, (frame << PAGE_SHIFT) | 0x1, 2))
        if frame == SYM_BOOT_L4 and 256 <= slot <= 271:
            slot = 1  # Xen's own slots hold Xen's mappings, which the model does not have
        return Read(SCRATCH_VA + 8 * slot)

    def prologue(self) -> None:
        """L4 candidates get the kernel's slot 0; code frames get their ``ret``; each
        window gets a table chain from the boot L4 down to an L1 mapping its first
        pages (read-write, read-only, no-execute mixed), which later operations then
        change."""
        # dom0's free frames hold whatever was there before (Xen scrubs free memory
        # in the background): start from zeroed frames, as the model does.
        self.emit(MmuextOp(tuple(MmuextEntry(16, f) for f in sorted(self.sandbox))))
        for l4 in self.roles.l4:
            self.emit(MmuUpdate((MmuUpdateReq(l4 << PAGE_SHIFT, self.boot_l3_entry),)))
        for code in self.roles.code:
            self.emit(UpdateVaMapping(SCRATCH_VA, (code << PAGE_SHIFT) | 0x63, 2))
            self.emit(Write(SCRATCH_VA + CODE_OFFSET, RET8))
        for i, slot in enumerate(WINDOW_SLOTS):
            l3, l2, l1 = self.roles.l3[i], self.roles.l2[i], self.roles.l1[i]
            pool = self.roles.code if slot == CODE_SLOT else self.roles.data
            reqs = [
                MmuUpdateReq((SYM_BOOT_L4 << PAGE_SHIFT) | slot * 8, (l3 << PAGE_SHIFT) | TABLE_FLAGS),
                MmuUpdateReq(l3 << PAGE_SHIFT, (l2 << PAGE_SHIFT) | TABLE_FLAGS),
                MmuUpdateReq(l2 << PAGE_SHIFT, (l1 << PAGE_SHIFT) | TABLE_FLAGS),
            ]
            for page in range(WINDOW_PAGES):
                flags = self.rng.choice((0x67, 0x67, 0x65, 0x27, 0x25)) | (self.rng.choice((0, 0, 1)) << 63)
                value = (self.rng.choice(pool) << PAGE_SHIFT) | flags
                reqs.append(MmuUpdateReq((l1 << PAGE_SHIFT) | page * 8, value))
            self.emit(MmuUpdate(tuple(reqs)))

    def program(self, n_ops: int) -> list[Op]:
        """About ``n_ops`` operations (a few more: read-backs come in pairs)."""
        self.prologue()
        choices: list[tuple[float, Callable[[], Op | None]]] = [
            (0.24, self.op_mmu_update), (0.12, self.op_mmuext), (0.08, self.op_uvm), (0.08, self.op_multicall),
            (0.14, self.op_read), (0.12, self.op_write), (0.07, self.op_fetch), (0.15, self.op_read_back),
        ]
        weights = [w for w, _ in choices]
        while len(self.ops) < n_ops:
            make = self.rng.choices([c for _, c in choices], weights)[0]
            op = make()
            if op is not None:
                self.emit(op)
        return list(self.ops)


def generate(seed: int, n_ops: int, layout: Dom0Layout | None = None) -> list[Op]:
    """A program of about ``n_ops`` operations from ``seed`` (deterministic)."""
    try:
        return ProgramGenerator(seed, layout).program(n_ops)
    except RefmodelError as err:
        raise RefmodelError(f"program generation (seed {seed}) failed: {err}") from err
