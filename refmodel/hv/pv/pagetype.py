"""Page types and type counts: how Xen keeps a PV guest's page tables safe
(xen/arch/x86/include/asm/mm.h, xen/arch/x86/mm.c).

Every machine frame has a ``page_info`` whose ``type_info`` holds one type (none, L1
.. L4 page table, segment-descriptor page, writable page), a type count, and the
flags *validated* and *pinned*. The rules (``_get_page_type``, ``_put_page_type``):

- a frame has exactly one type at a time, and the type changes only while the type
  count is zero;
- taking a page-table type for the first time validates every entry of the table
  (``promote_lN_table``): an L1 entry must pass ``get_page_from_l1e`` — which, for an
  RW mapping, takes a *writable* type reference on the target, impossible while the
  target is a page table, so page tables are never writably mapped; an L2-L4 entry
  takes a type reference of level N-1 on its target, validating it in turn;
- dropping the last type reference of a page table de-validates it
  (``demote_lN_table``): every reference its entries held is dropped, cascading;
- a frame whose type changes may still be in some TLB through a stale mapping made
  under its old type: Xen flushes unless the TLB has been flushed since the frame's
  last type reference was dropped (``tlbflush_filter`` with the page's
  ``tlbflush_timestamp``, xen/arch/x86/flushtlb.c).

Simplifications, stated: one vCPU per domain on one physical CPU; validation is
atomic: a failed validation gives back every reference it took and leaves the frame
with no type in use (Xen gets there too, for L2..L4 tables through ``PGT_partial``
and ``old_guest_table`` in a continuation, which may leave the old type at count
zero where the model writes ``PGT_none``; preemption is not modelled); general reference
counts (``count_info``) are not modelled, because frames are never freed; a frame
that is not RAM is I/O memory, mapped only with the data owner's (and the page-table
owner's) ``iomem_caps`` — no type reference, and made uncachable as Xen does with
``mmio-relax`` off; frames in ``mmio_ro_ranges`` (Xen forces their mappings
read-only, flipping RW) and ``DOMID_IO`` ownership are not modelled; the
segment-descriptor type exists but no operation takes it.

Also not modelled (xen/arch/x86/mm.c of Xen 4.17): ``_PAGE_NX`` is always allowed
(``base_disallow_mask`` allows it only when the CPU has NX, 291-297); the
cache-attribute refusal for Xen heap pages (-EACCES, 1018-1026) and
``_PGT_non_coherent`` tracking (1028-1036); IOMMU maps and unmaps on type changes
(``need_iommu_pt_sync``, 2474, 3067); the type-count overflow check (-EINVAL, 2900);
``pv-linear-pt=false`` (677-690: linear page tables are always allowed here); the L1TF check during validation (1338, 1444, 1565, 1767).
"""

import enum
import weakref
from collections import Counter
from dataclasses import dataclass

from ...arch.pte import Level, PteFlag
from ...arch.types import ENTRIES_PER_TABLE, ENTRY_SIZE, MFN, PAGE_SHIFT, DomId
from ..machine import Domain, Machine
from .adjust import adjust_guest_entry
from .errno import Errno, neg
from .pteflags import CACHE_ATTRS, PTE_ADDR_BITS, UPPER_DISALLOW_MASK, entry_mfn, l1_disallow_mask, present


class PageType(enum.Enum):
    """``PGT_*`` types (asm/mm.h). NONE is ``PGT_none``, the type of a fresh frame."""

    NONE = "none"
    L1 = "l1_page_table"
    L2 = "l2_page_table"
    L3 = "l3_page_table"
    L4 = "l4_page_table"
    SEG_DESC = "seg_desc_page"
    WRITABLE = "writable_page"

    @property
    def level(self) -> Level | None:
        """The paging level of a page-table type, None for the others."""
        return _LEVEL_OF.get(self)

    @property
    def is_page_table(self) -> bool:
        return self in _LEVEL_OF

    @staticmethod
    def table(level: Level) -> "PageType":
        """The type of a level-``level`` page table."""
        return _TYPE_OF[level]


