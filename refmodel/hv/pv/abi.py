"""Xen's public PV memory-management ABI, as xen/include/public/xen.h defines it:
hypercall numbers, the mmu_update / mmuext_op / update_va_mapping commands, and the
three request structures.

The structures are values (frozen dataclasses). Where Xen passes a pointer to a guest
array (``XEN_GUEST_HANDLE``) the model passes the array itself, as a tuple; the
``count`` argument of a hypercall still says how many elements Xen reads, so a count
larger than the array is a fault on the missing elements (-EFAULT), as in Xen.
"""

import enum
from dataclasses import dataclass
from typing import Union

from ...arch.types import U64_MASK
from ...errors import RefmodelError
from ..machine import DOMID_COW, DOMID_INVALID, DOMID_IO, DOMID_SELF, DOMID_XEN


class Hypercall(enum.IntEnum):
    """Hypercall numbers (xen.h, ``__HYPERVISOR_*``)."""

    MMU_UPDATE = 1
    MULTICALL = 13
    UPDATE_VA_MAPPING = 14
    UPDATE_VA_MAPPING_OTHERDOMAIN = 22
    MMUEXT_OP = 26


class MmuCmd(enum.IntEnum):
    """``mmu_update`` commands, in the low bits of ``ptr`` (xen.h ``MMU_*``)."""

    NORMAL_PT_UPDATE = 0  #: checked ``*ptr = val``; ptr is a machine address
    MACHPHYS_UPDATE = 1  #: M2P[ptr >> 12] = val
    PT_UPDATE_PRESERVE_AD = 2  #: atomically ``*ptr = val | (*ptr & (A|D))``
    PT_UPDATE_NO_TRANSLATE = 3  #: as NORMAL; val never translated (same for a PV guest)


#: do_mmu_update masks the command with ``sizeof(l1_pgentry_t) - 1`` (xen/arch/x86/mm.c),
#: so commands 4..7 exist as encodings and are refused with -ENOSYS.
MMU_CMD_MASK = 7


class MmuextCmd(enum.IntEnum):
    """``mmuext_op`` commands (xen.h ``MMUEXT_*``). 14 is unassigned."""

    PIN_L1_TABLE = 0
    PIN_L2_TABLE = 1
    PIN_L3_TABLE = 2
    PIN_L4_TABLE = 3
    UNPIN_TABLE = 4
    NEW_BASEPTR = 5
    TLB_FLUSH_LOCAL = 6
    INVLPG_LOCAL = 7
    TLB_FLUSH_MULTI = 8
    INVLPG_MULTI = 9
    TLB_FLUSH_ALL = 10
    INVLPG_ALL = 11
    FLUSH_CACHE = 12
    SET_LDT = 13
    NEW_USER_BASEPTR = 15
    CLEAR_PAGE = 16
    COPY_PAGE = 17
    FLUSH_CACHE_GLOBAL = 18
    MARK_SUPER = 19
    UNMARK_SUPER = 20


class Uvmf(enum.IntEnum):
    """``update_va_mapping`` flags (xen.h ``UVMF_*``). The flush type is ``flags & 3``;
    the rest says where: ``UVMF_LOCAL`` (0, also spelt ``UVMF_MULTI`` with a NULL
    bitmap), ``UVMF_ALL`` (4), or else a pointer to a vCPU bitmap. Being an IntEnum,
    ``Uvmf.LOCAL`` and ``Uvmf.MULTI`` are aliases of ``Uvmf.NONE`` (all 0)."""

    NONE = 0  #: no flush
    TLB_FLUSH = 1  #: flush the entire TLB(s)
    INVLPG = 2  #: flush only the entry for ``va``
    FLUSHTYPE_MASK = 3
    MULTI = 0  #: flush a subset of TLBs (OR in a bitmap pointer)
    LOCAL = 0  #: flush the local TLB
    ALL = 4  #: flush every TLB the domain may be using


