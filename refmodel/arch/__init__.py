"""The architecture: x86-64 4-level paging and the TLB as the Intel SDM Vol. 3A,
chapter 4 ("Paging") defines them.

Read in this order: :mod:`.types` (addresses), :mod:`.pte` (entry formats),
:mod:`.physmem`, :mod:`.control` (CR0/CR4/EFER), :mod:`.walk` (the page walk and
its rules), :mod:`.fault`, :mod:`.tlb`, :mod:`.vcpu`, :mod:`.mmu` (walk + TLB).
"""
