"""``refmodel bench``: translations per second of the slow path, the fast path
(:mod:`refmodel.fast`) and unicorn doing the same loads, for N = 10^3 .. 10^6, and
their ratios — in one run. See :mod:`refmodel.fast.bench` for what is measured.
"""

import argparse

from ..fast.bench import add_arguments, run_from_args


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("bench", help="translation throughput: slow path vs fast path vs unicorn")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return run_from_args(args)
