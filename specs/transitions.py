"""Every transition of the model, in table order."""

from . import p2m, pv, shadow, tlb, vcpu
from .steps import Transition

TRANSITIONS: tuple[Transition, ...] = (
    *pv.TRANSITIONS,
    *shadow.TRANSITIONS,
    *p2m.TRANSITIONS,
    *tlb.TRANSITIONS,
    *vcpu.TRANSITIONS,
)


def by_name(name: str) -> Transition:
    for t in TRANSITIONS:
        if t.name == name:
            return t
    raise KeyError(name)
