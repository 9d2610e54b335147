"""The ``refmodel`` command line.

Subcommands live in :mod:`refmodel.commands`, one module each. A user's mistake
(:class:`~refmodel.errors.RefmodelError`) is printed as one line on stderr with exit
code 2; architectural outcomes are output, not errors.
"""

import argparse
import importlib
import sys
from collections.abc import Sequence

from .errors import RefmodelError

#: Subcommand modules under refmodel.commands, in the order ``--help`` lists them.
COMMANDS: tuple[str, ...] = ("bench", "check", "compare", "costs", "fixtures", "replay", "verify", "walk",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refmodel",
        description="Reference model of x86-64 paging, the TLB and hypervisor memory virtualization.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"refmodel.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except RefmodelError as err:
        print(f"refmodel {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        sys.stderr.close()
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