_LEVEL_OF = {PageType.L1: Level.L1, PageType.L2: Level.L2, PageType.L3: Level.L3, PageType.L4: Level.L4}
_TYPE_OF = {level: t for t, level in _LEVEL_OF.items()}

#: ``ROOT_PAGETABLE_FIRST_XEN_SLOT`` .. ``ROOT_PAGETABLE_LAST_XEN_SLOT``
#: (xen/arch/x86/include/asm/config.h): the L4 slots Xen keeps for itself.
FIRST_XEN_L4_SLOT = 256
LAST_XEN_L4_SLOT = 271


def is_guest_l4_slot(slot: int) -> bool:
    """``is_guest_l4_slot`` for a 64-bit PV guest (asm/x86_64/page.h): every slot
    outside Xen's 256..271."""
    return slot < FIRST_XEN_L4_SLOT or slot > LAST_XEN_L4_SLOT


def guest_slots(level: Level) -> range | list[int]:
    """The slots of a level-``level`` table that belong to the guest
    (``is_guest_l2_slot`` is always true for a 64-bit guest)."""
    if level is Level.L4:
        return [s for s in range(ENTRIES_PER_TABLE) if is_guest_l4_slot(s)]
    return range(ENTRIES_PER_TABLE)


@dataclass
class PageInfo:
    """One frame's ``u.inuse.type_info``, split into fields, plus the
    ``linear_pt_count`` and ``tlbflush_timestamp`` of ``struct page_info``."""

    type: PageType = PageType.NONE
    count: int = 0  #: the type count (``PGT_count_mask``)
    validated: bool = False  #: ``PGT_validated``
    pinned: bool = False  #: ``PGT_pinned``: one type reference held by the pin
    #: > 0: linear (same-level) entries this table holds; < 0: times it is the
    #: target of one (``inc_linear_entries`` / ``inc_linear_uses``).
    linear_pt_count: int = 0
    #: flush clock when the type count last fell to zero; None: never typed.
    tlbflush_timestamp: int | None = None


@dataclass(frozen=True)
class PageState:
    """A frame's type state as a value, for tests and reports."""

    type: PageType
    count: int
    validated: bool
    pinned: bool
    linear_pt_count: int = 0


class PvStat(enum.Enum):
    """Work inside Xen that the generic event counters do not name."""

    L1E_CHECKED = "get_page_from_l1e"  #: one L1 entry validated (its references taken)
    FAST_PATH = "fast_path"  #: an entry rewritten without re-validation
    TABLE_VALIDATED = "promote_table"  #: a page table validated (``promote_lN_table``)
    TABLE_DEVALIDATED = "demote_table"  #: a page table de-validated (``demote_lN_table``)
    TYPE_CHANGE_FLUSH = "type_change_flush"  #: a TLB flush forced by a frame's type change


