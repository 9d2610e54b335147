"""The hypervisor: domains owning machine frames (:mod:`.machine`), and the ways to
virtualize a guest's memory, each a backend of :class:`refmodel.guest.ops.MmuBackend`:

- :mod:`.native` – no hypervisor, the baseline;
- :mod:`.shadow` – write-protected guest page tables, trap and emulate (with an
  out-of-sync variant);
- :mod:`.pv` – Xen's PV MMU hypercalls (mmu_update, update_va_mapping, mmuext_op,
  multicall) with page types and batching;
- :mod:`.hap` – nested paging (EPT) with VPID-tagged TLBs;

and :mod:`.sched`, vCPU context switches between domains.
"""
