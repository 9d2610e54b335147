"""``refmodel check TRACE``: compare the observations recorded in a trace with the
model. Exit status 0 when every one is allowed, 1 at the first divergence (reported
with its operation index, line and context), 2 for a malformed trace or one with no
observation at all (checking nothing must not look like a pass)."""

import argparse
import json

from ..errors import RefmodelError
from ..oracle.check import check
from ..oracle.trace import load_trace, op_json
from .options import input_file


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("check", help="check a trace's recorded observations against the model (exit 1 on divergence)")
    p.add_argument("trace", type=input_file, help="a refmodel trace with recorded observations (docs/oracle.md); "
                   "- for standard input")
    p.add_argument("--json", action="store_true", help="report as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    trace = load_trace(args.trace)
    if not any(step.obs is not None for step in trace.steps):
        raise RefmodelError(
            f"{trace.source}: no operation has a recorded observation, so there is nothing to check "
            "(record one per operation; `refmodel replay --annotate` writes the model's)"
        )
    result = check(trace)
    if args.json:
        report: dict[str, object] = {
            "clean": result.clean, "operations": result.operations, "compared": result.compared,
            "max_states": result.max_states, "truncated": result.truncated,
        }
        d = result.divergence
        if d is not None:
            report["divergence"] = {
                "index": d.index, "line": d.step.line, "op": op_json(d.step.op),
                "recorded": d.recorded.to_json(),
                "allowed": [{"obs": obs.to_json(), "how": how} for obs, how in d.allowed],
            }
        print(json.dumps(report))
    else:
        print(result.summary())
    return 0 if result.clean else 1
