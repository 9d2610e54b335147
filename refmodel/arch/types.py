"""Typed addresses and frame numbers.

NewTypes keep the address spaces apart at type-check time: a guest-virtual address
(``VA``) can never be passed where a machine-physical one (``MPA``) is expected
without an explicit, reviewable conversion. Names follow Xen:

- ``VA``  – linear (virtual) address, 64 bits, canonical or not.
- ``PA``  – the physical address the paging hardware produces (on bare metal this
  *is* machine memory; under a hypervisor the guest's ``PA`` is a ``GPA``).
- ``GPA`` / ``GFN`` – guest-physical address / guest frame number (Xen: gfn/pfn).
- ``MPA`` / ``MFN`` – machine-physical address / machine frame number.
- ``PCID``, ``VPID`` – TLB tags (SDM 4.10.1, and Vol. 3C 28.1 for VPIDs).
- ``DomId`` – a Xen domain id.
"""

from typing import NewType

VA = NewType("VA", int)
PA = NewType("PA", int)
GPA = NewType("GPA", int)
GFN = NewType("GFN", int)
MPA = NewType("MPA", int)
MFN = NewType("MFN", int)
PCID = NewType("PCID", int)
VPID = NewType("VPID", int)
DomId = NewType("DomId", int)

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
ENTRY_SIZE = 8
ENTRIES_PER_TABLE = 512
U64_MASK = (1 << 64) - 1

#: SDM 4.1.4: MAXPHYADDR is at most 52 on processors with 4-level paging.
MAX_MAXPHYADDR = 52


def frame_of(pa: int) -> int:
    """Frame number of a physical address (``pa >> 12``)."""
    return pa >> PAGE_SHIFT


def frame_base(frame: int) -> int:
    """First byte of a frame (``frame << 12``)."""
    return frame << PAGE_SHIFT


def page_offset(addr: int) -> int:
    """Offset of an address within its 4 KiB page."""
    return addr & (PAGE_SIZE - 1)
