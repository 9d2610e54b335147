"""``refmodel walk``: build a small address space and explain one access step by step.

A teaching aid for the core (SDM Vol. 3A 4.5-4.8): which entries are read, which
rights combine, where A/D land, and the #PF error code when the access is refused.
"""

import argparse

from ..arch.access import Access, AccessKind
from ..arch.builder import PageTableBuilder
from ..arch.mmu import Mmu
from ..arch.physmem import PhysicalMemory
from ..arch.pte import Entry, PageSize, PteFlag
from ..arch.vcpu import ArchState
from ..arch.walk import Translation


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("walk", help="explain one 4-level page walk")
    p.add_argument("--access", choices=[k.value for k in AccessKind], default="write")
    p.add_argument("--cpl", type=int, choices=[0, 3], default=3)
    p.add_argument("--leaf-flags", default="P,RW,US", help="comma-separated PteFlag names")
    p.add_argument("--size", choices=["4K", "2M", "1G"], default="4K")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    mem = PhysicalMemory(maxphyaddr=46)
    builder = PageTableBuilder(mem, iter(range(0x1000, 0x2000)))
    size = {"4K": PageSize.SIZE_4K, "2M": PageSize.SIZE_2M, "1G": PageSize.SIZE_1G}[args.size]
    flags = 0
    for name in filter(None, args.leaf_flags.split(",")):
        try:
            flags |= PteFlag[name.strip().upper()]
        except KeyError:
            raise SystemExit(f"refmodel walk: unknown flag {name!r}; flags: {', '.join(f.name or '' for f in PteFlag)}")
    va = 0x7F00_0000_0000 + size.value
    builder.map(va, 0x4000_0000, flags, size)
    mmu = Mmu(mem, ArchState(cr3=builder.cr3, cpl=args.cpl))
    access = Access(AccessKind(args.access), args.cpl)
    print(f"{access.kind.value} of {va + 0x10:#x} at CPL {args.cpl}, CR0.WP=1 EFER.NXE=1")
    out = mmu.translate(va + 0x10, access)
    addrs = out.entry_addrs if isinstance(out, Translation) else ()
    for addr in addrs:
        print(f"  entry at {addr:#014x}: {Entry(mem.read_u64(addr)).describe()}")
    print(f"  -> {out}")
    print(f"  counters: {mmu.counters.as_dict()}")
    return 0
