"""How one guest entry becomes one shadow entry — Xen's ``_sh_propagate``
(xen/arch/x86/mm/shadow/multi.c), reduced to what refmodel models.

A shadow entry is a pure function of the guest entry, the P2M and the hypervisor's
own bookkeeping:

- it is not present unless the guest entry is present, free of reserved bits (SDM
  4.5), backed by the P2M, and has its Accessed flag set — "If the A or D bit has not
  yet been set in the guest, then we must prevent the corresponding kind of access",
  so that the first access faults into the hypervisor, whose walk of the guest tables
  sets A exactly as the processor would natively;
- it copies the guest's R/W, U/S and XD (and G in a leaf), so the hardware combines
  rights over the shadow levels exactly as it would over the guest's (SDM 4.6.1);
- a leaf is writable only if the guest leaf's Dirty flag is already set (the first
  write must fault so the hypervisor sets D in the guest entry), and never if the
  target frame is a guest page table the hypervisor write-protects;
- Xen presets A (and D) in every shadow entry it writes, "to eliminate the burden on
  the hardware to update these bits": the processor never writes a shadow table.

Caching attributes (PWT, PCD, PAT) and the ignored/available bits are not copied.
"""

from ...arch.pte import Level, PteFlag, make_entry
from ...arch.types import MFN, PAGE_SHIFT
from ...arch.walk import PagingContext, reserved_bits

#: Rights an upper-level shadow entry copies from the guest entry.
UPPER_RIGHTS = int(PteFlag.RW | PteFlag.US | PteFlag.XD)
#: Bits a leaf shadow entry copies from the guest leaf (rights and G).
LEAF_COPIED = int(PteFlag.RW | PteFlag.US | PteFlag.XD | PteFlag.G)
#: What Xen's ``perms_strictly_increased`` compares (xen/arch/x86/include/asm/page.h).
PERMISSION_BITS = int(PteFlag.P | PteFlag.RW | PteFlag.US | PteFlag.XD)


def guest_entry_usable(gentry: int, level: Level, ctx: PagingContext) -> bool:
    """Whether the hardware may use a shadow of this guest entry at all: present,
    no reserved bit set (so a walk of the guest tables would not fault on it, SDM
    4.5), and already marked Accessed (SDM 4.8)."""
    return (
        bool(gentry & PteFlag.P)
        and reserved_bits(gentry, level, ctx) == 0
        and bool(gentry & PteFlag.A)
    )


def shadow_upper_entry(gentry: int, child: MFN) -> int:
    """A PML4E/PDPTE/PDE of a shadow table linking the shadow ``child`` of the guest
    table the guest entry references: the guest's rights, A and D preset
    (``_sh_propagate``: "Set the A&D bits for higher level shadows")."""
    flags = (gentry & UPPER_RIGHTS) | int(PteFlag.P | PteFlag.A | PteFlag.D)
    return make_entry(child << PAGE_SHIFT, flags)


def shadow_leaf_entry(gentry: int, target: MFN, write_protect: bool) -> int:
    """A shadow PTE mapping the guest's 4 KiB page ``target`` (its MFN): the guest
    leaf's rights and G; writable only once the guest's D is set and only if the
    target is not a write-protected guest page table ("Protect guest page tables",
    ``_sh_propagate``, level 1). A is preset, and D too whenever writable."""
    flags = (gentry & LEAF_COPIED) | int(PteFlag.P | PteFlag.A)
    if write_protect or not gentry & PteFlag.D:
        flags &= ~int(PteFlag.RW)
    if flags & PteFlag.RW:
        flags |= int(PteFlag.D)
    return make_entry(target << PAGE_SHIFT, flags)


def perms_strictly_increased(old: int, new: int) -> bool:
    """Xen ``perms_strictly_increased`` (asm/page.h): whether ``new`` grants
    everything ``old`` did (P, R/W, U/S, and execute — XD counted inverted). A
    shadow upper-level entry replaced by one that is not a strict increase, or that
    points elsewhere, may leave stale translations in the TLB: Xen's
    ``shadow_set_l{2,3,4}e`` then return SHADOW_SET_FLUSH."""
    of = (old & PERMISSION_BITS) ^ int(PteFlag.XD)
    nf = (new & PERMISSION_BITS) ^ int(PteFlag.XD)
    return (of | (of ^ nf)) == nf

