"""The bits Xen adds to a 64-bit PV guest's present entries as it stores or validates
them (``adjust_guest_l1e`` .. ``adjust_guest_l4e``, xen/arch/x86/pv/mm.h 89-161).

A 64-bit PV kernel runs in ring 3, so every mapping it uses must carry the user bit;
Xen adds it, and tells the guest's kernel pages from its user pages by the
software bit ``_PAGE_GUEST_KERNEL`` (pte bit 52, flag bit 12 in Xen's 24-bit flags,
asm/x86_64/page.h 142):

- L1: an entry without U is a kernel mapping: Xen adds U and ``_PAGE_GUEST_KERNEL``;
  an entry that then lacks ``_PAGE_GUEST_KERNEL`` is a user mapping: Xen adds G and U,
  so user pages survive the guest's kernel/user page-table switches. (A kernel
  mapping with G set only earns a warning; Xen keeps G.)
- L2 and L3: U. L4: A and U ("we cannot efficiently sync access bit updates from
  hardware ... back into the guest view").

Non-present entries are left alone. Xen applies these in ``mod_l1_entry`` before its
fast-path comparison (xen/arch/x86/mm.c 2201), in ``mod_l2_entry`` .. ``mod_l4_entry``
(2281, 2343, 2405) and to each entry ``promote_l1_table`` .. ``promote_l4_table``
validate (1359, 1503, 1588, 1824). The 32-bit PV variants (RW on L3, no U on L4,
``unadjust_guest_l3e``) are not modelled: the model's PV guests are 64-bit.
"""

from ...arch.pte import Level, PteFlag

#: ``_PAGE_GUEST_KERNEL``: flag bit 12 of Xen's 24-bit flags, pte bit 52.
GUEST_KERNEL = 1 << 52
_P = int(PteFlag.P)
_US = int(PteFlag.US)
_G = int(PteFlag.G)
_A = int(PteFlag.A)


def adjust_guest_l1e(entry: int) -> int:
    """``adjust_guest_l1e``: a kernel mapping (no U) gains U and
    ``_PAGE_GUEST_KERNEL``; a user mapping gains G and U."""
    if not entry & _P:
        return entry
    if not entry & _US:
        entry |= GUEST_KERNEL | _US
    if not entry & GUEST_KERNEL:
        entry |= _G | _US
    return entry


def adjust_guest_upper(entry: int, level: Level) -> int:
    """``adjust_guest_l2e`` / ``_l3e``: U; ``adjust_guest_l4e``: A and U."""
    if not entry & _P:
        return entry
    return entry | _US | (_A if level is Level.L4 else 0)


def adjust_guest_entry(entry: int, level: Level) -> int:
    """The rewrite Xen makes to a present entry of a page table at ``level``."""
    return adjust_guest_l1e(entry) if level is Level.L1 else adjust_guest_upper(entry, level)
