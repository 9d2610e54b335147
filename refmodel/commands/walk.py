"""``refmodel walk``: build a small address space and explain one access step by step.

A teaching aid for the core (SDM Vol. 3A 4.5-4.8): every entry the walk reads, with
its address, its value and its decoded flags, and the rule that decided at that
entry — present or not (4.7), reserved bits (4.5), table or leaf (4.5), the rights
combined so far (4.6.1) — then, at the leaf, whether the combined rights allow the
access and which A/D flags the processor sets (4.8); or the #PF with CR2 and its
error code, decoded. The walk is :func:`refmodel.arch.walk.walk` itself; this command
only watches what it reads and explains it.

``--leaf-flags`` is taken literally: without ``P`` the leaf is not present.
"""

import argparse
from dataclasses import dataclass, field

from ..arch.access import Access, AccessKind
from ..arch.builder import PageTableBuilder
from ..arch.fault import FaultCause, PageFault, PfErrorCode
from ..arch.physmem import PhysicalMemory
from ..arch.pte import Level, PageSize, PteFlag, entry_frame_address
from ..arch.walk import PagingContext, Rights, Translation, access_denial, is_leaf, reserved_bits, walk
from ..errors import RefmodelError

#: The linear address the command explains lies at this offset in its page.
OFFSET = 0x10
#: Where the page is mapped: physical 1 GiB, aligned for every page size.
PAGE_PA = 0x4000_0000
SIZES = {"4K": PageSize.SIZE_4K, "2M": PageSize.SIZE_2M, "1G": PageSize.SIZE_1G}
TABLE_NAMES = {Level.L4: "PML4 table", Level.L3: "page-directory-pointer table", Level.L2: "page directory",
               Level.L1: "page table"}


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("walk", help="explain one 4-level page walk, entry by entry")
    p.add_argument("--access", choices=[k.value for k in AccessKind], default="write",
                   help="the kind of access to explain (default write)")
    p.add_argument("--cpl", type=int, choices=[0, 3], default=3,
                   help="current privilege level: 3 user mode (default), 0 supervisor mode")
    p.add_argument("--leaf-flags", default="P,RW,US",
                   help="comma-separated PteFlag names for the leaf, taken literally (no P: not present)")
    p.add_argument("--size", choices=list(SIZES), default="4K", help="the page size the leaf maps (default 4K)")
    p.set_defaults(func=run)


@dataclass
class WatchedMemory:
    """Physical memory that remembers every entry the walk reads (and the A/D writes)."""

    mem: PhysicalMemory
    reads: list[tuple[int, int]] = field(default_factory=list)
    writes: dict[int, int] = field(default_factory=dict)

    def read_u64(self, pa: int) -> int:
        value = self.mem.read_u64(pa)
        self.reads.append((pa, value))
        return value

    def write_u64(self, pa: int, value: int) -> None:
        self.writes[pa] = value
        self.mem.write_u64(pa, value)


def parse_flags(text: str) -> int:
    flags = 0
    for name in filter(None, (n.strip() for n in text.split(","))):
        try:
            flags |= PteFlag[name.upper()]
        except KeyError:
            raise RefmodelError(f"--leaf-flags: unknown flag {name!r}; flags: {', '.join(f.name or '' for f in PteFlag)}") from None
    return flags


def build(mem: PhysicalMemory, va: int, size: PageSize, leaf_flags: int) -> int:
    """Tables for ``va`` (P, RW, US at every upper level) and a leaf holding exactly
    ``leaf_flags`` (PS added for a large page); returns CR3."""
    builder = PageTableBuilder(mem, iter(range(0x1000, 0x2000)))
    addr = builder.entry_addr(va, size.leaf_level)
    mem.write_u64(addr, PAGE_PA | leaf_flags | (int(PteFlag.PS) if size is not PageSize.SIZE_4K else 0))
    return builder.cr3


def flag_names(value: int) -> str:
    names = [f.name or "" for f in PteFlag if f is not PteFlag.PAT_LARGE and value & f]
    return " ".join(names) or "none"


def rights_text(r: Rights) -> str:
    return ", ".join(("writable" if r.writable else "read-only", "user" if r.user else "supervisor-only",
                      "execute-disable" if r.execute_disable else "executable"))


