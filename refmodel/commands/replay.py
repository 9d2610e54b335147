"""``refmodel replay TRACE``: the model's observation of every operation of a trace,
as JSON Lines (docs/oracle.md)."""

import argparse

from ..oracle.replay import annotate, replay
from ..oracle.trace import dump_trace, dumps_line, load_trace, op_name
from .options import input_file


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("replay", help="run a trace on the model and print its observations (JSON Lines)")
    p.add_argument("trace", type=input_file, help="a refmodel trace (JSON Lines, docs/oracle.md); - for standard input")
    p.add_argument(
        "--annotate", action="store_true",
        help="print the whole trace with each operation's obs replaced by the model's (a trace that checks clean)",
    )
    p.add_argument("--no-counters", action="store_true", help="leave the model's counters out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    trace = load_trace(args.trace)
    if args.annotate:
        print(dump_trace(annotate(trace, counters=not args.no_counters)), end="")
        return 0
    for index, (step, obs) in enumerate(zip(trace.steps, replay(trace))):
        shown = obs.without_counters() if args.no_counters else obs
        print(dumps_line({"index": index, "line": step.line, "op": op_name(step.op), "obs": shown.to_json()}))
    return 0
