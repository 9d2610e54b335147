"""The guest's way into Xen: one function per hypercall, each one trap.

A PV guest enters Xen with a ``syscall`` into the hypercall page — not a VM exit
(there is no VMX), and no TLB flush (Xen is mapped in every guest address space).
Each function here counts one :attr:`Event.HYPERCALL`; the requests it carries count
:attr:`Event.HYPERCALL_ENTRY` where Xen processes them. A multicall is one
hypercall however many entries it carries.
"""

from collections.abc import Sequence

from ...account.events import Event
from ..machine import DOMID_SELF
from .abi import BatchResult, MmuextOp, MmuUpdate, MulticallEntry, MulticallResult
from .mmu_update import do_mmu_update
from .mmuext import do_mmuext_op
from .multicall import do_multicall
from .update_va_mapping import do_update_va_mapping, do_update_va_mapping_otherdomain
from .vcpu import PvVcpu


def _trap(v: PvVcpu) -> None:
    v.machine.counters.add(Event.HYPERCALL)


def mmu_update(v: PvVcpu, reqs: Sequence[MmuUpdate], foreigndom: int = DOMID_SELF) -> BatchResult:
    """``HYPERVISOR_mmu_update(reqs, len(reqs), &done, foreigndom)``."""
    _trap(v)
    return do_mmu_update(v, reqs, len(reqs), foreigndom)


def mmuext_op(v: PvVcpu, ops: Sequence[MmuextOp], foreigndom: int = DOMID_SELF) -> BatchResult:
    """``HYPERVISOR_mmuext_op(ops, len(ops), &done, foreigndom)``."""
    _trap(v)
    return do_mmuext_op(v, ops, len(ops), foreigndom)


def update_va_mapping(v: PvVcpu, va: int, val: int, flags: int) -> int:
    """``HYPERVISOR_update_va_mapping(va, val, flags)``."""
    _trap(v)
    return do_update_va_mapping(v, va, val, flags)


def update_va_mapping_otherdomain(v: PvVcpu, va: int, val: int, flags: int, domid: int) -> int:
    """``HYPERVISOR_update_va_mapping_otherdomain(va, val, flags, domid)``."""
    _trap(v)
    return do_update_va_mapping_otherdomain(v, va, val, flags, domid)


def multicall(v: PvVcpu, entries: Sequence[MulticallEntry]) -> MulticallResult:
    """``HYPERVISOR_multicall(entries, len(entries))``."""
    _trap(v)
    return do_multicall(v, entries, len(entries))
