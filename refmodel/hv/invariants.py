"""The isolation invariants, checked on the concrete model — the Python twins of the
Z3 invariants in :mod:`specs.invariants` (same names, same statements; the specs
prove them for every transition, these check them on any state the model reaches).

Each check takes the machine and the backends that run on it and returns a list of
violations, one readable line each (empty: the invariant holds):

- :func:`memory_isolation` — every translation a domain can use (its PV page tables
  from any base it can load, its shadow tables, its EPT — which every one of its
  guest walks goes through —, any TLB entry its vCPU can hit) reaches only machine
  frames it owns;
- :func:`hypervisor_integrity` — none reaches a DOMID_XEN frame, and the tables that
  translate for a guest without being its own (shadows, EPT) are Xen's frames;
- :func:`pt_integrity` — PV: no writable mapping (entry or TLB entry) of a frame typed
  as a page table; every table reachable from a pinned or active base is validated
  at its level; Xen's type counts are exact (the specs abstract a count as "some
  reference exists");
- :func:`shadow_soundness` — each shadow entry grants no more than the guest entry
  composed with the P2M; guest page-table frames are never writable through the
  shadows or the TLB (out-of-sync L1 tables are compared with their snapshot);
- :func:`tlb_isolation` — no TLB entry the incoming vCPU can hit was filled for
  another domain;
- :func:`register_confidentiality` — after a switch, the incoming vCPU sees exactly
  its own saved state.
"""

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields

from ..arch.pte import Level, PageSize, PteFlag
from ..arch.tlb import TlbEntry
from ..arch.types import ENTRIES_PER_TABLE, ENTRY_SIZE, GFN, MFN, PAGE_SHIFT, DomId
from ..arch.vcpu import ArchState
from ..guest.ops import MmuBackend, Mode
from .machine import DOMID_XEN, Machine

#: Entry bits 51:12: the frame an entry references (MAXPHYADDR at its maximum).
ADDR_BITS = ((1 << 52) - 1) & ~0xFFF
#: Xen's L4 slots in a PV guest's top-level table (asm/config.h).
XEN_L4_SLOTS = range(256, 272)


def frame_of(entry: int) -> int:
    return (entry & ADDR_BITS) >> PAGE_SHIFT


def describe_owner(machine: Machine, mfn: int) -> str:
    owner = machine.owner_of(mfn)
    if owner is None:
        return "nobody"
    return "Xen" if owner == DOMID_XEN else f"domain {owner}"


def read_table(machine: Machine, mfn: int) -> tuple[int, ...]:
    raw = machine.mem.frame_bytes(mfn)
    return tuple(int.from_bytes(raw[i : i + ENTRY_SIZE], "little") for i in range(0, len(raw), ENTRY_SIZE))


# -- what a vCPU uses -------------------------------------------------------------------------


def hardware_vpid(backend: MmuBackend) -> int:
    """The tag the processor puts on this vCPU's TLB entries."""
    mmu = getattr(backend, "mmu", None)
    vpid = getattr(mmu, "vpid", None)
    return int(vpid) if isinstance(vpid, int) else int(getattr(backend, "vpid", 0))


def domid_of(backend: MmuBackend) -> DomId:
    domain = getattr(backend, "domain", None)
    if domain is None:
        raise TypeError(f"{type(backend).__name__} runs no domain")
    return DomId(domain.domid)


def is_shadow(backend: MmuBackend) -> bool:
    return backend.mode in (Mode.SHADOW, Mode.SHADOW_OOS)


@dataclass(frozen=True)
class Reach:
    """A frame a translation reaches: ``what`` says how (for messages)."""

    mfn: int
    what: str


def _leaf_frames(base: int, size: PageSize) -> range:
    return range(base, base + (size.value >> PAGE_SHIFT))