class FrameTable:
    """Xen's per-machine PV memory-management state: ``frame_table`` (a
    :class:`PageInfo` per machine frame), the TLB flush clock, and which TLB tag each
    PV domain's vCPU uses on the one physical CPU."""

    def __init__(self, machine: Machine) -> None:
        # A weak reference: the registry below maps each machine to its table, and a
        # table that held its machine strongly would keep both alive forever.
        self._machine = weakref.ref(machine)
        self.pages: dict[MFN, PageInfo] = {}
        self.stats: Counter[PvStat] = Counter()
        self.clock = 1  #: ``tlbflush_clock``
        self.last_flush: dict[DomId, int] = {}  #: the clock at the domain's last full flush
        self.vpids: dict[DomId, int] = {}

    @property
    def machine(self) -> Machine:
        machine = self._machine()
        assert machine is not None, "the machine of this frame table is gone"
        return machine

    def info(self, mfn: int) -> PageInfo:
        page = self.pages.get(MFN(mfn))
        if page is None:
            page = self.pages[MFN(mfn)] = PageInfo()
        return page

    def state(self, mfn: int) -> PageState:
        p = self.info(mfn)
        return PageState(p.type, p.count, p.validated, p.pinned, p.linear_pt_count)

    def owned_by(self, mfn: int, domain: Domain) -> bool:
        """``get_page_from_mfn(mfn, d)`` succeeds: RAM that ``domain`` owns."""
        return self.machine.frame_exists(mfn) and self.machine.owner_of(mfn) == domain.domid

    def register(self, domid: DomId, vpid: int) -> None:
        """A PV domain's vCPU starts running with TLB tag ``vpid``."""
        self.vpids[domid] = vpid

    # -- TLB flushes (xen/arch/x86/flushtlb.c) ------------------------------------------
    def note_full_flush(self, domid: DomId) -> None:
        """The domain's TLB entries were all flushed: tick the clock
        (``pre_flush``/``post_flush``) and stamp the CPU."""
        self.clock += 1
        self.last_flush[domid] = self.clock

    def flush_domain(self, domid: DomId) -> None:
        """``flush_tlb_mask(d->dirty_cpumask)`` (and ``flush_tlb_local`` of the
        domain's one vCPU): every entry the vCPU may have cached, *global ones too* —
        ``FLUSH_TLB`` is ``do_tlb_flush`` (xen/arch/x86/flushtlb.c), which toggles
        CR4.PGE or runs ``invpcid_flush_all``. One physical CPU, one tag per domain:
        the whole tag goes (counted as one :attr:`Event.TLB_FLUSH_GLOBAL`)."""
        vpid = self.vpids.get(domid)
        if vpid is None:
            return  # the domain has never run: no CPU is dirty
        self.machine.tlb.invalidate_all(vpid)
        self.note_full_flush(domid)

    def need_flush(self, domid: DomId, stamp: int | None) -> bool:
        """``NEED_FLUSH(cpu_stamp, lastuse_stamp)``: the domain's CPU has not flushed
        since the frame's last use ended."""
        return stamp is not None and domid in self.vpids and self.last_flush.get(domid, 0) <= stamp


_TABLES: "weakref.WeakKeyDictionary[Machine, FrameTable]" = weakref.WeakKeyDictionary()


def frame_table_of(machine: Machine) -> FrameTable:
    """The one :class:`FrameTable` of ``machine`` (created on first use), shared by
    every PV domain on it."""
    table = _TABLES.get(machine)
    if table is None:
        table = _TABLES[machine] = FrameTable(machine)
    return table


# -- reading a table ---------------------------------------------------------------------
def read_entry(ft: FrameTable, table: int, slot: int) -> int:
    return ft.machine.mem.read_u64((table << PAGE_SHIFT) + slot * ENTRY_SIZE)


def write_entry(ft: FrameTable, table: int, slot: int, value: int) -> None:
    ft.machine.mem.write_u64((table << PAGE_SHIFT) + slot * ENTRY_SIZE, value)


def owner_domain(ft: FrameTable, mfn: int) -> Domain | None:
    """``page_get_owner``, as a :class:`Domain` (None for Xen's, free or absent frames)."""
    owner = ft.machine.owner_of(mfn)
    return ft.machine.domains.get(owner) if owner is not None else None


# -- type references (_get_page_type / _put_page_type) ---------------------------------------
def get_page_type(ft: FrameTable, mfn: int, type_: PageType) -> int:
    """``_get_page_type``: take one type reference of ``type_`` on ``mfn``; 0 or -errno.

    With the count at zero the type may change (flushing stale TLB entries first if
    needed); the first reference of a page-table type validates the table. With the
    count above zero the type must match (-EINVAL otherwise)."""
    page = ft.info(mfn)
    if page.count > 0:
        if page.type is not type_:
            return neg(Errno.EINVAL)  # "Bad type": a reference of the wrong type
        page.count += 1
        return 0
    if page.type is not type_:
        flush_for_type_change(ft, mfn, page)
        page.type, page.validated = type_, False
    page.count = 1
    if page.validated:
        return 0
    if not type_.is_page_table:
        page.validated = True  # "No special validation needed for writable ... pages"
        return 0
    rc = validate_table(ft, mfn, type_)
    if rc:
        # validate_page(): on failure "page->u.inuse.type_info = 0".
        page.type, page.count, page.validated = PageType.NONE, 0, False
        return rc
    page.validated = True
    return 0


