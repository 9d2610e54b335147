"""Xen's paravirtualized MMU: the guest writes its page tables only through
validated hypercalls, and Xen's page types keep those tables safe.

- :mod:`.abi` — the public ABI: hypercall and command numbers, request structures;
- :mod:`.errno` — the error numbers Xen returns (negated);
- :mod:`.pteflags` — which entry bits a guest may use, and the fast-path whitelist;
- :mod:`.pagetype` — page types, type counts, validation (``get_page_from_lNe``);
- :mod:`.vcpu` — a PV vCPU as Xen sees it;
- :mod:`.mmu_update`, :mod:`.mmuext`, :mod:`.update_va_mapping`, :mod:`.multicall` —
  the hypercalls; :mod:`.hypercall` — the guest's entry points, one trap each;
- :mod:`.backend` — :class:`PvBackend`, the guest kernel's MMU as Linux's Xen
  paravirt-ops implement it, batching updates in lazy MMU mode.
"""

from .abi import (
    BatchResult,
    Domid,
    Hypercall,
    MmuCmd,
    MmuextCmd,
    MmuextOp,
    MmuUpdate,
    MulticallEntry,
    MulticallResult,
    Uvmf,
)
from .backend import PvBackend, PvHypercallFailed
from .errno import Errno, errno_name, neg
from .pagetype import FrameTable, PageState, PageType, PvStat, frame_table_of
from .vcpu import PvVcpu

__all__ = [
    "BatchResult",
    "Domid",
    "Errno",
    "FrameTable",
    "Hypercall",
    "MmuCmd",
    "MmuUpdate",
    "MmuextCmd",
    "MmuextOp",
    "MulticallEntry",
    "MulticallResult",
    "PageState",
    "PageType",
    "PvBackend",
    "PvHypercallFailed",
    "PvStat",
    "PvVcpu",
    "Uvmf",
    "errno_name",
    "frame_table_of",
    "neg",
]
