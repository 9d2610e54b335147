"""The one exception type for a *user's* mistake.

Architectural outcomes (a #PF with its error code, a #GP, Xen's -EINVAL) are values
returned by the model, never exceptions. :class:`RefmodelError` is raised only when
the caller asks for something the model does not define — a malformed trace, an
address out of range, an argument of the wrong shape — and its message names what
is wrong.
"""


class RefmodelError(ValueError):
    """A request the model cannot carry out because the request itself is wrong."""


class UsageError(RefmodelError):
    """A command line the program cannot run: an unknown option, a missing argument,
    a value outside its range. ``prog`` names the command whose usage was wrong
    (``refmodel walk``); the command line reports it as one line and exit code 2."""

    def __init__(self, message: str, prog: str = "refmodel") -> None:
        super().__init__(message)
        self.prog = prog