def _walk_tables(machine: Machine, root: int, slots: Callable[[int], Iterable[int]]) -> Iterator[tuple[int, int, int, int]]:
    """Every (table, level, index, entry) of the present entries reachable from the
    L4 table ``root``, each (table, level) visited once; PS entries at L2/L3 are
    leaves, the entry below is not followed."""
    seen: set[tuple[int, int]] = set()
    stack = [(root, 4)]
    while stack:
        table, level = stack.pop()
        if (table, level) in seen:
            continue
        seen.add((table, level))
        entries = read_table(machine, table)
        for index in slots(level):
            entry = entries[index]
            if not entry & PteFlag.P:
                continue
            yield table, level, index, entry
            if level > 1 and not (level in (2, 3) and entry & PteFlag.PS):
                stack.append((frame_of(entry), level - 1))


def _leaf_range(level: int, entry: int) -> range:
    """The machine frames a leaf entry (a PTE, or a PS entry at L2/L3) maps."""
    size = {1: PageSize.SIZE_4K, 2: PageSize.SIZE_2M, 3: PageSize.SIZE_1G}[level]
    return _leaf_frames(frame_of(entry) & ~((size.value >> PAGE_SHIFT) - 1), size)


def pv_roots(backend: MmuBackend) -> set[int]:
    """Every base a PV domain can load now: its vCPU's bases and its pinned L4s."""
    from .pv.pagetype import PageType, frame_table_of

    vcpu = getattr(backend, "vcpu")
    machine: Machine = getattr(backend, "machine")
    domid = domid_of(backend)
    roots = {int(m) for m in (vcpu.guest_table, vcpu.guest_table_user) if m is not None}
    ft = frame_table_of(machine)
    roots |= {
        int(m) for m, p in ft.pages.items()
        if p.pinned and p.type is PageType.L4 and machine.owner_of(m) == domid
    }
    return roots


def _pv_reach(machine: Machine, backend: MmuBackend) -> Iterator[tuple[Reach, bool]]:
    """(frame, writable-through-this-path) for every table and page a PV domain's
    walks reach."""
    for root in pv_roots(backend):
        yield Reach(root, f"PV base L4 {root:#x}"), False
        slots = lambda level: (s for s in range(ENTRIES_PER_TABLE) if level != 4 or s not in XEN_L4_SLOTS)  # noqa: E731
        for table, level, index, entry in _walk_tables(machine, root, slots):
            where = f"L{level} {table:#x}[{index}]"
            if level == 1 or (level in (2, 3) and entry & PteFlag.PS):
                for mfn in _leaf_range(level, entry):
                    yield Reach(mfn, f"PV page via {where}"), bool(entry & PteFlag.RW)
            else:
                yield Reach(frame_of(entry), f"PV table via {where}"), False


def _shadow_reach(machine: Machine, backend: MmuBackend) -> Iterator[tuple[Reach, bool]]:
    shadows = getattr(backend, "shadows")
    for page in shadows.pages():
        if page.level is not Level.L4:
            continue
        for table, level, index, entry in _walk_tables(machine, int(page.smfn), lambda _lvl: range(ENTRIES_PER_TABLE)):
            if level == 1 or entry & PteFlag.PS:
                for mfn in _leaf_range(level, entry):
                    yield Reach(mfn, f"shadow L{level} {table:#x}[{index}]"), bool(entry & PteFlag.RW)


def _hap_reach(backend: MmuBackend) -> Iterator[tuple[Reach, bool]]:
    """Every guest walk of a HAP domain goes through its EPT, so the frames its
    translations can reach are exactly those its EPT maps."""
    for m in getattr(backend, "ept").mappings():
        for i in range(m.frames):
            yield Reach(int(m.mfn) + i, f"EPT gfn {int(m.gfn) + i:#x}"), m.rights.write


def reached(machine: Machine, backend: MmuBackend) -> Iterator[tuple[Reach, bool]]:
    """Every frame ``backend``'s page tables (of whatever kind) let its guest reach."""
    if backend.mode is Mode.PV:
        return _pv_reach(machine, backend)
    if is_shadow(backend):
        return _shadow_reach(machine, backend)
    if backend.mode is Mode.HAP:
        return _hap_reach(backend)
    raise TypeError(f"no hypervisor translations for mode {backend.mode.value}")