def flush_for_type_change(ft: FrameTable, mfn: int, page: PageInfo) -> None:
    """``_get_page_type``, "On type change we check to flush stale TLB entries. It is
    vital that no other CPUs are left with writeable mappings to a frame which is
    intending to become pgtable/segdesc.\""""
    owner = ft.machine.owner_of(mfn)
    if owner is not None and ft.need_flush(owner, page.tlbflush_timestamp):
        ft.stats[PvStat.TYPE_CHANGE_FLUSH] += 1
        ft.flush_domain(owner)


def put_page_type(ft: FrameTable, mfn: int, ptpg: int | None = None) -> None:
    """``_put_page_type``: drop one type reference. ``ptpg`` is the page table whose
    entry held it; when it has the same type, the entry was a linear one and the
    linear counts come down too. The last reference of a page table de-validates it
    (``_put_final_page_type``), dropping every reference its entries held."""
    page = ft.info(mfn)
    assert page.count > 0 and page.validated, f"mfn {mfn:#x}: put of a type reference not held"
    linear = ptpg is not None and ft.info(ptpg).type is page.type
    if page.count == 1:
        if page.type.is_page_table:
            page.validated = False
            devalidate_table(ft, mfn, page.type)
        page.tlbflush_timestamp = ft.clock
    page.count -= 1
    if linear:
        assert ptpg is not None
        dec_linear_uses(page)
        dec_linear_entries(ft.info(ptpg))


# -- validation (promote_lN_table / demote_lN_table) ------------------------------------------
def validate_table(ft: FrameTable, mfn: int, type_: PageType) -> int:
    """``validate_page`` for a page table: check every guest entry, taking the
    references each needs, and rewrite each entry that passed as Xen does
    (:mod:`.adjust`; ``promote_lN_table`` stores ``adjust_guest_lNe`` of it, 1359,
    1503, 1588, 1824). On failure, drop the references already taken; the entries
    already rewritten stay rewritten, as in Xen."""
    level = type_.level
    assert level is not None
    owner = owner_domain(ft, mfn)
    assert owner is not None, f"mfn {mfn:#x}: a page table must belong to a domain"
    taken: list[int] = []
    for slot in guest_slots(level):
        entry = read_entry(ft, mfn, slot)
        if not present(entry):
            continue
        if level is Level.L1:
            rc = get_page_from_l1e(ft, entry, owner, owner)
            if rc > 0:  # promote_l1_table: "l1e_flip_flags(pl1e[i], ret)"
                entry ^= rc
                rc = 0
        else:
            rc = get_page_from_upper_entry(ft, entry, level, mfn, owner)
        if rc:
            for done in reversed(taken):
                put_page_from_entry(ft, read_entry(ft, mfn, done), level, mfn, owner)
            return rc
        write_entry(ft, mfn, slot, adjust_guest_entry(entry, level))
        taken.append(slot)
    if level is Level.L4:
        clear_xen_l4_slots(ft, mfn)
    ft.stats[PvStat.TABLE_VALIDATED] += 1
    return 0


def clear_xen_l4_slots(ft: FrameTable, mfn: int) -> None:
    """``init_xen_l4_slots``: Xen overwrites slots 256..271 of a validated L4 with its
    own mappings. Xen's mappings are not modelled as guest-reachable, so the model
    writes them as not present."""
    for slot in range(FIRST_XEN_L4_SLOT, LAST_XEN_L4_SLOT + 1):
        write_entry(ft, mfn, slot, 0)