class Domid(enum.IntEnum):
    """Special domain ids (xen.h ``DOMID_*``); the same numbers as
    :mod:`refmodel.hv.machine` uses."""

    SELF = DOMID_SELF
    IO = DOMID_IO
    XEN = DOMID_XEN
    COW = DOMID_COW
    INVALID = DOMID_INVALID


def domid_t(value: int) -> int:
    """A hypercall argument declared ``domid_t`` (``uint16_t``, xen.h) or passed to
    a ``domid_t`` parameter: C keeps its low 16 bits."""
    return value & 0xFFFF


def _check_u64(name: str, value: int) -> None:
    if not 0 <= value <= U64_MASK:
        raise RefmodelError(f"{name} {value:#x} is not a 64-bit unsigned value")


@dataclass(frozen=True)
class MmuUpdate:
    """``struct mmu_update { uint64_t ptr; uint64_t val; }``: ``ptr & 7`` is the
    command, ``ptr & ~7`` the machine address of the entry (or of the frame, for
    MMU_MACHPHYS_UPDATE)."""

    ptr: int
    val: int

    def __post_init__(self) -> None:
        _check_u64("mmu_update.ptr", self.ptr)
        _check_u64("mmu_update.val", self.val)

    @property
    def cmd(self) -> int:
        return self.ptr & MMU_CMD_MASK

    @property
    def maddr(self) -> int:
        """The machine address the command applies to (``ptr - cmd``)."""
        return self.ptr & ~MMU_CMD_MASK

    @staticmethod
    def pt_update(entry_maddr: int, val: int, cmd: MmuCmd = MmuCmd.NORMAL_PT_UPDATE) -> "MmuUpdate":
        """A request to set the page-table entry at machine address ``entry_maddr``."""
        if entry_maddr % 8:
            raise RefmodelError(f"entry address {entry_maddr:#x} is not 8-byte aligned")
        return MmuUpdate(entry_maddr | int(cmd), val)


@dataclass(frozen=True)
class MmuextOp:
    """``struct mmuext_op { cmd; arg1 (mfn | linear_addr); arg2 (nr_ents | vcpumask |
    src_mfn) }``. A vcpumask is a guest-virtual pointer to a bitmap, read by Xen
    through the guest's page tables."""

    cmd: int
    arg1: int = 0
    arg2: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.cmd < 1 << 32:
            raise RefmodelError(f"mmuext_op.cmd {self.cmd} is not a 32-bit unsigned value")
        _check_u64("mmuext_op.arg1", self.arg1)
        _check_u64("mmuext_op.arg2", self.arg2)


#: What a multicall argument may be: a number, or a guest array (a tuple) of requests.
MulticallArg = Union[int, tuple["MmuUpdate", ...], tuple["MmuextOp", ...], tuple["MulticallEntry", ...]]

#: ``struct multicall_entry`` has six argument slots (Xen reads five).
MULTICALL_ARGS = 6


@dataclass(frozen=True)
class MulticallEntry:
    """``struct multicall_entry { op; result; args[6]; }`` (xen.h). ``do_multicall``
    returns a copy of each entry with ``result`` set to the sub-call's return."""

    op: int
    result: int = 0
    args: tuple[MulticallArg, ...] = ()

    def __post_init__(self) -> None:
        if len(self.args) > MULTICALL_ARGS:
            raise RefmodelError(f"a multicall entry has {MULTICALL_ARGS} argument slots, got {len(self.args)}")


@dataclass(frozen=True)
class BatchResult:
    """What ``mmu_update`` and ``mmuext_op`` give back: the return value (0 or the
    first error) and ``*pdone``, the number of requests completed."""

    rc: int
    done: int


@dataclass(frozen=True)
class MulticallResult:
    """What ``multicall`` gives back: its own return (0 unless the call list itself
    could not be read) and the entries with their ``result`` fields filled in."""

    rc: int
    entries: tuple[MulticallEntry, ...]