def tlb_writable(entry: TlbEntry) -> bool:
    """Whether a TLB entry lets writes through (a combined HAP entry needs the EPT's
    write permission as well)."""
    ept = getattr(entry, "ept", None)
    return entry.rights.writable and (ept is None or bool(ept.write))


def hittable(machine: Machine, backend: MmuBackend, backends: Sequence[MmuBackend], running: MmuBackend | None) -> list[TlbEntry]:
    """The TLB entries ``backend``'s vCPU can hit: those with its tag — unless
    another vCPU shares the tag (no VPIDs) and ``backend`` is not the one running:
    then the switch to it flushes them first."""
    vpid = hardware_vpid(backend)
    shared = any(b is not backend and hardware_vpid(b) == vpid for b in backends)
    if shared and running is not backend:
        return []
    return [e for e in machine.tlb.entries() if e.vpid == vpid]


def tlb_frames(e: TlbEntry) -> range:
    return _leaf_frames(e.frame >> PAGE_SHIFT, e.size)


def describe_tlb(e: TlbEntry) -> str:
    return f"TLB entry (vpid {e.vpid}, pcid {e.pcid}, va {e.vpn << e.size.shift:#x})"


# -- memory isolation and hypervisor integrity -------------------------------------------------------


def memory_isolation(machine: Machine, backends: Sequence[MmuBackend], running: MmuBackend | None = None) -> list[str]:
    """Every frame any translation of each domain reaches is the domain's own."""
    problems: list[str] = []
    for b in backends:
        domid = domid_of(b)
        for reach, _w in reached(machine, b):
            if machine.owner_of(reach.mfn) != domid:
                problems.append(
                    f"domain {domid}: {reach.what} reaches mfn {reach.mfn:#x}, owned by {describe_owner(machine, reach.mfn)}"
                )
        for e in hittable(machine, b, backends, running):
            for mfn in tlb_frames(e):
                if machine.owner_of(mfn) != domid:
                    problems.append(
                        f"domain {domid}: {describe_tlb(e)} reaches mfn {mfn:#x}, owned by {describe_owner(machine, mfn)}"
                    )
                    break
    return problems


def hypervisor_integrity(machine: Machine, backends: Sequence[MmuBackend], running: MmuBackend | None = None) -> list[str]:
    """No guest translation reaches a DOMID_XEN frame; shadow and EPT tables are Xen's."""
    problems: list[str] = []
    for b in backends:
        domid = domid_of(b)
        for reach, _w in reached(machine, b):
            if machine.is_hypervisor_frame(reach.mfn):
                problems.append(f"domain {domid}: {reach.what} reaches Xen's mfn {reach.mfn:#x}")
        for e in hittable(machine, b, backends, running):
            xen = [m for m in tlb_frames(e) if machine.is_hypervisor_frame(m)]
            if xen:
                problems.append(f"domain {domid}: {describe_tlb(e)} reaches Xen's mfn {xen[0]:#x}")
        own_tables: list[int] = []
        if is_shadow(b):
            own_tables = [int(p.smfn) for p in getattr(b, "shadows").pages()]
        elif b.mode is Mode.HAP:
            own_tables = [int(m) for m in getattr(b, "ept").tables()]
        for mfn in own_tables:
            if not machine.is_hypervisor_frame(mfn):
                problems.append(f"domain {domid}: a hypervisor table is in mfn {mfn:#x}, owned by {describe_owner(machine, mfn)}")
    return problems


# -- page-table integrity (PV) -------------------------------------------------------------------------


