"""Translation throughput: the slow path, the fast path and unicorn, in one run.

One address space (4 KiB pages over 32 MiB, sixteen 2 MiB pages, one 1 GiB page
of which the first 16 MiB are used) and N random 8-byte-aligned addresses in it
(60 % / 25 % / 15 %). Each engine translates the same N addresses as data reads
at CPL 0, starting from the same page tables with every A flag clear:

* slow    — :func:`refmodel.arch.is_canonical` + :func:`refmodel.arch.walk.walk`,
  one address after another (no TLB);
* fast    — :func:`refmodel.fast.translate`: snapshot of the paging structures,
  batch walk, A/D write-back (everything the N walks do);
* unicorn — an x86-64 loop of N loads (``mov rax, [rsi]; add rdx, [rax]``) on
  unicorn's QEMU softmmu with the same page tables; it has a TLB, so this is what
  an emulator does with those loads, not N full walks. Only the loop is timed.
  The sum of the loaded values (each 8-byte word of data memory holds its own
  physical address) must equal the sum of the fast path's physical addresses.

unicorn is an optional dependency: without it the bench says so and reports the
other two. Nothing here asserts a speed; the numbers are for the reader.

With ``--ept`` a second table follows: the same guest page tables in
guest-physical memory on an EPT (4 KiB leaves, RWX, write-back: Xen's RAM) and the
same N addresses through the two-dimensional walk — slow =
:func:`refmodel.hv.hap.nested.nested_walk` per address, fast =
:func:`refmodel.fast.ept.translate_nested` — with the memory references per
translation (24 for a 4 KiB guest page: 4 guest + 5 x 4 EPT).
"""

import argparse
import importlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from ..arch.access import Access, AccessKind
from ..arch.builder import PageTableBuilder
from ..arch.physmem import PhysicalMemory
from ..arch.pte import PageSize, PteFlag
from ..arch.types import PAGE_SIZE
from ..arch.walk import PagingContext, Translation, is_canonical, walk
from ..commands.options import int_in, int_list, positive_float
from ..errors import RefmodelError
from ..hv.hap.ept import RWX, Eptp, make_leaf
from ..hv.hap.nested import CombinedTranslation, nested_walk
from ..hv.hap.tables import Ept
from ..hv.machine import Machine
from ..progress import Progress, progress
from .ept import translate_nested
from .translate import translate

MAXPHYADDR = 46
#: (linear base, physical base, page size, number of pages, bytes addressed)
REGION_4K = (0x0000_7F00_0000_0000, 0x0200_0000, PageSize.SIZE_4K, 8192, 32 << 20)
REGION_2M = (0x0000_5500_0000_0000, 0x0400_0000, PageSize.SIZE_2M, 16, 32 << 20)
REGION_1G = (0x0000_6000_0000_0000, 0x4000_0000, PageSize.SIZE_1G, 1, 16 << 20)
REGIONS = (REGION_4K, REGION_2M, REGION_1G)
SHARES = (0.60, 0.25, 0.15)
#: unicorn's own mappings: the address array (2 MiB pages) and the loop's code page
ARRAY_VA, ARRAY_PA = 0x0000_5600_0000_0000, 0x0800_0000
CODE_VA, CODE_PA = 0x0000_5700_0000_0000, 0x0A00_0000
TABLE_FRAMES = range(0x100, 0x1000)  #: page tables live at 1..16 MiB

DEFAULT_SIZES = (10**3, 10**4, 10**5, 10**6)
ACCEPTANCE_N = 10**6
T = TypeVar("T")


@dataclass(frozen=True)
class Space:
    mem: PhysicalMemory
    ctx: PagingContext
    array_pages: int  #: 2 MiB pages mapped for unicorn's address array