def devalidate_table(ft: FrameTable, mfn: int, type_: PageType) -> None:
    """``devalidate_page``: drop the references every guest entry holds (cascading)."""
    level = type_.level
    assert level is not None
    owner = owner_domain(ft, mfn)
    assert owner is not None
    for slot in guest_slots(level):
        put_page_from_entry(ft, read_entry(ft, mfn, slot), level, mfn, owner)
    ft.stats[PvStat.TABLE_DEVALIDATED] += 1


def put_page_from_entry(ft: FrameTable, entry: int, level: Level, table: int, owner: Domain) -> None:
    """``put_page_from_l1e`` or ``put_page_from_l[234]e``, by level."""
    if level is Level.L1:
        put_page_from_l1e(ft, entry)
    else:
        put_page_from_upper_entry(ft, entry, table)


# -- L1 entries ------------------------------------------------------------------------------
def cache_flush_permitted(domain: Domain) -> bool:
    """``cache_flush_permitted(d)``: the domain has I/O memory or I/O ports. I/O
    ports are not modelled: a privileged (dom0-like) domain stands for a domain
    that has them."""
    return domain.privileged or bool(domain.iomem_caps)


#: ``INVALID_MFN`` as an entry spells it: every address bit set
#: (``PADDR_MASK >> PAGE_SHIFT``, xen/arch/x86/mm.c ``get_page_from_l1e``).
INVALID_MFN = PTE_ADDR_BITS >> PAGE_SHIFT


def get_page_from_l1e(ft: FrameTable, l1e: int, l1e_owner: Domain, pg_owner: Domain) -> int:
    """``get_page_from_l1e``: may ``l1e_owner`` map this frame, with these flags, on
    behalf of data owner ``pg_owner``? Takes a writable type reference for an RW
    mapping. 0, -errno, or — for I/O memory — the flags the caller must flip
    (:func:`get_iomem_from_l1e`):

    - a flag outside ``l1_disallow_mask`` -> -EINVAL ("Bad L1 flags");
    - a frame that is not RAM -> :func:`get_iomem_from_l1e`;
    - a frame owned by someone other than the data owner (another domain, Xen, or
      nobody), unless a privileged data owner transfers the right -> -EBUSY
      (``could_not_pin``);
    - RW but the frame cannot become a writable page (it is a page table) -> -EBUSY.
    """
    ft.stats[PvStat.L1E_CHECKED] += 1
    if l1e & l1_disallow_mask(cache_flush_permitted(l1e_owner)):
        return neg(Errno.EINVAL)
    mfn = entry_mfn(l1e)
    if not ft.machine.frame_exists(mfn):
        return get_iomem_from_l1e(l1e, l1e_owner, pg_owner)
    real_owner = ft.machine.owner_of(mfn)
    if real_owner != pg_owner.domid:
        real_domain = ft.machine.domains.get(real_owner) if real_owner is not None else None
        if real_domain is None or pg_owner is l1e_owner or not pg_owner.privileged:
            return neg(Errno.EBUSY)
    if l1e & PteFlag.RW and get_page_type(ft, mfn, PageType.WRITABLE):
        return neg(Errno.EBUSY)  # "Could not get page type PGT_writable_page"
    return 0


def get_iomem_from_l1e(l1e: int, l1e_owner: Domain, pg_owner: Domain) -> int:
    """The ``!valid || dom_io`` branch of ``get_page_from_l1e`` (xen/arch/x86/mm.c):
    a frame that is not RAM. The data owner, and a page-table owner other than it,
    must each be permitted the frame (``iomem_access_permitted``) — else -EPERM
    ("non-privileged attempt to map MMIO space"), or -EINVAL for INVALID_MFN. No
    reference is taken. What is returned is the flip (``l1e_flip_flags``) the caller
    applies: with ``opt_mmio_relax`` off (the default) "MMIO pages must not be
    mapped cachable unless requested so" — write-back becomes UC (PWT|PCD added),
    write-through or write-protect gets PCD. ``mmio_ro_ranges`` is taken as empty
    (Xen flips RW off for a frame in it)."""
    mfn = entry_mfn(l1e)
    for domain in (pg_owner, l1e_owner):
        if not domain.iomem_access_permitted(mfn, mfn):
            return neg(Errno.EINVAL) if mfn == INVALID_MFN else neg(Errno.EPERM)
    attrs = l1e & CACHE_ATTRS
    if attrs == 0:  # WB
        return int(PteFlag.PWT | PteFlag.PCD)
    if attrs in (int(PteFlag.PWT), int(PteFlag.PWT | PteFlag.PS)):  # WT, WP (PAT is bit 7)
        return int(PteFlag.PCD) | (l1e & int(PteFlag.PS))
    return 0