def denial_rule(cause: FaultCause, access: Access) -> str:
    """The SDM 4.6.1 rule that refuses the access, in words."""
    mode = "user-mode" if access.user else "supervisor-mode"
    return {
        FaultCause.WRITE_PROTECT: f"a {mode} write needs R/W = 1 in every entry"
        + ("" if access.user else " when CR0.WP = 1"),
        FaultCause.USER_SUPERVISOR: "a user-mode access needs U/S = 1 in every entry",
        FaultCause.EXECUTE_DISABLE: "with EFER.NXE = 1, XD = 1 in any entry forbids instruction fetches",
        FaultCause.SMEP: "CR4.SMEP = 1: no supervisor-mode fetch from a user-mode address",
        FaultCause.SMAP: "CR4.SMAP = 1, RFLAGS.AC = 0: no supervisor-mode data access to a user-mode address",
    }.get(cause, cause.value)


def explain_entry(level: Level, addr: int, value: int, rights: Rights, ctx: PagingContext, access: Access) -> list[str]:
    """What the walk decides at one entry, and by which rule."""
    lines = [f"  {level.entry_name} at {addr:#x} = {value:#018x}  [{flag_names(value)}]"]
    if not value & PteFlag.P:
        return lines + ["      P = 0: not present; the walk stops with #PF, the other bits are ignored (SDM 4.7)"]
    rsvd = reserved_bits(value, level, ctx)
    if rsvd:
        return lines + [f"      reserved bits {rsvd:#x} set: #PF with RSVD = 1 (SDM 4.5, Tables 4-14 to 4-20)"]
    narrowed = rights.narrowed_by(value)
    if not is_leaf(value, level):
        child = TABLE_NAMES[Level(level - 1)]
        return lines + [
            f"      present, PS = 0: references the {child} at {entry_frame_address(value, ctx.maxphyaddr):#x}",
            f"      rights so far: {rights_text(narrowed)} (every level must grant, SDM 4.6.1)",
        ]
    size = PageSize.for_leaf_level(level)
    lines.append(f"      present, a leaf: a {size.name[5:]} page at {entry_frame_address(value, ctx.maxphyaddr, size):#x}")
    denial = access_denial(narrowed, access, ctx)
    if denial is not None:
        return lines + [f"      rights: {rights_text(narrowed)}: refused — {denial_rule(denial, access)} (SDM 4.6.1)"]
    return lines + [f"      rights: {rights_text(narrowed)}: the {access.kind.value} is allowed (SDM 4.6.1)"]


def error_code_text(code: PfErrorCode) -> str:
    kind = "write" if code & PfErrorCode.W else "instruction fetch" if code & PfErrorCode.I else "read"
    parts = ["protection violation" if code & PfErrorCode.P else "not-present page", kind,
             "user mode" if code & PfErrorCode.U else "supervisor mode"]
    if code & PfErrorCode.RSVD:
        parts.append("reserved bit")
    names = " ".join(f.name or "" for f in PfErrorCode if code & f) or "none"
    return f"{int(code):#x} [{names}] ({', '.join(parts)})"


def outcome_lines(out: Translation | PageFault, watched: WatchedMemory) -> list[str]:
    if isinstance(out, PageFault):
        return [f"  -> #PF (vector 14): CR2 = {out.cr2:#x}, error code {error_code_text(out.error_code)}; "
                f"cause: {out.cause.value} (SDM 4.7)"]
    lines = [f"  -> translated: physical address {out.pa:#x} in a {out.size.name[5:]} page"]
    for addr, value in watched.writes.items():
        lines.append(f"     the processor set A/D at {addr:#x}: now {value:#018x} [{flag_names(value)}] (SDM 4.8)")
    return lines


def run(args: argparse.Namespace) -> int:
    mem = PhysicalMemory(maxphyaddr=46)
    size = SIZES[args.size]
    va = 0x7F00_0000_0000 + size.value
    ctx = PagingContext(cr3=build(mem, va, size, parse_flags(args.leaf_flags)), maxphyaddr=46)
    access = Access(AccessKind(args.access), args.cpl)
    mode = "user mode" if access.user else "supervisor mode"
    print(f"{access.kind.value} of {va + OFFSET:#x} at CPL {args.cpl} ({mode}); CR3 = {ctx.cr3:#x}, "
          "CR0.WP = 1, EFER.NXE = 1, CR4.SMEP = CR4.SMAP = 0")
    watched = WatchedMemory(mem)
    out = walk(watched, ctx, va + OFFSET, access).outcome
    rights = Rights()
    for level, (addr, value) in zip((Level.L4, Level.L3, Level.L2, Level.L1), watched.reads):
        print("\n".join(explain_entry(level, addr, value, rights, ctx, access)))
        rights = rights.narrowed_by(value)
    print("\n".join(outcome_lines(out, watched)))
    print(f"  {len(watched.reads)} memory references (a TLB miss; SDM 4.10.2)")
    return 0
