"""A minimal guest kernel written once against an abstract MMU interface
(:mod:`.ops`), so the same workload runs under every memory-virtualization mode.

This mirrors how Linux itself is written: its page-table code calls ``set_pte``,
``flush_tlb_page``, ``write_cr3`` and the lazy-MMU hooks, and paravirt-ops decide
whether those are plain stores, trapped stores or Xen hypercalls.
"""