def put_page_from_l1e(ft: FrameTable, l1e: int) -> None:
    """``put_page_from_l1e``: an RW mapping gives back its writable type reference."""
    if present(l1e) and l1e & PteFlag.RW and ft.machine.frame_exists(entry_mfn(l1e)):
        put_page_type(ft, entry_mfn(l1e))


# -- L2, L3 and L4 entries ----------------------------------------------------------------------
def get_page_from_upper_entry(ft: FrameTable, entry: int, level: Level, table: int, domain: Domain) -> int:
    """``get_page_from_l[234]e``: a present entry of a level-``level`` table takes a
    type reference of level N-1 on its target, validating it if needed. Refused:
    flags outside ``base_disallow_mask`` (PSE among them: no superpages for PV) and a
    target the domain does not own -> -EINVAL. A target of the wrong type
    (-EINVAL) may still be accepted as a linear page table
    (:func:`get_linear_pagetable`)."""
    if entry & UPPER_DISALLOW_MASK:
        return neg(Errno.EINVAL)  # "Bad L2/L3/L4 flags"
    target = entry_mfn(entry)
    if not ft.owned_by(target, domain):
        rc = neg(Errno.EINVAL)  # get_page_and_type_from_mfn: get_page_from_mfn failed
    else:
        rc = get_page_type(ft, target, PageType.table(Level(level - 1)))
    if rc == neg(Errno.EINVAL) and get_linear_pagetable(ft, entry, level, table, domain):
        rc = 0
    return rc


def get_linear_pagetable(ft: FrameTable, entry: int, level: Level, table: int, domain: Domain) -> bool:
    """``get_lN_linear_pagetable`` (``define_get_linear_pagetable``, CONFIG_PV_LINEAR_PT):
    an entry may point at a table of its *own* level ("linear" or "recursive" page
    tables) only if

    1. it is read-only ("or the guest may get write access to its own PTEs");
    2. it points at the table itself (no reference needed), or at another table of
       the same domain that is already validated at this level;
    3. one level deep only: the containing table is not itself a linear target, and
       the target does not itself hold linear entries.

    Then the target gets a type reference and both linear counts move."""
    if entry & PteFlag.RW:
        return False  # "Attempt to create linear p.t. with write perms"
    target = entry_mfn(entry)
    if target == table:
        return True
    if not (ft.owned_by(table, domain) and ft.owned_by(target, domain)):
        return False
    container, page = ft.info(table), ft.info(target)
    if container.linear_pt_count < 0 or page.linear_pt_count > 0:
        return False  # inc_linear_entries / inc_linear_uses refuse
    if page.type is not PageType.table(level) or not page.validated:
        return False
    container.linear_pt_count += 1
    page.linear_pt_count -= 1
    page.count += 1
    return True


def dec_linear_uses(page: PageInfo) -> None:
    assert page.linear_pt_count < 0
    page.linear_pt_count += 1


def dec_linear_entries(page: PageInfo) -> None:
    assert page.linear_pt_count > 0
    page.linear_pt_count -= 1


def put_page_from_upper_entry(ft: FrameTable, entry: int, table: int) -> None:
    """``put_page_from_l[234]e``: drop the type reference a present entry holds —
    none for an entry that maps its own table."""
    if not present(entry) or entry_mfn(entry) == table:
        return
    put_page_type(ft, entry_mfn(entry), ptpg=table)
