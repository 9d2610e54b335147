"""``refmodel costs``: the cost table with the source of every figure."""

import argparse

from ..account.costs import CostTable
from .options import input_file


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("costs", help="list the cycle cost of every event and its source")
    p.add_argument("--costs", type=input_file, metavar="FILE",
                   help="JSON file overriding figures, as for compare (- for standard input)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    table = CostTable.default()
    if args.costs is not None:
        table = table.with_overrides(args.costs)
    print(f"machine generation: {table.generation}")
    for event, cost in sorted(table.costs.items(), key=lambda kv: kv[0].value):
        flags = " (secondary)" if cost.secondary else ""
        proxy = f" [proxy for {cost.proxy}]" if cost.proxy else ""
        print(f"{event.value:18} {cost.cycles:>9,.0f}  {cost.source}{flags}{proxy}")
    return 0