def build_space(max_n: int) -> Space:
    """The benchmark's page tables (no data frames: a walk reads only tables)."""
    mem = PhysicalMemory(MAXPHYADDR)
    b = PageTableBuilder(mem, iter(TABLE_FRAMES))
    flags = PteFlag.RW | PteFlag.US
    for va, pa, size, count, _ in REGIONS:
        for i in range(count):
            b.map(va + i * size.value, pa + i * size.value, flags, size)
    array_pages = max(1, -(-max_n * 8 // PageSize.SIZE_2M.value))
    for i in range(array_pages):
        b.map(ARRAY_VA + i * PageSize.SIZE_2M.value, ARRAY_PA + i * PageSize.SIZE_2M.value, flags, PageSize.SIZE_2M)
    b.map(CODE_VA, CODE_PA, flags)
    return Space(mem, PagingContext(cr3=b.cr3, maxphyaddr=MAXPHYADDR), array_pages)


def addresses(n: int, seed: int) -> NDArray[np.uint64]:
    """N random 8-byte-aligned linear addresses spread over the three regions."""
    rng = np.random.default_rng(seed)
    which = rng.choice(len(REGIONS), size=n, p=list(SHARES))
    out = np.empty(n, dtype=np.uint64)
    for r, (va, _, _, _, span) in enumerate(REGIONS):
        sel = which == r
        out[sel] = np.uint64(va) + rng.integers(0, span // 8, size=int(sel.sum()), dtype=np.uint64) * np.uint64(8)
    return out


# -- the three engines ------------------------------------------------------------------


def run_slow(space: Space, vas: list[int]) -> list[int]:
    mem = space.mem.copy()
    access = Access(AccessKind.READ, 0)
    out: list[int] = []
    for va in vas:
        if not is_canonical(va):
            raise RefmodelError(f"bench address {va:#x} is not canonical")
        o = walk(mem, space.ctx, va, access).outcome
        if not isinstance(o, Translation):
            raise RefmodelError(f"bench address {va:#x} faulted in the slow path: {o}")
        out.append(o.pa)
    return out


def run_fast(space: Space, vas: NDArray[np.uint64]) -> NDArray[np.uint64]:
    mem = space.mem.copy()
    r = translate(mem, space.ctx, vas, AccessKind.READ, 0)
    if not bool(r.ok.all()):
        raise RefmodelError("a bench address faulted in the fast path")
    return r.pa


class UnicornLoads:
    """Minimal unicorn driver: the bench's tables and data in physical memory,
    4-level paging on, and a loop of N loads at CPL 0."""

    LOOP = bytes.fromhex(
        "488b06"  # loop: mov rax, [rsi]      ; next address
        "480310"  #       add rdx, [rax]      ; the load being measured
        "4883c608"  #     add rsi, 8
        "48ffc9"  #       dec rcx
        "75f1"  #         jnz loop
    )

    def __init__(self, space: Space) -> None:
        # unicorn's own annotations are partial: use it untyped, as an oracle
        unicorn: Any = importlib.import_module("unicorn")
        x86: Any = importlib.import_module("unicorn.x86_const")
        self._x86 = x86
        uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        uc.ctl_set_cpu_model(x86.UC_CPU_X86_SKYLAKE_SERVER)  # NX, 1 GiB pages
        uc.ctl_set_tlb_mode(unicorn.UC_TLB_CPU)  # translate through the guest's tables
        lo, hi = TABLE_FRAMES.start * PAGE_SIZE, TABLE_FRAMES.stop * PAGE_SIZE
        uc.mem_map(lo, hi - lo)
        for frame in space.mem.populated_frames():
            uc.mem_write(frame * PAGE_SIZE, space.mem.frame_bytes(frame))
        for _, pa, _, _, span in REGIONS:
            uc.mem_map(pa, span)
            uc.mem_write(pa, (np.uint64(pa) + np.arange(0, span, 8, dtype=np.uint64)).astype("<u8").tobytes())
        uc.mem_map(ARRAY_PA, space.array_pages * PageSize.SIZE_2M.value)
        uc.mem_map(CODE_PA, PAGE_SIZE)
        uc.mem_write(CODE_PA, self.LOOP)
        uc.reg_write(x86.UC_X86_REG_CR4, 1 << 5)  # PAE
        uc.msr_write(0xC000_0080, (1 << 8) | (1 << 10) | (1 << 11))  # EFER.LME, LMA, NXE
        uc.reg_write(x86.UC_X86_REG_CR3, space.ctx.cr3)
        uc.reg_write(x86.UC_X86_REG_CR0, (1 << 0) | (1 << 16) | (1 << 31))  # PE, WP, PG
        self.uc = uc
        self.array_bytes = space.array_pages * PageSize.SIZE_2M.value

    def run(self, vas: NDArray[np.uint64]) -> tuple[float, int]:
        """Seconds for the load loop, and the sum of the loaded words (mod 2**64)."""
        n = int(vas.size)
        if n * 8 > self.array_bytes or n == 0:
            raise RefmodelError(f"unicorn bench: N={n} outside 1..{self.array_bytes // 8}")
        x86, uc = self._x86, self.uc
        uc.mem_write(ARRAY_PA, vas.astype("<u8").tobytes())
        uc.reg_write(x86.UC_X86_REG_RSI, ARRAY_VA)
        uc.reg_write(x86.UC_X86_REG_RCX, n)
        uc.reg_write(x86.UC_X86_REG_RDX, 0)
        t0 = time.perf_counter()
        uc.emu_start(CODE_VA, CODE_VA + len(self.LOOP))
        dt = time.perf_counter() - t0
        return dt, int(uc.reg_read(x86.UC_X86_REG_RDX))


def unicorn_available() -> str | None:
    """None if unicorn can be imported, else why not."""
    try:
        importlib.import_module("unicorn")
    except ImportError as err:
        return f"unicorn is not installed ({err}); it is an optional test dependency: pip install unicorn"
    return None


# -- measurement and report ----------------------------------------------------------------


def best_of(repeat: int, fn: Callable[[], T]) -> tuple[float, T]:
    """The shortest of ``repeat`` timed calls, and the last call's result."""
    best = float("inf")
    result: T | None = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    assert result is not None
    return best, result


@dataclass
class Row:
    n: int
    slow_s: float
    slow_extrapolated: bool
    fast_s: float
    unicorn_s: float | None

    def rate(self, seconds: float | None) -> float | None:
        return None if seconds is None else self.n / seconds


def _fmt_rate(r: float | None, mark: str = "") -> str:
    return "—" if r is None else f"{r:,.0f}{mark}"


def _fmt_ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None else f"{a / b:,.1f}x"


def run_bench(
    sizes: Sequence[int], slow_max_n: int, use_unicorn: bool, repeat: int, seed: int, out: Callable[[str], None],
    bar: Progress | None = None,
) -> list[Row]:
    """Measure every size and print the table through ``out``; ``bar`` (if any) is
    told each size as it starts and ends."""
    if not sizes or min(sizes) <= 0:
        raise RefmodelError("bench sizes must be positive")
    max_n = max(sizes)
    space = build_space(max_n)
    why_not = unicorn_available() if use_unicorn else "disabled with --no-unicorn"
    engine: UnicornLoads | None = None
    if why_not is None:
        engine = UnicornLoads(space)
    out(f"refmodel bench: 4-level translation of N random addresses (8-byte reads, CPL 0), seed {seed}")
    out(f"  address space: {REGION_4K[3]} x 4 KiB, {REGION_2M[3]} x 2 MiB, 1 x 1 GiB pages "
        f"({', '.join(f'{s:.0%}' for s in SHARES)} of the addresses)")
    out("  slow = is_canonical + arch.walk.walk per address; fast = fast.translate (snapshot + batch + A/D write-back);")
    out("  unicorn = x86 loop of N loads on QEMU softmmu (has a TLB), loop only")
    out(f"  timings: best of {repeat} for fast and unicorn; slow best of {repeat} below N=100000, else one run")
    if why_not is not None:
        out(f"  unicorn: skipped — {why_not}")
    out("")
    header = f"{'N':>9} {'slow tr/s':>14} {'fast tr/s':>14} {'unicorn ld/s':>14} {'fast/slow':>10} {'fast/unicorn':>13} {'unicorn/slow':>13}"
    out(header)
    rows: list[Row] = []
    slow_per_addr: float | None = None
    for n in sizes:
        if bar is not None:
            bar.doing(f"N={n:,}")
        vas = addresses(n, seed)
        vas_list = [int(v) for v in vas.tolist()]
        fast_pa = run_fast(space, vas)
        if n <= slow_max_n:
            slow_s, slow_pa = best_of(repeat if n < 100_000 else 1, lambda: run_slow(space, vas_list))
            if slow_pa != [int(p) for p in fast_pa.tolist()]:
                raise RefmodelError(f"N={n}: the fast path disagrees with the slow path")
            slow_per_addr = slow_s / n
            extrapolated = False
        else:
            if slow_per_addr is None:
                raise RefmodelError("--slow-max-n is below the smallest N: nothing to extrapolate from")
            slow_s, extrapolated = slow_per_addr * n, True
        fast_s, _ = best_of(repeat, lambda: run_fast(space, vas))
        uni_s: float | None = None
        if engine is not None:
            want = int(fast_pa.sum(dtype=np.uint64))
            times = []
            for _ in range(repeat):
                dt, total = engine.run(vas)
                if total != want:
                    raise RefmodelError(f"N={n}: unicorn loaded sum {total:#x}, the fast path's addresses sum to {want:#x}")
                times.append(dt)
            uni_s = min(times)
        row = Row(n, slow_s, extrapolated, fast_s, uni_s)
        rows.append(row)
        s, f, u = row.rate(slow_s), row.rate(fast_s), row.rate(uni_s)
        out(f"{n:>9} {_fmt_rate(s, '*' if extrapolated else ''):>14} {_fmt_rate(f):>14} {_fmt_rate(u):>14} "
            f"{_fmt_ratio(f, s):>10} {_fmt_ratio(f, u):>13} {_fmt_ratio(u, s):>13}")
        if bar is not None:
            bar.step()
    if any(r.slow_extrapolated for r in rows):
        out(f"  * slow path NOT measured at this N: extrapolated linearly from N={slow_max_n_measured(rows)} (--slow-max-n {slow_max_n})")
    out("  tr/s = translations per second; ld/s = loads per second; slow and fast results were checked equal where measured")
    last = max(rows, key=lambda r: r.n)
    if last.n >= ACCEPTANCE_N:
        verdict = "met" if last.slow_s / last.fast_s >= 100 else "NOT met"
        how = "extrapolated slow path" if last.slow_extrapolated else "measured"
        out(f"  acceptance (fast >= 100x slow at N={ACCEPTANCE_N}): fast/slow = {last.slow_s / last.fast_s:,.1f}x "
            f"at N={last.n} ({how}): {verdict}")
    else:
        out(f"  acceptance (fast >= 100x slow) is judged at N={ACCEPTANCE_N}: not evaluated in this run")
    return rows


def slow_max_n_measured(rows: list[Row]) -> int:
    return max(r.n for r in rows if not r.slow_extrapolated)


# -- the same guest on EPT: the 2-D walk ----------------------------------------------------

#: The bench's EPT maps guest frame g to machine frame g + this (no data frame is
#: ever read, so the machine frames need not exist; the guest tables are copied there).
NESTED_MFN_OFFSET = 1 << 20


@dataclass(frozen=True)
class NestedSpace:
    mem: PhysicalMemory
    eptp: Eptp
    ctx: PagingContext


def build_nested_space() -> NestedSpace:
    """The bench's page tables (without unicorn's mappings) as a guest's, in
    guest-physical memory, on an EPT built by the hypervisor's table editor
    (:class:`refmodel.hv.hap.tables.Ept`) with a 4 KiB leaf for every guest frame the
    tables and the three regions use."""
    guest = PhysicalMemory(MAXPHYADDR)
    b = PageTableBuilder(guest, iter(TABLE_FRAMES))
    flags = PteFlag.RW | PteFlag.US
    gfns: set[int] = set()
    for va, pa, size, count, span in REGIONS:
        for i in range(count):
            b.map(va + i * size.value, pa + i * size.value, flags, size)
        gfns.update(range(pa // PAGE_SIZE, (pa + span) // PAGE_SIZE))
    machine = Machine(nr_frames=2048, hypervisor_frames=1024, maxphyaddr=MAXPHYADDR)
    ept = Ept(machine)
    tables = list(guest.populated_frames())
    for gfn in sorted(gfns | set(tables)):
        ept.write_leaf(gfn, make_leaf(gfn + NESTED_MFN_OFFSET, RWX))
    for gfn in tables:
        machine.mem.load_frame(gfn + NESTED_MFN_OFFSET, guest.frame_bytes(gfn))
    return NestedSpace(machine.mem, ept.eptp, PagingContext(cr3=b.cr3, maxphyaddr=MAXPHYADDR))


def run_nested_slow(space: NestedSpace, vas: list[int]) -> tuple[list[int], int]:
    """Machine addresses and total references of N sequential 2-D walks."""
    mem = space.mem.copy()
    access = Access(AccessKind.READ, 0)
    out: list[int] = []
    refs = 0
    for va in vas:
        if not is_canonical(va):
            raise RefmodelError(f"bench address {va:#x} is not canonical")
        r = nested_walk(mem, space.eptp, space.ctx, va, access)
        if not isinstance(r.outcome, CombinedTranslation):
            raise RefmodelError(f"bench address {va:#x} did not translate in the slow 2-D walk: {r.outcome}")
        out.append(r.outcome.pa)
        refs += r.refs
    return out, refs


def run_nested_fast(space: NestedSpace, vas: NDArray[np.uint64]) -> tuple[NDArray[np.uint64], int]:
    mem = space.mem.copy()
    r = translate_nested(mem, space.eptp, space.ctx, vas, AccessKind.READ, 0)
    if not bool(r.ok.all()) or r.sequential:
        raise RefmodelError("a bench address did not translate in the fast 2-D walk")
    return r.mpa, int(r.refs.sum())


@dataclass
class NestedRow:
    n: int
    slow_s: float
    slow_extrapolated: bool
    fast_s: float
    refs_per_translation: float


def run_nested_bench(
    sizes: Sequence[int], slow_max_n: int, repeat: int, seed: int, out: Callable[[str], None],
    bar: Progress | None = None,
) -> list[NestedRow]:
    """The ``--ept`` table: slow and fast 2-D walks of the same addresses (``bar``
    as for :func:`run_bench`)."""
    if not sizes or min(sizes) <= 0:
        raise RefmodelError("bench sizes must be positive")
    space = build_nested_space()
    out(f"refmodel bench --ept: 2-D translation (guest tables on EPT, 4 KiB EPT leaves) of the same addresses, seed {seed}")
    out("  slow = is_canonical + hv.hap.nested.nested_walk per address; fast = fast.translate_nested "
        "(snapshot + batch + guest A/D write-back)")
    out(f"  timings: best of {repeat} for fast; slow best of {repeat} below N=10000, else one run")
    out("")
    out(f"{'N':>9} {'slow tr/s':>14} {'fast tr/s':>14} {'fast/slow':>10} {'refs/tr':>8}")
    rows: list[NestedRow] = []
    slow_per_addr: float | None = None
    for n in sizes:
        if bar is not None:
            bar.doing(f"2-D, N={n:,}")
        vas = addresses(n, seed)
        fast_pa, fast_refs = run_nested_fast(space, vas)
        if n <= slow_max_n:
            vas_list = [int(v) for v in vas.tolist()]
            slow_s, (slow_pa, slow_refs) = best_of(repeat if n < 10_000 else 1, lambda: run_nested_slow(space, vas_list))
            if slow_pa != [int(p) for p in fast_pa.tolist()] or slow_refs != fast_refs:
                raise RefmodelError(f"N={n}: the fast 2-D walk disagrees with the slow one")
            slow_per_addr, extrapolated = slow_s / n, False
        else:
            if slow_per_addr is None:
                raise RefmodelError("--ept-slow-max-n is below the smallest N: nothing to extrapolate from")
            slow_s, extrapolated = slow_per_addr * n, True
        fast_s, _ = best_of(repeat, lambda: run_nested_fast(space, vas))
        row = NestedRow(n, slow_s, extrapolated, fast_s, fast_refs / n)
        rows.append(row)
        out(f"{n:>9} {_fmt_rate(n / slow_s, '*' if extrapolated else ''):>14} {_fmt_rate(n / fast_s):>14} "
            f"{_fmt_ratio(slow_s, fast_s):>10} {row.refs_per_translation:>8.1f}")
        if bar is not None:
            bar.step()
    if any(r.slow_extrapolated for r in rows):
        out(f"  * slow 2-D walk NOT measured at this N: extrapolated linearly (--ept-slow-max-n {slow_max_n})")
    out("  refs/tr = guest + EPT memory references per translation; slow and fast results and reference counts "
        "were checked equal where measured")
    return rows


#: The largest batch the bench takes: ten times the default's largest, about 1 GB of
#: memory at its peak; beyond it a typing mistake would run for hours.
MAX_N = 10**7
#: At most this many sizes, and this many repetitions, per run.
MAX_SIZES, MAX_REPEAT = 16, 100


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", type=int_list(1, MAX_N, MAX_SIZES), default=",".join(str(n) for n in DEFAULT_SIZES),
                   help=f"comma-separated batch sizes N, each 1..{MAX_N:,} (1e5 is read as 100000; "
                   "default: 1000,10000,100000,1000000)")
    p.add_argument("--slow-max-n", type=int_in(1), default=max(DEFAULT_SIZES), metavar="N",
                   help="measure the slow path up to this N and extrapolate beyond it, marked '*' (default: measure all)")
    p.add_argument("--no-unicorn", action="store_true", help="skip unicorn even if it is installed")
    p.add_argument("--repeat", type=int_in(1, MAX_REPEAT), default=3,
                   help=f"best of this many runs, 1..{MAX_REPEAT} (default 3)")
    p.add_argument("--seed", type=int_in(0, 2**64 - 1), default=1,
                   help="seed of the random addresses, 0..2^64-1 (default 1): the same seed, the same addresses")
    p.add_argument("--require-ratio", type=positive_float, default=None, metavar="RATIO",
                   help="exit 1 unless fast/slow at the largest N is at least this (acceptance: 100)")
    p.add_argument("--ept", action="store_true",
                   help="also measure the 2-D translation (guest tables on EPT): nested_walk vs fast.translate_nested")
    p.add_argument("--ept-slow-max-n", type=int_in(1), default=10**5, metavar="N",
                   help="with --ept: measure the slow 2-D walk up to this N, extrapolate beyond (default 100000)")


def run_from_args(args: argparse.Namespace) -> int:
    sizes: list[int] = args.sizes
    if args.slow_max_n < min(sizes):
        raise RefmodelError(f"--slow-max-n {args.slow_max_n} is below the smallest N ({min(sizes)}): "
                            "nothing to extrapolate the slow path from")
    if args.ept and args.ept_slow_max_n < min(sizes):
        raise RefmodelError(f"--ept-slow-max-n {args.ept_slow_max_n} is below the smallest N ({min(sizes)}): "
                            "nothing to extrapolate the slow 2-D walk from")
    with progress(len(sizes) * (2 if args.ept else 1), "bench", unit="size") as bar:
        rows = run_bench(sizes, args.slow_max_n, not args.no_unicorn, args.repeat, args.seed, bar.print, bar)
        if args.ept:
            bar.print("")
            run_nested_bench(sizes, args.ept_slow_max_n, args.repeat, args.seed, bar.print, bar)
    if args.require_ratio is not None:
        last = rows[-1]
        ratio = last.slow_s / last.fast_s
        if ratio < args.require_ratio:
            print(f"fast/slow = {ratio:.1f}x at N={last.n}: below the required {args.require_ratio:g}x", file=sys.stderr)
            return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_translate", description=__doc__.splitlines()[0] if __doc__ else None)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except RefmodelError as err:
        print(f"bench: error: {err}", file=sys.stderr)
        return 2
