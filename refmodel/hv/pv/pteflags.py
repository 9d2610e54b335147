"""Which entry bits a PV guest may set, and which changes need re-validation
(xen/arch/x86/mm.c, xen/arch/x86/include/asm/page.h and x86_64/page.h).

Xen works on "24-bit flags": ``get_pte_flags`` folds pte bits 63:52 into flag bits
23:12 next to pte bits 11:0. The masks below are the same rules written in pte bit
positions, so that they apply directly to an entry value:

- ``base_disallow_mask`` (``arch_init_memory``) allows P, RW, US, A, D, AVAIL (9-11),
  AVAIL_HIGH (pte 52-62) and NX (pte 63) — nothing else — in L2, L3 and L4 entries:
  PSE (bit 7), G, PWT and PCD are refused there;
- ``L1_DISALLOW_MASK`` additionally allows G in an L1 entry, and ``l1_disallow_mask``
  allows the cache attributes PWT, PCD and PAT (bit 7) only to a domain with
  cache-flush (I/O) permission. ``_PAGE_GNTTAB`` is a debug-build check, 0 in a
  release build, which is what the model follows;
- the fast paths of ``mod_l1_entry`` and ``mod_l[234]_entry`` skip re-validation when
  ``l1e_has_changed(old, new, ~FASTPATH_FLAG_WHITELIST)`` is false: the address bits
  and every flag outside the whitelist are unchanged.
"""

from ...arch.pte import PteFlag

#: pte bits 11:0 and 63:52: everything ``get_pte_flags`` keeps.
PTE_FLAG_BITS = 0xFFF | (0xFFF << 52)
#: ``PADDR_MASK & PAGE_MASK``: the address bits 51:12 of an entry.
PTE_ADDR_BITS = ((1 << 52) - 1) & ~0xFFF

AVAIL = 0x7 << 9  #: ``_PAGE_AVAIL``: bits 11:9
AVAIL_HIGH = 0x7FF << 52  #: ``_PAGE_AVAIL_HIGH``: pte bits 62:52 (flag bits 22:12)
NX = 1 << 63  #: ``_PAGE_NX_BIT``: pte bit 63 (flag bit 23)
#: ``PAGE_CACHE_ATTRS = _PAGE_PAT | _PAGE_PCD | _PAGE_PWT`` (PAT is bit 7 in an L1 entry).
CACHE_ATTRS = int(PteFlag.PS | PteFlag.PCD | PteFlag.PWT)

#: The flags ``arch_init_memory`` lets a guest use: "PRESENT, R/W, USER, A/D,
#: AVAIL[0,1,2], AVAIL_HIGH, NX".
BASE_ALLOWED = int(PteFlag.P | PteFlag.RW | PteFlag.US | PteFlag.A | PteFlag.D) | AVAIL | AVAIL_HIGH | NX

#: ``L2_DISALLOW_MASK``, ``l3_disallow_mask`` (64-bit guest), ``L4_DISALLOW_MASK``.
UPPER_DISALLOW_MASK = PTE_FLAG_BITS & ~BASE_ALLOWED


def l1_disallow_mask(cache_flush_permitted: bool) -> int:
    """``l1_disallow_mask(d)``: ``L1_DISALLOW_MASK`` (base, but G allowed), with the
    cache attributes allowed too for a domain that may flush caches."""
    mask = UPPER_DISALLOW_MASK & ~int(PteFlag.G)
    if cache_flush_permitted:
        mask &= ~CACHE_ATTRS
    return mask


#: ``FASTPATH_FLAG_WHITELIST``: "PTE flags that a guest may change without
#: re-validating the PTE" — NX, AVAIL_HIGH, AVAIL, G, D, A, US. RW and P are not in it.
FASTPATH_FLAG_WHITELIST = NX | AVAIL_HIGH | AVAIL | int(PteFlag.G | PteFlag.D | PteFlag.A | PteFlag.US)
#: ``FASTPATH_PDE_FLAG_WHITELIST``: the same list for L2-L4 entries when
#: CONFIG_PV_LINEAR_PT=y (the default), so an RW change re-validates there too.
FASTPATH_PDE_FLAG_WHITELIST = FASTPATH_FLAG_WHITELIST


def entry_has_changed(old: int, new: int, whitelist: int) -> bool:
    """``lNe_has_changed(old, new, ~whitelist)``: the frame, or a flag outside
    ``whitelist``, differs."""
    return bool((old ^ new) & (PTE_ADDR_BITS | (PTE_FLAG_BITS & ~whitelist)))


def entry_mfn(entry: int) -> int:
    """``lNe_get_pfn``: the machine frame number in bits 51:12."""
    return (entry & PTE_ADDR_BITS) >> 12


def present(entry: int) -> bool:
    return bool(entry & PteFlag.P)
