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
- :mod:`.ept` — :func:`translate_nested_batch` / :func:`translate_nested`: the
  two-dimensional walk of a guest on EPT (SDM Vol. 3C 29.3) for N guest-linear
  addresses: machine addresses, combined page sizes, guest #PF, EPT violation (with
  its qualification) or misconfiguration, the guest and EPT references of every
  walk (24 for a cold 4 + 4-level walk), and the guest A/D updates of N sequential
  :func:`refmodel.hv.hap.nested.nested_walk` calls; :func:`ept_walk_batch` is the
  one-dimensional EPT walk. Its docstring extends the order argument to two
  dimensions and names the one order dependence EPT adds (an A/D update is an EPT
  data write, refused for some paths to an entry and not for others); such
  batches, and guest writes into EPT tables, run on the slow path, and say so.
- :mod:`.mmu_update` — :func:`mmu_update_batch` / :func:`do_mmu_update_fast`: Xen's
  ``mmu_update`` on a request list, equal to
  :func:`refmodel.hv.pv.mmu_update.do_mmu_update` in (rc, done) and in every bit of
  state it leaves. Checks no request can change (command, XSM, frame owners) are one
  array pass over the list; runs of L1 updates are screened and applied as array
  passes (first failing request found, prefix applied); L2-L4 updates and the few
  other order-sensitive requests go through the slow path's ``mmu_update_one``.
- :mod:`.bench` — the ``refmodel bench`` measurement (slow vs fast vs unicorn).
"""

from .ept import NestedBatchResult, ept_walk_batch, nested_structure_frames, translate_nested, translate_nested_batch
from .mmu_update import FastBatchResult, do_mmu_update_fast, mmu_update_batch
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
    "FastBatchResult",
    "FrameSnapshot",
    "NestedBatchResult",
    "TlbFills",
    "TlbLookups",
    "denial_codes",
    "do_mmu_update_fast",
    "ept_walk_batch",
    "kind_codes",
    "mmu_update_batch",
    "nested_structure_frames",
    "paging_structure_frames",
    "translate",
    "translate_batch",
    "translate_nested",
    "translate_nested_batch",
]
