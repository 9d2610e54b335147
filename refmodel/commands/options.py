"""Argument types for the subcommands' parsers: each converts one command-line
value or rejects it with a message argparse turns into ``argument --x: <message>``
(one line, exit code 2 — see :mod:`refmodel.cli`). Checking values here, at parse
time, means a mistake is reported before any long work starts.
"""

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path


def _shown(text: str) -> str:
    """A user's value quoted for a message, shortened to stay on one line."""
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {_shown(text)}") from None


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An integer in ``low..high`` (no upper bound if ``high`` is None)."""

    def convert(text: str) -> int:
        value = _parse_int(text)
        if value < low or (high is not None and value > high):
            bound = f"at least {low}" if high is None else f"in {low}..{high}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {_shown(text)}")
        return value

    convert.__name__ = "integer"  # argparse names the type in its own messages
    return convert


def positive_float(text: str) -> float:
    """A finite number greater than zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {_shown(text)}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {_shown(text)}")
    return value


def int_list(low: int, high: int, most: int) -> Callable[[str], list[int]]:
    """A comma-separated list of at most ``most`` integers, each in ``low..high``
    (``1e5`` is accepted for 100000, ``1.5`` is not)."""

    def convert(text: str) -> list[int]:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of numbers, got {_shown(text)}")
        if len(parts) > most:
            raise argparse.ArgumentTypeError(f"at most {most} values, got {len(parts)}")
        values = []
        for part in parts:
            try:
                number = float(part)
            except ValueError:
                raise argparse.ArgumentTypeError(f"not a list of numbers: {_shown(text)}") from None
            if not math.isfinite(number) or number != int(number):
                raise argparse.ArgumentTypeError(f"not a whole number: {_shown(part)}")
            if not low <= number <= high:
                raise argparse.ArgumentTypeError(f"each value must be in {low}..{high:,}, got {_shown(part)}")
            values.append(int(number))
        return values

    convert.__name__ = "list"
    return convert


def input_file(text: str) -> str:
    """A file to read, or ``-`` for standard input. Only the name is checked here
    (reading reports the rest: missing, a directory, no permission)."""
    if text == "":
        raise argparse.ArgumentTypeError("an empty string is not a file name (use - for standard input)")
    return text


def output_dir(text: str) -> Path:
    """A directory to write into (created if missing): not empty, not an existing
    file, and under a parent that is a directory."""
    if text.strip() == "":
        raise argparse.ArgumentTypeError("needs a directory name (an empty string would write into the current one)")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{_shown(text)} exists and is not a directory")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"{_shown(str(parent))} is not a directory")
            break
    return path


#: File types ``compare --plot`` writes (matplotlib chooses the format by suffix).
PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def plot_file(text: str) -> Path:
    """An image file to write: a name ending in .png, .svg or .pdf, not an existing
    directory, in a directory that exists."""
    path = Path(text)
    if text.strip() == "" or path.is_dir():
        raise argparse.ArgumentTypeError(f"{_shown(text)} is a directory; name the image file, e.g. plot.png")
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise argparse.ArgumentTypeError(
            f"the file name must end in {', '.join(PLOT_SUFFIXES[:-1])} or {PLOT_SUFFIXES[-1]} (the image format), "
            f"got {_shown(text)}"
        )
    parent = path.absolute().parent
    if not parent.is_dir():
        why = "is not a directory" if parent.exists() else "does not exist"
        raise argparse.ArgumentTypeError(f"cannot write {_shown(text)}: the directory {_shown(str(parent))} {why}")
    if not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {_shown(text)}: no permission in {_shown(str(parent))}")
    return path
