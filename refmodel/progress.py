"""Progress of the long commands (``verify`` per proof cell, ``bench`` per size,
``compare --plot`` per plotted point), on stderr and only when stderr is a terminal:
piped or redirected output, CI logs and the tests see nothing of it.

The bar is `tqdm <https://tqdm.github.io>`_'s. Why tqdm rather than rich: it is one
small pure-Python package with no dependencies of its own (rich brings pygments and
markdown-it-py for features this needs none of), its bars go to stderr by default,
and ``disable=None`` is exactly the rule wanted here — draw on a terminal, stay
silent otherwise; it is typed for ``mypy --strict`` by typeshed's ``types-tqdm``.
tqdm's own environment switches apply (``TQDM_DISABLE=1`` turns bars off).
"""

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm


class Progress:
    """A count of finished steps out of ``total``, drawn as a bar on a terminal."""

    def __init__(self, total: int, what: str, unit: str) -> None:
        # sys.stderr is looked up now, not at import: a redirected stderr is honoured
        # every step is drawn (mininterval 0): steps take seconds, not microseconds
        self._bar = tqdm(total=total, desc=what, unit=unit, file=sys.stderr, disable=None, leave=False,
                         dynamic_ncols=True, mininterval=0, miniters=1)

    @property
    def shown(self) -> bool:
        """Whether a bar is drawn (stderr is a terminal)."""
        return not self._bar.disable

    def doing(self, note: str) -> None:
        """Name the step under way (the size being measured ...)."""
        self._bar.set_postfix_str(note)

    def step(self, note: str = "") -> None:
        """One more step done; ``note`` says which (the cell just proved ...)."""
        if note:
            self._bar.set_postfix_str(note, refresh=False)
        self._bar.update(1)

    def print(self, line: str) -> None:
        """Print ``line`` on stdout without tearing the bar."""
        if self.shown:
            self._bar.write(line, file=sys.stdout)
        else:
            print(line)

    def close(self) -> None:
        self._bar.close()


@contextmanager
def progress(total: int, what: str, unit: str = "step") -> Iterator[Progress]:
    """A :class:`Progress` for the ``with`` block, removed from the terminal after it."""
    bar = Progress(total, what, unit)
    try:
        yield bar
    finally:
        bar.close()

