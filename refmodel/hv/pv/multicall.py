"""``HYPERVISOR_multicall`` and the hypercall table (xen/common/multicall.c,
xen/arch/x86/pv/hypercall.c).

A multicall is one trap into Xen that runs a list of hypercalls. ``do_multicall``
runs every entry in order and stores each sub-call's return in that entry's
``result``; it does **not** stop when a sub-call fails (the caller inspects the
results). A multicall inside a multicall is refused: the inner ``do_multicall``
finds the vCPU already in a multicall ("Multicall reentry is disallowed") and
returns -EINVAL, which lands in that entry's result while the outer call goes on.
An unknown hypercall number returns -ENOSYS.

The arguments of a multicall entry mirror the C calls: ``mmu_update(reqs, count,
pdone, foreigndom)``, ``mmuext_op(ops, count, pdone, foreigndom)``,
``update_va_mapping(va, val, flags)``, ``update_va_mapping_otherdomain(va, val,
flags, domid)``, ``multicall(entries, nr_calls)``; ``pdone`` must be 0 (NULL): the
model has no guest memory to write the count to.

Not modelled: every other hypercall (the model's table answers -ENOSYS where Xen's
``call_handlers_pv64`` has a handler); the end of the multicall at ``iret``
(``arch_do_multicall_call`` returns ``mc_exit``, xen/arch/x86/pv/hypercall.c 125;
xen/common/multicall.c 88); preemption between entries (``hypercall_preempt_check``,
multicall.c 56) and the multicall's continuation.
"""

from collections.abc import Sequence
from dataclasses import replace
from typing import TypeVar

from ...errors import RefmodelError
from ..machine import DOMID_SELF
from .abi import Hypercall, MmuextOp, MmuUpdate, MulticallArg, MulticallEntry, MulticallResult
from .errno import Errno, neg
from .mmu_update import do_mmu_update
from .mmuext import do_mmuext_op
from .update_va_mapping import do_update_va_mapping, do_update_va_mapping_otherdomain
from .vcpu import PvVcpu

T = TypeVar("T")


def do_multicall(v: PvVcpu, entries: Sequence[MulticallEntry], nr_calls: int | None = None) -> MulticallResult:
    """Run ``nr_calls`` entries (all by default); returns the entries with results."""
    nr_calls = len(entries) if nr_calls is None else nr_calls
    if nr_calls < 0:
        raise RefmodelError(f"multicall nr_calls {nr_calls} is negative")
    if v.in_multicall:
        return MulticallResult(neg(Errno.EINVAL), tuple(entries))
    v.in_multicall = True
    done: list[MulticallEntry] = []
    rc = 0
    try:
        for i in range(nr_calls):
            if i >= len(entries):
                rc = neg(Errno.EFAULT)  # __copy_from_guest of an entry past the list
                break
            entry = entries[i]
            done.append(replace(entry, result=dispatch(v, entry.op, entry.args)))
    finally:
        v.in_multicall = False
    return MulticallResult(rc, tuple(done) + tuple(entries[len(done) :]))


def dispatch(v: PvVcpu, op: int, args: tuple[MulticallArg, ...]) -> int:
    """The hypercall table (``call_handlers_pv64``): run hypercall ``op`` and return
    what it returns to the guest."""
    if op == Hypercall.MMU_UPDATE:
        reqs, count, foreigndom = _batch_args("mmu_update", args, MmuUpdate)
        return do_mmu_update(v, reqs, count, foreigndom).rc
    if op == Hypercall.MMUEXT_OP:
        ops, count, foreigndom = _batch_args("mmuext_op", args, MmuextOp)
        return do_mmuext_op(v, ops, count, foreigndom).rc
    if op == Hypercall.UPDATE_VA_MAPPING:
        va, val, flags = _ints("update_va_mapping", args, 3)
        return do_update_va_mapping(v, va, val, flags)
    if op == Hypercall.UPDATE_VA_MAPPING_OTHERDOMAIN:
        va, val, flags, domid = _ints("update_va_mapping_otherdomain", args, 4)
        return do_update_va_mapping_otherdomain(v, va, val, flags, domid)
    if op == Hypercall.MULTICALL:
        calls = _array("multicall", args, MulticallEntry)
        nr = _int_arg("multicall", args, 1, len(calls))
        return do_multicall(v, calls, nr).rc
    return neg(Errno.ENOSYS)


# -- argument shapes (a wrong shape is the caller's mistake) ---------------------------------
def _array(name: str, args: tuple[MulticallArg, ...], kind: type[T]) -> tuple[T, ...]:
    if not args or not isinstance(args[0], tuple) or not all(isinstance(x, kind) for x in args[0]):
        raise RefmodelError(f"{name}: argument 0 must be a tuple of {kind.__name__}")
    return tuple(x for x in args[0] if isinstance(x, kind))


def _int_arg(name: str, args: tuple[MulticallArg, ...], index: int, default: int) -> int:
    if index >= len(args):
        return default
    value = args[index]
    if not isinstance(value, int):
        raise RefmodelError(f"{name}: argument {index} must be an integer")
    return value


def _batch_args(
    name: str, args: tuple[MulticallArg, ...], kind: type[T]
) -> tuple[tuple[T, ...], int, int]:
    """``(array, count, pdone, foreigndom)``; count defaults to the array's length."""
    items = _array(name, args, kind)
    count = _int_arg(name, args, 1, len(items))
    if _int_arg(name, args, 2, 0) != 0:
        raise RefmodelError(f"{name}: pdone must be 0 (NULL) in a multicall entry")
    return items, count, _int_arg(name, args, 3, DOMID_SELF)


def _ints(name: str, args: tuple[MulticallArg, ...], n: int) -> tuple[int, ...]:
    if len(args) != n or not all(isinstance(a, int) for a in args):
        raise RefmodelError(f"{name}: needs {n} integer arguments, got {args!r}")
    return tuple(a for a in args if isinstance(a, int))
