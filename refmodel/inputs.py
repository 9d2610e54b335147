"""Reading the files a user names on the command line.

One rule for every input: ``-`` is standard input, anything else a path; a file
that cannot be read (missing, a directory, no permission) is a
:class:`~refmodel.errors.RefmodelError` naming the file and the reason, and so is
a file larger than the caller's ``limit``.
"""

import os
import sys
from pathlib import Path

from .errors import RefmodelError

#: The name that stands for standard input.
STDIN = "-"


def display_name(path: str | os.PathLike[str]) -> str:
    """How messages name an input: ``<stdin>`` for ``-``, else the path as given
    (quoted if it holds a line break or another unprintable character)."""
    name = os.fspath(path)
    return "<stdin>" if name == STDIN else name if name.isprintable() else repr(name)


def read_input(path: str | os.PathLike[str], what: str, limit: int | None = None) -> bytes:
    """The bytes of ``path`` (standard input for ``-``), at most ``limit`` of them.

    ``what`` names the input in messages ("trace", "cost file")."""
    name = os.fspath(path)
    if name == "":
        raise RefmodelError(f"{what}: an empty string is not a file name (use - for standard input)")
    cap = -1 if limit is None else limit + 1
    try:
        if name == STDIN:
            if sys.stdin is None:
                raise RefmodelError(f"cannot read {what} from standard input: there is none")
            data = sys.stdin.buffer.read(cap)
        else:
            with open(Path(name), "rb") as f:
                data = f.read(cap)
    except OSError as err:
        reason = err.strerror or str(err)
        raise RefmodelError(f"cannot read {what} {display_name(name)}: {reason}") from None
    except ValueError as err:  # a closed or detached standard input
        raise RefmodelError(f"cannot read {what} {display_name(name)}: {err}") from None
    if limit is not None and len(data) > limit:
        raise RefmodelError(f"{what} {display_name(name)} is larger than {limit:,} bytes")
    return data
