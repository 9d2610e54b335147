"""The ``refmodel`` command line.

Subcommands live in :mod:`refmodel.commands`, one module each. Exit codes are the
same for every command:

* 0 — the command did what was asked (architectural outcomes such as a #PF are
  output, not errors);
* 1 — a divergence: ``check`` found an observation the model does not allow,
  ``compare`` found modes whose guest-visible results differ, ``verify`` could not
  prove a cell, ``bench --require-ratio`` was not met;
* 2 — a usage or input error: an unknown option, a value out of range, a file that
  cannot be read or parsed. It is reported as exactly one line on stderr,
  ``refmodel <command>: error: <what is wrong>``, never as a traceback, and before
  any long work starts.

Argument values are checked by the parser itself (:mod:`refmodel.commands.options`);
the mistakes only a command can see are :class:`~refmodel.errors.RefmodelError`.
"""

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from . import __version__
from .errors import RefmodelError, UsageError

#: Subcommand modules under refmodel.commands, in the order ``--help`` lists them.
COMMANDS: tuple[str, ...] = ("bench", "check", "compare", "costs", "fixtures", "replay", "verify", "walk",)

#: Exit codes (see the module docstring).
EXIT_OK, EXIT_DIVERGENCE, EXIT_USAGE = 0, 1, 2


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are :class:`UsageError` (one line, exit 2 in
    :func:`main`) instead of argparse's usage text and ``sys.exit(2)``; the
    subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)", prog=self.prog)


def build_parser() -> Parser:
    parser = Parser(
        prog="refmodel",
        description="Reference model of x86-64 paging, the TLB and hypervisor memory virtualization.",
        epilog="exit codes: 0 success, 1 a divergence (check, compare, verify, bench --require-ratio), "
        "2 a usage or input error (one line on stderr). A FILE argument may be - for standard input.",
    )
    parser.add_argument("--version", action="version", version=f"refmodel {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"refmodel.commands.{name}").register(sub)
    for listed in sub._choices_actions:  # `refmodel COMMAND --help` opens with its one-line summary
        command = sub.choices[listed.dest]
        if command.description is None:
            command.description = listed.help
    return parser


def one_line(text: str) -> str:
    """``text`` with its line breaks folded, so that an error is always one line."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except UsageError as err:
        print(f"{err.prog}: error: {one_line(str(err))}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as done:  # --help and --version print and stop here
        return done.code if isinstance(done.code, int) else EXIT_OK
    prog = f"refmodel {args.command}"
    if extra:
        shown = " ".join(arg if arg and arg.isprintable() and " " not in arg else repr(arg) for arg in extra)
        print(f"{prog}: error: unrecognized arguments: {shown} (see {prog} --help)", file=sys.stderr)
        return EXIT_USAGE
    try:
        code: int = args.func(args)
    except RefmodelError as err:
        print(f"{prog}: error: {one_line(str(err))}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
