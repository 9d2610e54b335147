"""The vectorized fast path: numpy batch versions of the slow path in
:mod:`refmodel.arch`, each *defined* as equal to a sequence of slow-path calls and
checked against it by differential tests (``tests/test_fast_*.py``).

- :mod:`.snapshot` — :class:`FrameSnapshot`: the frames a batch reads, as a dense
  ``(F + 1, 512)`` uint64 array with a frame-number -> row map; A/D updates are
  written back with :meth:`FrameSnapshot.write_back`.
- :mod:`.translate` — :func:`translate_batch` / :func:`translate`: 4-level
  translation of N linear addresses of one address space (one
  :class:`~refmodel.arch.walk.PagingContext`; access kind, CPL and the implicit
  flag per batch or per address): physical addresses, page sizes, rights, #PF
  (CR2, error code, cause) or #GP, entries read, and the A/D updates of N
  sequential :func:`refmodel.arch.walk.walk` calls (no TLB). Its module docstring
  gives the argument why walks may be batched in any order, and the one output
  (the D flag a translation reports) that needs a prefix computation.
- :mod:`.tlb` — :class:`BatchTlb`: a numpy TLB whose :meth:`~BatchTlb.lookup_batch`
  and :meth:`~BatchTlb.fill_batch` equal N sequential
  :meth:`refmodel.arch.tlb.Tlb.lookup` / :meth:`~refmodel.arch.tlb.Tlb.fill` calls
  (LRU included); its docstring says what is vectorized and why an interleaved
  lookup/fill stream is not.
- :mod:`.bench` — the ``refmodel bench`` measurement (slow vs fast vs unicorn).

TODO (issue 6, once :mod:`refmodel.hv` exists):

- a batch EPT two-dimensional translation (guest walk whose every entry address
  is itself translated through the EPT, SDM Vol. 3C 29.3) that also returns the
  per-address reference counts (guest refs, EPT refs: up to 24 for 4+4 levels),
  checked against the hypervisor's slow nested walk;
- a batch ``mmu_update`` validation with Xen's semantics: requests are processed
  in order and processing stops at the first failing request (the count done is
  returned), so the batch must find the first error index and apply exactly the
  prefix before it.
"""

from .snapshot import FrameSnapshot, paging_structure_frames
from .tlb import BatchTlb, TlbFills, TlbLookups
from .translate import (
    KIND_FETCH,
    KIND_READ,
    KIND_WRITE,
    BatchResult,
    denial_codes,
    kind_codes,
    translate,
    translate_batch,
)

__all__ = [
    "KIND_FETCH",
    "KIND_READ",
    "KIND_WRITE",
    "BatchResult",
    "BatchTlb",
    "FrameSnapshot",
    "TlbFills",
    "TlbLookups",
    "denial_codes",
    "kind_codes",
    "paging_structure_frames",
    "translate",
    "translate_batch",
]