def pt_integrity(machine: Machine, backends: Sequence[MmuBackend]) -> list[str]:
    """Xen's PV type system holds: no writable mapping of a page-table frame, every
    table reachable from a pinned or active base validated at its level (or, through
    a read-only linear entry, at a higher one), every validated table's entries
    well typed, and the type counts exact."""
    from .pv.pagetype import PageType, frame_table_of

    ft = frame_table_of(machine)
    problems: list[str] = []
    in_use = {int(m): p for m, p in ft.pages.items() if p.count > 0 and p.validated and p.type.is_page_table}
    expected: dict[int, int] = {}

    def ref(mfn: int) -> None:
        expected[mfn] = expected.get(mfn, 0) + 1

    for mfn, page in sorted(in_use.items()):
        level = page.type.level
        assert level is not None
        entries = read_table(machine, mfn)
        for index, entry in enumerate(entries):
            if not entry & PteFlag.P or (level is Level.L4 and index in XEN_L4_SLOTS):
                continue
            target = frame_of(entry)
            tinfo = ft.pages.get(MFN(target))
            where = f"L{int(level)} {mfn:#x}[{index}]"
            if level is Level.L1:
                if entry & PteFlag.RW:
                    ref(target)
                    if tinfo is None or tinfo.type is not PageType.WRITABLE:
                        kind = tinfo.type.value if tinfo is not None else "untyped"
                        problems.append(f"{where} maps mfn {target:#x} writable, but it is {kind}")
                continue
            if entry & PteFlag.PS:
                problems.append(f"{where} is a superpage entry in a PV table")
                continue
            if target == mfn:
                continue  # a linear self-map holds no reference
            ref(target)
            below = PageType.table(Level(int(level) - 1))
            same = PageType.table(level)
            ok = tinfo is not None and tinfo.count > 0 and tinfo.validated and (
                tinfo.type is below or (tinfo.type is same and not entry & PteFlag.RW)
            )
            if not ok:
                problems.append(f"{where} references mfn {target:#x}, not a validated {below.value}")
    for mfn, page in ft.pages.items():
        if page.pinned:
            ref(int(mfn))
            if not (page.validated and page.count > 0):
                problems.append(f"pinned mfn {mfn:#x} is not validated")
    for b in backends:
        if b.mode is not Mode.PV:
            continue
        vcpu = getattr(b, "vcpu")
        for base in (vcpu.guest_table, vcpu.guest_table_user):
            if base is not None:
                ref(int(base))
                info = ft.pages.get(MFN(base))
                if info is None or info.type is not PageType.L4 or not info.validated:
                    problems.append(f"domain {domid_of(b)}: base {int(base):#x} is not a validated L4")
        for e in machine.tlb.entries():
            if e.vpid == hardware_vpid(b) and tlb_writable(e):
                for m in tlb_frames(e):
                    info = ft.pages.get(MFN(m))
                    if info is not None and info.type.is_page_table:
                        problems.append(f"domain {domid_of(b)}: writable {describe_tlb(e)} maps {info.type.value} {m:#x}")
    for mfn, page in ft.pages.items():
        want = expected.get(int(mfn), 0)
        if page.type is PageType.WRITABLE or page.type.is_page_table:
            if page.count != want:
                problems.append(f"mfn {mfn:#x} ({page.type.value}): type count {page.count}, {want} references")
    return problems


# -- shadow soundness -------------------------------------------------------------------------------


def _guest_entry(backend: MmuBackend, gfn: int, index: int) -> int:
    return int(getattr(backend, "guest_mem").read_u64((gfn << PAGE_SHIFT) + index * ENTRY_SIZE))


def _rights_exceeded(sentry: int, gentry: int) -> list[str]:
    out = []
    if sentry & PteFlag.RW and not gentry & PteFlag.RW:
        out.append("write")
    if sentry & PteFlag.US and not gentry & PteFlag.US:
        out.append("user")
    if gentry & PteFlag.XD and not sentry & PteFlag.XD:
        out.append("execute")
    return out


