"""vCPU transitions: a context switch on the one physical CPU, and a guest writing
one of its own registers. The Python counterpart is
:class:`refmodel.hv.sched.Scheduler` (Xen ``context_switch`` in
xen/arch/x86/domain.c: ``__context_switch`` saves the outgoing vCPU's whole register
state and loads the incoming one's).
"""

import z3

from . import words as w
from .state import State, with_fields
from .steps import Param, Step, Transition


def context_switch(s: State, a: dict[str, w.Expr]) -> Step:
    """Deschedule the running vCPU and run ``vcpu``: save the physical register
    file into the outgoing vCPU's save area, load the incoming vCPU's, and — unless
    the TLB is tagged (VPIDs keep the vCPUs' entries apart) — flush the whole TLB.
    Switching to the running vCPU is a no-op."""
    v = a["vcpu"]
    post = with_fields(
        s,
        saved=z3.Store(s.saved, s.cur, s.regs),
        regs=s.saved[v],
        cur=v,
        tlb_valid=z3.If(s.tagged, s.tlb_valid, z3.K(w.SlotS, z3.BoolVal(False))),
    )
    return Step(ok=v != s.cur, post=post)


def reg_write(s: State, a: dict[str, w.Expr]) -> Step:
    """The running vCPU writes ``value`` to register ``reg``: the physical
    register file changes, and so does what this vCPU must see later."""
    r, value = a["reg"], a["value"]
    post = with_fields(
        s,
        regs=z3.Store(s.regs, r, value),
        ghost=z3.Store(s.ghost, s.cur, z3.Store(s.ghost[s.cur], r, value)),
    )
    return Step(ok=z3.BoolVal(True), post=post)


TRANSITIONS: tuple[Transition, ...] = (
    Transition("context_switch", "vcpu", (Param("vcpu", w.VcpuS),), context_switch),
    Transition("reg_write", "vcpu", (Param("reg", w.RegS), Param("value", w.Word)), reg_write),
)
