"""Machine frames, their owners, domains and the P2M / M2P tables.

Xen's model (xen/include/public/xen.h, xen/arch/x86/mm.c): every machine frame
(MFN) belongs to exactly one owner — a domain, or Xen itself (``DOMID_XEN``) — or is
free. Each domain sees "guest frames" (GFNs, Xen's pfns) that its P2M maps to MFNs;
the single M2P table maps each allocated MFN back to its GFN
(``MMU_MACHPHYS_UPDATE`` edits it for PV guests).

Frames are handed out in a deterministic, deliberately scrambled order so that a
GFN is almost never equal to its MFN: a backend that mixes them up fails loudly.
A domain may instead ask to be populated in contiguous, 2 MiB-aligned runs of
machine frames (:meth:`Machine.populate_contiguous`), as Xen's toolstack and KVM's
memory backing try to do so that the hypervisor can map guest memory with large
EPT pages; even then GFN != MFN, since the runs come from wherever free memory is.
"""

import copy
from dataclasses import dataclass, field
from typing import Any

from ..account.events import Counters
from ..arch.physmem import PhysicalMemory
from ..arch.tlb import Tlb
from ..arch.types import GFN, MFN, PAGE_SHIFT, DomId
from ..errors import RefmodelError

#: Special domain ids (xen/include/public/xen.h).
DOMID_SELF = DomId(0x7FF0)
DOMID_IO = DomId(0x7FF1)
DOMID_XEN = DomId(0x7FF2)
DOMID_COW = DomId(0x7FF3)
DOMID_INVALID = DomId(0x7FF4)
#: The first domain id that is not an ordinary domain.
DOMID_FIRST_RESERVED = 0x7FF0
#: Frames in one 2 MiB run: the unit of a contiguous, aligned allocation (Xen's
#: ``SUPERPAGE_ORDER`` 9 extents).
RUN_FRAMES = 512


@dataclass
class Domain:
    """A guest: its id, its P2M, and whether it may map others' frames."""

    domid: DomId
    p2m: dict[GFN, MFN] = field(default_factory=dict)
    privileged: bool = False  #: dom0-like: may name another domain as data owner
    #: ``d->iomem_caps``: the machine frames that are not RAM (I/O memory) the domain
    #: may map, as inclusive ``(first, last)`` ranges; none by default. Xen's dom0 gets
    #: everything below ``1 << domain_max_paddr_bits`` minus Xen's own ranges
    #: (``dom0_setup_permissions``, xen/arch/x86/dom0_build.c).
    iomem_caps: tuple[tuple[int, int], ...] = ()

    def __deepcopy__(self, memo: dict[int, Any]) -> "Domain":
        """The P2M holds only numbers: a shallow copy of it is a deep one (and a
        model checker copies domains of 16384 frames often)."""
        twin = copy.copy(self)
        memo[id(self)] = twin
        vars(twin).update({k: copy.deepcopy(v, memo) for k, v in vars(self).items() if k != "p2m"})
        twin.p2m = dict(self.p2m)
        return twin

    def mfn_of(self, gfn: int) -> MFN | None:
        """P2M lookup: the machine frame backing ``gfn``, or None if unbacked."""
        return self.p2m.get(GFN(gfn))

    def iomem_access_permitted(self, first: int, last: int) -> bool:
        """``iomem_access_permitted(d, s, e)``: frames ``first..last`` lie in one of
        the domain's I/O memory ranges (``rangeset_contains_range``)."""
        return any(lo <= first and last <= hi for lo, hi in self.iomem_caps)

    @property
    def nr_pages(self) -> int:
        return len(self.p2m)