def shadow_soundness(machine: Machine, backends: Sequence[MmuBackend]) -> list[str]:
    """Each present shadow entry of each shadow-mode backend grants no more than its
    guest entry (or, for an out-of-sync L1, its snapshot) composed with the P2M; no
    guest page-table frame (in sync) is writable through a shadow L1 entry or a TLB
    entry of the domain."""
    problems: list[str] = []
    for b in backends:
        if not is_shadow(b):
            continue
        shadows = getattr(b, "shadows")
        domain = getattr(b, "domain")
        oos = getattr(b, "oos")
        protected = {
            int(m) for p in shadows.pages()
            if p.gfn not in oos and (m := domain.mfn_of(p.gfn)) is not None
        }
        for page in shadows.pages():
            snapshot = oos.find(page.gfn)
            for index, sentry in enumerate(read_table(machine, int(page.smfn))):
                if not sentry & PteFlag.P:
                    continue
                where = f"domain {domain.domid}: {page.describe()}[{index}]"
                gentry = snapshot.snapshot[index] if snapshot is not None else _guest_entry(b, int(page.gfn), index)
                if not gentry & PteFlag.P:
                    problems.append(f"{where} is present, the guest entry is not")
                    continue
                extra = _rights_exceeded(sentry, gentry)
                if extra:
                    problems.append(f"{where} grants {', '.join(extra)} the guest entry does not")
                target = frame_of(sentry)
                if page.level is Level.L1:
                    want = domain.mfn_of(GFN(frame_of(gentry)))
                    if want is None or int(want) != target:
                        problems.append(f"{where} maps mfn {target:#x}, the guest entry's gfn is backed by {want}")
                    if sentry & PteFlag.RW and target in protected:
                        problems.append(f"{where} maps guest page table mfn {target:#x} writable")
                else:
                    child = shadows.by_smfn(target)
                    if child is None or int(child.gfn) != frame_of(gentry) or child.level is not Level(page.level - 1):
                        problems.append(f"{where} links mfn {target:#x}, not the shadow of the guest's table")
        for e in machine.tlb.entries():
            if e.vpid == hardware_vpid(b) and tlb_writable(e):
                hit = [m for m in tlb_frames(e) if m in protected]
                if hit:
                    problems.append(f"domain {domain.domid}: writable {describe_tlb(e)} maps guest page table {hit[0]:#x}")
    return problems


# -- TLB isolation and register confidentiality ----------------------------------------------------


def tlb_isolation(
    machine: Machine, incoming: MmuBackend, filled_for: Mapping[TlbEntry, int] | None = None
) -> list[str]:
    """No TLB entry the incoming vCPU can hit (its tag) was filled for another
    domain. Which domain an entry was filled for is ``filled_for`` when the caller
    tracked it; otherwise the owner of the frame it maps (an entry filled for a
    domain maps that domain's frames, by memory isolation)."""
    domid = domid_of(incoming)
    vpid = hardware_vpid(incoming)
    problems = []
    for e in machine.tlb.entries():
        if e.vpid != vpid:
            continue
        if filled_for is not None and e in filled_for:
            filler = filled_for[e]
        else:
            filler = int(machine.owner_of(e.frame >> PAGE_SHIFT) or -1)
        if filler != domid:
            problems.append(f"domain {domid} can hit {describe_tlb(e)}, filled for domain {filler}")
    return problems


def register_confidentiality(live: ArchState, expected: ArchState) -> list[str]:
    """The registers the running vCPU sees differ from its own saved state."""
    problems = []
    for f in fields(ArchState):
        have, want = getattr(live, f.name), getattr(expected, f.name)
        if f.name == "gprs":
            for i, (h, wv) in enumerate(zip(have, want)):
                if h != wv:
                    problems.append(f"gpr {i}: sees {h:#x}, its own value is {wv:#x}")
        elif have != want:
            problems.append(f"{f.name}: sees {have:#x}, its own value is {want:#x}")
    return problems


def all_violations(machine: Machine, backends: Sequence[MmuBackend], running: MmuBackend | None = None) -> list[str]:
    """Every state invariant at once (the two about switches need the switch)."""
    return (
        memory_isolation(machine, backends, running)
        + hypervisor_integrity(machine, backends, running)
        + pt_integrity(machine, backends)
        + shadow_soundness(machine, backends)
    )
