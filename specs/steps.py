"""What a transition is: its inputs, its decision and its effect, as Z3 terms.

A transition is a function of the pre-state and its inputs that yields a
:class:`Step`: the condition under which it succeeds (``ok`` — an architectural
instruction always succeeds; a hypercall may return an error, which leaves the state
unchanged and so preserves every invariant trivially), the post-state on success,
and ``choice``: constraints on inputs that stand for freedom the hardware or Xen
has (which TLB entries a fill evicts, whether Xen flushes more than it must, which
tables a recursive validation newly validates). A proof must hold for every choice
allowed; the Python model makes one of them.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import z3

from .state import State
from .words import Expr


@dataclass(frozen=True)
class Step:
    """One transition applied to one state."""

    ok: Expr
    post: State
    choice: Expr = field(default_factory=lambda: z3.BoolVal(True))


@dataclass(frozen=True)
class Param:
    """An input of a transition: a name and a Z3 sort. ``choice`` marks inputs that
    model nondeterminism (chosen by the implementation, not by the caller)."""

    name: str
    sort: Expr
    choice: bool = False


@dataclass(frozen=True)
class Transition:
    """A named transition: its inputs and its semantics."""

    name: str
    group: str
    params: tuple[Param, ...]
    apply: Callable[[State, dict[str, Expr]], Step]
    #: True for a deliberately broken variant (a negative control)
    broken: bool = False

    @property
    def doc(self) -> str:
        return (self.apply.__doc__ or "").strip()

    def fresh_args(self, tag: str = "arg") -> dict[str, Expr]:
        return {p.name: z3.Const(f"{tag}.{self.name}.{p.name}", p.sort) for p in self.params}
