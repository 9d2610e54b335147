"""``refmodel compare``: the seed question, run.

Runs the same guest workload under native, shadow, shadow with out-of-sync page
tables, PV unbatched, PV batched, HAP (large EPT pages) and HAP with 4 KiB EPT pages;
prints counts, and the estimated cycles split by cause, per mode; checks (not
assumes) that the guest saw the same thing in every mode. ``--guest ad-clear`` runs
a guest that writes its entries with A and D clear (:class:`PteFlavour`).
"""

import argparse

from ..account.costs import CostTable
from ..compare import (
    RunResult, Workload, equivalent, format_causes, format_table, remap_setup, remap_workload, row_for, run_switch,
    run_workload, seed_workload,
)
from ..guest.kernel import PteFlavour
from ..hv.modes import compare_specs as standard_specs
from ..progress import progress
from .options import input_file, int_in, plot_file

MAX_PAGES = 4096
#: The remap scenario needs a new frame per page besides the old one: at most 2048
#: pages fit the guest's 6144 frames.
MAX_REMAP_PAGES = 2048
#: A batch larger than the pages mapped changes nothing: the bound catches typing mistakes.
MAX_BATCH = MAX_PAGES


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("compare", help="one guest workload under every memory-virtualization mode")
    p.add_argument("--pages", type=int_in(1, MAX_PAGES), default=1024,
                   help=f"pages the guest maps, 1..{MAX_PAGES} (default 1024 = 4 MiB)")
    p.add_argument("--batch", type=int_in(1, MAX_BATCH), default=32,
                   help=f"PV requests per hypercall, 1..{MAX_BATCH} (default 32, Linux's MC_BATCH)")
    p.add_argument("--untagged", action="store_true", help="a TLB without VPIDs: every VM exit flushes it")
    p.add_argument("--costs", type=input_file, metavar="FILE",
                   help="JSON file overriding cycle costs per event (- for standard input; see `refmodel costs`)")
    p.add_argument("--plot", type=plot_file, metavar="FILE.png",
                   help="also plot every scenario over its size (1..4096 pages, 1..16 switch rounds) into this "
                   "image (.png, .svg or .pdf; needs matplotlib)")
    p.add_argument("--scenario", choices=["seed", "remap", "switch", "all"], default="all",
                   help="which scenario's tables to print: malloc + touch (seed), remap live pages, "
                   "vCPU switches, or all three (default)")
    p.add_argument(
        "--guest", choices=[f.value for f in PteFlavour], default=PteFlavour.LINUX.value,
        help="which A/D flags the guest writes: linux (default: A in user leaves, D in writable ones, "
        "A and D in table entries) or ad-clear (none: a shadowing hypervisor takes a hidden fault per first touch)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.plot is not None:
        from ..plot import require_matplotlib

        require_matplotlib()  # before the tables and the sweep, not after them
    costs = CostTable.default()
    if args.costs is not None:
        costs = costs.with_overrides(args.costs)
    specs = standard_specs(args.batch, tagged=not args.untagged)
    flavour = PteFlavour(args.guest)
    guest = "" if flavour is PteFlavour.LINUX else f", {flavour.value} guest"
    scenarios: list[tuple[str, Workload, Workload | None]] = []
    if args.scenario in ("seed", "all"):
        scenarios.append((f"malloc {args.pages} pages populated, then write + read each page", seed_workload(args.pages), None))
    if args.scenario in ("remap", "all"):
        n = min(args.pages, MAX_REMAP_PAGES)
        scenarios.append((f"remap {n} live pages (one PTE write + INVLPG each), then read each", remap_workload(n), remap_setup(n)))
    status = 0
    for title, workload, setup in scenarios:
        results = [run_workload(spec, workload, setup, flavour) for spec in specs]
        status |= report(f"{title} ({'untagged' if args.untagged else 'VPID-tagged'} TLB{guest})", results, costs)
    if args.scenario in ("switch", "all"):
        ws = min(args.pages, 256)
        for tagged in (False, True):
            results = [run_switch(spec, ws, flavour=flavour) for spec in standard_specs(args.batch, tagged=tagged)]
            tags = ("VPID/PCID-tagged TLB" if tagged else "untagged TLB: every switch flushes") + guest
            status |= report(f"2 domains x 8 rounds, {ws}-page working sets, a vCPU switch per turn ({tags})", results, costs)
    if args.plot is not None:
        from ..plot import plot, points, sweep_all

        switch_specs = standard_specs(args.batch, tagged=False)
        with progress(points(specs, switch_specs), "plotting", unit="point") as bar:
            swept = sweep_all(specs, switch_specs, costs, flavour=flavour, bar=bar)
        tlb = "untagged" if args.untagged else "VPID-tagged"
        plot(swept, args.plot, f"every scenario, every mode ({tlb} TLB in the first two, PV batch {args.batch}{guest})")
        print(f"plot written to {args.plot}")
    print(f"cycle costs: {costs.generation}; `refmodel costs` lists every figure and its source")
    return status


def report(title: str, results: list[RunResult], costs: CostTable) -> int:
    """Print one scenario's table and the equivalence verdict; 1 if modes differ."""
    print(f"== {title}")
    rows = [row_for(r, costs) for r in results]
    print(format_table(rows))
    print()
    print(format_causes(rows))
    differ = equivalent(results)
    print()
    if differ:
        print(f"guest-visible results DIFFER from native in: {', '.join(differ)}\n")
        return 1
    n = len(results[0].record.observations)
    print(f"guest-visible results identical across all {len(results)} modes ({n} observations checked)\n")
    return 0