class Machine:
    """Machine memory, frame ownership, domains, one physical CPU's TLB and counters.

    ``hypervisor_frames`` frames at the bottom of memory belong to Xen (its code,
    its own tables, the shadow and EPT tables it builds); guests never map them.
    """

    def __init__(
        self,
        nr_frames: int = 1 << 14,
        hypervisor_frames: int = 1024,
        maxphyaddr: int = 40,
        tlb_capacity: int = 1536,
        tlb_ways: int = 12,
    ) -> None:
        if not 0 < hypervisor_frames < nr_frames:
            raise RefmodelError(f"hypervisor_frames {hypervisor_frames} must be in 1..{nr_frames - 1}")
        if nr_frames << PAGE_SHIFT > 1 << maxphyaddr:
            raise RefmodelError(f"{nr_frames} frames do not fit below MAXPHYADDR={maxphyaddr}")
        self.mem = PhysicalMemory(maxphyaddr)
        self.counters = Counters()
        self.tlb = Tlb(tlb_capacity, tlb_ways, self.counters)
        self.nr_frames = nr_frames
        self.owner: dict[MFN, DomId] = {MFN(m): DOMID_XEN for m in range(hypervisor_frames)}
        self.m2p: dict[MFN, GFN] = {}
        self.domains: dict[DomId, Domain] = {}
        # Free guest frames, scrambled: odd frames descending, then even ascending.
        rest = range(hypervisor_frames, nr_frames)
        self._free: list[MFN] = [MFN(m) for m in sorted(rest, key=lambda m: (m % 2 == 0, -m if m % 2 else m))]
        self._free_xen: list[MFN] = [MFN(m) for m in range(hypervisor_frames - 1, 0, -1)]

    #: Attributes that hold only numbers: a shallow copy of each is a deep one.
    NUMBER_TABLES = frozenset({"owner", "m2p", "_free", "_free_xen"})

    def __deepcopy__(self, memo: dict[int, Any]) -> "Machine":
        """A deep copy in a fraction of ``copy.deepcopy``'s time: the ownership, M2P
        and free-list tables (131072 frames for a machine like QEMU's 512 MiB) are
        copied shallowly, everything else deeply."""
        twin = Machine.__new__(Machine)
        memo[id(self)] = twin
        vars(twin).update(
            {k: copy.copy(v) if k in self.NUMBER_TABLES else copy.deepcopy(v, memo) for k, v in vars(self).items()}
        )
        return twin

    # -- ownership -----------------------------------------------------------------
    def owner_of(self, mfn: int) -> DomId | None:
        """The owner of a machine frame, or None if it is free or does not exist."""
        return self.owner.get(MFN(mfn))

    def is_hypervisor_frame(self, mfn: int) -> bool:
        return self.owner.get(MFN(mfn)) == DOMID_XEN

    def frame_exists(self, mfn: int) -> bool:
        return 0 <= mfn < self.nr_frames

    # -- domains -------------------------------------------------------------------
    def create_domain(self, domid: int, nr_pages: int, privileged: bool = False, contiguous: bool = False) -> Domain:
        """A new domain with ``nr_pages`` guest frames 0..nr_pages-1, each backed by a
        fresh, zeroed machine frame — scattered, or with ``contiguous`` in aligned
        2 MiB runs where free memory has them (:meth:`populate_contiguous`)."""
        if not 0 <= domid < DOMID_FIRST_RESERVED:
            raise RefmodelError(f"domain id {domid:#x} is reserved or negative")
        if domid in self.domains:
            raise RefmodelError(f"domain {domid} already exists")
        if nr_pages > len(self._free):
            raise RefmodelError(f"domain {domid}: {nr_pages} pages requested, {len(self._free)} free")
        dom = Domain(DomId(domid), privileged=privileged)
        self.domains[dom.domid] = dom
        if contiguous:
            self.populate_contiguous(dom, GFN(0), nr_pages)
        else:
            for gfn in range(nr_pages):
                self.populate(dom, GFN(gfn))
        return dom

    def populate_contiguous(self, dom: Domain, first: GFN, count: int) -> None:
        """Back guest frames ``first`` .. ``first + count - 1``: every 2 MiB-aligned
        run of 512 guest frames with 512 contiguous, 2 MiB-aligned free machine
        frames (the lowest such run), every other frame one by one as
        :meth:`populate` does. This is how Xen's toolstack populates an HVM guest
        (``meminit_hvm`` in tools/libs/guest/xg_dom_x86.c asks
        ``XENMEM_populate_physmap`` for 1 GiB, then 2 MiB extents, then 4 KiB pages)
        and what KVM gets from a hugepage-backed memslot: the condition for mapping
        guest memory with large EPT pages (``ept_set_entry`` with a superpage order)."""
        end = first + count
        taken_gfns = [g for g in range(first, end) if GFN(g) in dom.p2m]
        if taken_gfns:
            raise RefmodelError(f"domain {dom.domid}: gfn {taken_gfns[0]:#x} is already populated")
        if count > len(self._free):
            raise RefmodelError(f"domain {dom.domid}: {count} pages requested, {len(self._free)} free")
        gfn = int(first)
        while gfn < end:
            run = self._free_run() if gfn % RUN_FRAMES == 0 and end - gfn >= RUN_FRAMES else None
            if run is None:
                self.populate(dom, GFN(gfn))
                gfn += 1
                continue
            taken = set(range(run, run + RUN_FRAMES))
            self._free = [m for m in self._free if m not in taken]
            for i in range(RUN_FRAMES):
                self._assign(dom, GFN(gfn + i), MFN(run + i))
            gfn += RUN_FRAMES

    def _free_run(self) -> MFN | None:
        """The lowest 2 MiB-aligned run of 512 free machine frames, or None."""
        free = set(self._free)
        for base in range(0, self.nr_frames - RUN_FRAMES + 1, RUN_FRAMES):
            if all(m in free for m in range(base, base + RUN_FRAMES)):
                return MFN(base)
        return None

    def populate(self, dom: Domain, gfn: GFN) -> MFN:
        """Back one guest frame with a fresh zeroed machine frame (P2M and M2P)."""
        if gfn in dom.p2m:
            raise RefmodelError(f"domain {dom.domid}: gfn {gfn:#x} is already populated")
        if not self._free:
            raise RefmodelError("out of machine frames")
        mfn = self._free.pop(0)
        self._assign(dom, gfn, mfn)
        return mfn

    def _assign(self, dom: Domain, gfn: GFN, mfn: MFN) -> None:
        """Give free machine frame ``mfn``, zeroed, to ``dom`` as its ``gfn``."""
        self.owner[mfn] = dom.domid
        self.m2p[mfn] = gfn
        dom.p2m[gfn] = mfn
        self.mem.load_frame(mfn, bytes(1 << PAGE_SHIFT))

    def alloc_xen_frame(self) -> MFN:
        """A zeroed hypervisor frame (for shadow and EPT tables)."""
        if not self._free_xen:
            raise RefmodelError("out of hypervisor frames")
        mfn = self._free_xen.pop()
        self.mem.load_frame(mfn, bytes(1 << PAGE_SHIFT))
        return mfn

    def free_xen_frame(self, mfn: MFN) -> None:
        if not self.is_hypervisor_frame(mfn) or mfn == 0:
            raise RefmodelError(f"mfn {mfn:#x} is not a hypervisor frame")
        self._free_xen.append(mfn)

    def domain(self, domid: int) -> Domain:
        try:
            return self.domains[DomId(domid)]
        except KeyError:
            raise RefmodelError(f"no domain {domid}") from None

    def frames_of(self, domid: int) -> set[MFN]:
        """Every machine frame a domain owns."""
        return {m for m, d in self.owner.items() if d == domid}
