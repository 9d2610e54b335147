"""The tie between the specs and the Python model: the abstraction of a concrete
machine as a Z3 :class:`~specs.state.State` of constants, and the evaluation of Z3
terms on it.

:func:`abstract` reads a :class:`World` — the machine, the backends running on it
(one vCPU each) and, if any, the scheduler — and builds every component of the
state as a store chain over a default value, plus the finite :class:`Universe` of
indices that hold anything else. Over such a state every quantifier of the specs is
a finite conjunction (:meth:`State.forall`), so an invariant or a transition's
decision simplifies to ``True`` or ``False``, and a post-state component can be
read index by index (:func:`value`).

Which vCPU filled a TLB entry is not recorded by the model; the abstraction takes it
from the caller (``filled_by``) or, failing that, picks the vCPU with the entry's
tag whose domain owns the frame (what memory isolation guarantees).
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import z3

from refmodel.arch.control import Cr4
from refmodel.arch.pte import Level, PageSize
from refmodel.arch.tlb import TlbEntry
from refmodel.arch.types import ENTRY_SIZE, PAGE_SHIFT
from refmodel.arch.vcpu import ArchState
from refmodel.errors import RefmodelError
from refmodel.guest.ops import MmuBackend, Mode
from refmodel.hv.invariants import hardware_vpid, tlb_writable
from refmodel.hv.machine import Machine
from refmodel.hv.sched import Scheduler, with_paging_registers

from . import words as w
from .state import FIELD_NAMES, SORTS, DomMode, PageType, Sort, State, Universe
from .tlb import NUM_REGS
from .words import Expr

#: Values an index outside the universe holds.
DEFAULT_DOM = w.DOMID_INVALID
NO_MODE = 3
EPT_RWX = 0x7


@dataclass
class World:
    """A concrete machine and the vCPUs on it: ``backends[i]`` is vCPU ``i`` (with a
    scheduler, its vCPUs in order), ``running`` the index of the running one."""

    machine: Machine
    backends: Sequence[MmuBackend]
    sched: Scheduler | None = None
    running: int = 0
    #: TLB entry -> vCPU index that filled it (provenance the model does not keep)
    filled_by: Mapping[TlbEntry, int] = field(default_factory=dict)

    @staticmethod
    def of_scheduler(machine: Machine, sched: Scheduler, filled_by: Mapping[TlbEntry, int] | None = None) -> "World":
        backends = [v.backend for v in sched.vcpus]
        running = sched.current if sched.current is not None else 0
        return World(machine, backends, sched, running, dict(filled_by or {}))


def mode_of(backend: MmuBackend) -> DomMode:
    if backend.mode is Mode.PV:
        return DomMode.PV
    if backend.mode in (Mode.SHADOW, Mode.SHADOW_OOS):
        return DomMode.SHADOW
    if backend.mode is Mode.HAP:
        return DomMode.HAP
    raise RefmodelError(f"mode {backend.mode.value} runs no domain")


# -- registers --------------------------------------------------------------------------------


def regs_of(state: ArchState) -> list[int]:
    """An ArchState as the 24 registers of the specs (GPRs, RIP, RFLAGS, CR0, CR2,
    CR3, CR4, EFER, CPL)."""
    return [*state.gprs, state.rip, state.rflags, state.cr0, state.cr2, state.cr3, state.cr4, state.efer, state.cpl]


def reg_array(values: Sequence[int]) -> Expr:
    arr = z3.K(w.RegS, w.word(0))
    for i, v in enumerate(values):
        if v:
            arr = z3.Store(arr, z3.BitVecVal(i, w.REG_BITS), w.word(v))
    return arr


def live_registers(world: World) -> ArchState:
    """What the running vCPU sees: the physical register file, with the paging
    registers the backend keeps as the guest sees them."""
    b = world.backends[world.running]
    if world.sched is not None:
        return with_paging_registers(world.sched.regs, b)
    return getattr(b, "guest_state")  # type: ignore[no-any-return]


def saved_registers(world: World, i: int) -> ArchState:
    if world.sched is not None:
        return world.sched.vcpus[i].saved
    return getattr(world.backends[i], "guest_state")  # type: ignore[no-any-return]


# -- building arrays -----------------------------------------------------------------------------


def store_chain(sort_key: Expr, default: Expr, items: Iterable[tuple[int, Expr]]) -> Expr:
    arr = z3.K(sort_key, default)
    for k, v in items:
        arr = z3.Store(arr, z3.BitVecVal(k, sort_key.size()), v)
    return arr


def nonzero_words(machine: Machine) -> dict[int, int]:
    """Entry address (frame ++ index) -> value of every nonzero 8-byte word."""
    out = {}
    for frame in machine.mem.populated_frames():
        raw = machine.mem.frame_bytes(frame)
        for i in range(0, len(raw), ENTRY_SIZE):
            v = int.from_bytes(raw[i : i + ENTRY_SIZE], "little")
            if v:
                out[(frame << w.INDEX_BITS) | (i // ENTRY_SIZE)] = v
    return out


def _vcpu_base(b: MmuBackend) -> int:
    if b.mode is Mode.PV:
        base = getattr(b, "vcpu").guest_table
        return int(base) if base is not None else 0
    if b.mode in (Mode.SHADOW, Mode.SHADOW_OOS):
        root = getattr(b, "root")
        return int(root.smfn) if root is not None else 0
    return int(getattr(b, "guest_state").cr3) >> PAGE_SHIFT


def _hardware_state(b: MmuBackend) -> ArchState:
    return getattr(b, "mmu").state  # type: ignore[no-any-return]


def p2m_entries(world: World) -> dict[int, int]:
    """(domain ++ gfn) -> EPT-format leaf: a HAP domain's EPT leaves (4 KiB pieces);
    the P2M of the others with full rights."""
    out: dict[int, int] = {}
    for b in world.backends:
        domain = getattr(b, "domain")
        prefix = int(domain.domid) << w.FRAME_BITS
        if b.mode is Mode.HAP:
            for m in getattr(b, "ept").mappings():
                perms = int(m.rights.read) | int(m.rights.write) << 1 | int(m.rights.execute) << 2
                for i in range(m.frames):
                    out[prefix | (int(m.gfn) + i)] = ((int(m.mfn) + i) << PAGE_SHIFT) | perms
        else:
            for gfn, mfn in domain.p2m.items():
                out[prefix | int(gfn)] = (int(mfn) << PAGE_SHIFT) | EPT_RWX
    return out


def _filler(world: World, e: TlbEntry) -> int:
    if e in world.filled_by:
        return world.filled_by[e]
    same_tag = [i for i, b in enumerate(world.backends) if hardware_vpid(b) == e.vpid]
    owner = world.machine.owner_of(e.frame >> PAGE_SHIFT)
    for i in same_tag:
        if getattr(world.backends[i], "domain").domid == owner:
            return i
    return same_tag[0] if same_tag else 0


def abstract(world: World, frames: Iterable[int] = (), tlb: Sequence[TlbEntry] | None = None) -> State:
    """The Z3 state of ``world``. ``frames`` adds frames to the universe (a frame
    whose only state is its owner is left out otherwise); ``tlb`` fixes the order of
    the TLB entries (slot i = tlb[i]; default: the TLB's own order)."""
    from refmodel.hv.pv.pagetype import PageType as PvType
    from refmodel.hv.pv.pagetype import frame_table_of

    m = world.machine
    words = nonzero_words(m)
    ft = frame_table_of(m)
    type_code = {PvType.NONE: PageType.NONE, PvType.L1: PageType.L1, PvType.L2: PageType.L2,
                 PvType.L3: PageType.L3, PvType.L4: PageType.L4, PvType.WRITABLE: PageType.WRITABLE}
    ptype = {int(f): int(type_code.get(p.type, PageType.NONE)) for f, p in ft.pages.items() if p.type in type_code}
    validated = {int(f) for f, p in ft.pages.items() if p.validated and p.count > 0 and p.type.is_page_table}
    pinned = {int(f) for f, p in ft.pages.items() if p.pinned}
    sh_level: dict[int, int] = {}
    sh_dom: dict[int, int] = {}
    sh_back: dict[int, int] = {}
    sh_hash: dict[int, int] = {}
    gpt: set[int] = set()
    for b in world.backends:
        if b.mode not in (Mode.SHADOW, Mode.SHADOW_OOS):
            continue
        domain = getattr(b, "domain")
        for page in getattr(b, "shadows").pages():
            smfn = int(page.smfn)
            sh_level[smfn], sh_dom[smfn], sh_back[smfn] = int(page.level), int(domain.domid), int(page.gfn)
            sh_hash[(int(domain.domid) << (w.FRAME_BITS + w.LEVEL_BITS)) | (int(page.gfn) << w.LEVEL_BITS) | int(page.level)] = smfn
            if getattr(b, "write_protected")(page.gfn):
                mfn = domain.mfn_of(page.gfn)
                if mfn is not None:
                    gpt.add(int(mfn))
    entries = list(m.tlb.entries()) if tlb is None else list(tlb)
    for e in entries:
        if e.size is not PageSize.SIZE_4K:
            raise RefmodelError(f"{e}: the specs' TLB entries map 4 KiB pages")
    p2m = p2m_entries(world)
    live = live_registers(world)
    n = len(world.backends)
    saved = {i: regs_of(saved_registers(world, i)) for i in range(n) if i != world.running}
    ghost = dict(saved)
    ghost[world.running] = regs_of(live)

    def bvs(bits: int) -> Callable[[int], Expr]:
        return lambda v: z3.BitVecVal(v, bits)

    def boolv(v: bool) -> Expr:
        return z3.BoolVal(v)

    slots = range(len(entries))
    values: dict[str, Expr] = {
        "mem": store_chain(w.KeyS, w.word(0), ((k, w.word(v)) for k, v in words.items())),
        "owner": store_chain(w.FrameS, w.dom_val(DEFAULT_DOM), ((int(f), w.dom_val(int(d))) for f, d in m.owner.items())),
        "ptype": store_chain(w.FrameS, bvs(w.PTYPE_BITS)(0), ((f, bvs(w.PTYPE_BITS)(t)) for f, t in ptype.items() if t)),
        "validated": store_chain(w.FrameS, boolv(False), ((f, boolv(True)) for f in validated)),
        "pinned": store_chain(w.FrameS, boolv(False), ((f, boolv(True)) for f in pinned)),
        "p2m": store_chain(w.P2mKeyS, w.word(0), ((k, w.word(v)) for k, v in p2m.items())),
        "dom_mode": store_chain(
            w.DomS, bvs(w.MODE_BITS)(NO_MODE),
            ((int(getattr(b, "domain").domid), bvs(w.MODE_BITS)(int(mode_of(b)))) for b in world.backends),
        ),
        "sh_level": store_chain(w.FrameS, bvs(w.LEVEL_BITS)(0), ((f, bvs(w.LEVEL_BITS)(v)) for f, v in sh_level.items())),
        "sh_dom": store_chain(w.FrameS, w.dom_val(0), ((f, w.dom_val(v)) for f, v in sh_dom.items())),
        "sh_back": store_chain(w.FrameS, w.frame_val(0), ((f, w.frame_val(v)) for f, v in sh_back.items())),
        "sh_hash": store_chain(w.ShKeyS, w.frame_val(0), ((k, w.frame_val(v)) for k, v in sh_hash.items())),
        "gpt": store_chain(w.FrameS, boolv(False), ((f, boolv(True)) for f in gpt)),
        "tlb_valid": store_chain(w.SlotS, boolv(False), ((i, boolv(True)) for i in slots)),
        "tlb_vpid": store_chain(w.SlotS, bvs(w.VPID_BITS)(0), ((i, bvs(w.VPID_BITS)(entries[i].vpid)) for i in slots)),
        "tlb_pcid": store_chain(w.SlotS, bvs(w.PCID_BITS)(0), ((i, bvs(w.PCID_BITS)(entries[i].pcid)) for i in slots)),
        "tlb_vpn": store_chain(
            w.SlotS, bvs(w.VPN_BITS)(0), ((i, bvs(w.VPN_BITS)(entries[i].vpn & ((1 << w.VPN_BITS) - 1))) for i in slots)
        ),
        "tlb_frame": store_chain(w.SlotS, w.frame_val(0), ((i, w.frame_val(entries[i].frame >> PAGE_SHIFT)) for i in slots)),
        "tlb_w": store_chain(w.SlotS, boolv(False), ((i, boolv(tlb_writable(entries[i]))) for i in slots)),
        "tlb_u": store_chain(w.SlotS, boolv(False), ((i, boolv(entries[i].rights.user)) for i in slots)),
        "tlb_g": store_chain(w.SlotS, boolv(False), ((i, boolv(entries[i].global_page)) for i in slots)),
        "tlb_vcpu": store_chain(w.SlotS, bvs(w.VCPU_BITS)(0), ((i, bvs(w.VCPU_BITS)(_filler(world, entries[i]))) for i in slots)),
        "tagged": boolv(world.sched.tagged if world.sched is not None else all(getattr(b, "tagged", True) for b in world.backends)),
        "cur": bvs(w.VCPU_BITS)(world.running),
        "vcpu_dom": store_chain(
            w.VcpuS, w.dom_val(w.DOMID_FIRST_RESERVED - 1),
            ((i, w.dom_val(int(getattr(b, "domain").domid))) for i, b in enumerate(world.backends)),
        ),
        "vcpu_vpid": store_chain(
            w.VcpuS, bvs(w.VPID_BITS)((1 << w.VPID_BITS) - 1),
            ((i, bvs(w.VPID_BITS)(hardware_vpid(b))) for i, b in enumerate(world.backends)),
        ),
        "vcpu_base": store_chain(w.VcpuS, w.frame_val(0), ((i, w.frame_val(_vcpu_base(b))) for i, b in enumerate(world.backends))),
        "vcpu_pcid": store_chain(
            w.VcpuS, bvs(w.PCID_BITS)(0), ((i, bvs(w.PCID_BITS)(_hardware_state(b).pcid)) for i, b in enumerate(world.backends))
        ),
        "vcpu_pge": store_chain(
            w.VcpuS, boolv(False),
            ((i, boolv(bool(_hardware_state(b).cr4 & Cr4.PGE))) for i, b in enumerate(world.backends)),
        ),
        "regs": reg_array(regs_of(live)),
        "saved": store_chain(w.VcpuS, z3.K(w.RegS, w.word(0)), ((i, reg_array(r)) for i, r in saved.items())),
        "ghost": store_chain(w.VcpuS, z3.K(w.RegS, w.word(0)), ((i, reg_array(r)) for i, r in ghost.items())),
    }
    assert set(values) == set(FIELD_NAMES) and all(values[k].sort() == SORTS[k] for k in FIELD_NAMES)
    frame_set = set(ptype) | validated | pinned | set(sh_level) | gpt | set(frames)
    universe = Universe({
        Sort.KEY: tuple(sorted(words)),
        Sort.FRAME: tuple(sorted(frame_set)),
        Sort.SLOT: tuple(slots),
        Sort.VCPU: tuple(range(n)),
        Sort.REG: tuple(range(NUM_REGS)),
        Sort.P2M: tuple(sorted(p2m)),
        Sort.SHKEY: tuple(sorted(sh_hash)),
    })
    return State(**values, universe=universe)


# -- evaluation ----------------------------------------------------------------------------------


def truth(e: Expr) -> bool:
    """A closed Boolean term over a concrete state, simplified to True or False."""
    r = z3.simplify(e)
    if z3.is_true(r):
        return True
    if z3.is_false(r):
        return False
    raise RefmodelError(f"term did not simplify to a truth value: {str(r)[:300]}")


def value(e: Expr) -> int:
    """A closed bit-vector term over a concrete state, as an int."""
    r = z3.simplify(e)
    if not z3.is_bv_value(r):
        raise RefmodelError(f"term did not simplify to a value: {str(r)[:300]}")
    return int(r.as_long())


def key_of(mfn: int, index: int) -> Expr:
    return z3.BitVecVal((mfn << w.INDEX_BITS) | index, w.KEY_BITS)


def word_at(s: State, mfn: int, index: int) -> int:
    return value(s.mem[key_of(mfn, index)])


def with_universe(s: State, **extra: Iterable[int]) -> State:
    """``s`` with more indices in its universe (e.g. the frames a transition may touch)."""
    assert s.universe is not None
    members = dict(s.universe.members)
    for name, items in extra.items():
        sort = Sort(name)
        members[sort] = tuple(sorted(set(members.get(sort, ())) | set(items)))
    return State(**{n: getattr(s, n) for n in FIELD_NAMES}, universe=Universe(members))


def level_code(level: Level) -> int:
    return int(level)
