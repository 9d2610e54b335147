"""The one exception type for a *user's* mistake.

Architectural outcomes (a #PF with its error code, a #GP, Xen's -EINVAL) are values
returned by the model, never exceptions. :class:`RefmodelError` is raised only when
the caller asks for something the model does not define — a malformed trace, an
address out of range, an argument of the wrong shape — and its message names what
is wrong.
"""


class RefmodelError(ValueError):
    """A request the model cannot carry out because the request itself is wrong."""
