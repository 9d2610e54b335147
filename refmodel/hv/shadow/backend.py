"""Shadow paging: an unmodified (HVM) guest on write-protected page tables, trap and
emulate (Xen xen/arch/x86/mm/shadow/{common,multi,set,oos}.c; KVM
Documentation/virt/kvm/x86/mmu.rst).

The guest keeps its own 4-level tables in guest-physical memory (entries hold GFNs)
and its own CR3 (:attr:`ShadowBackend.guest_state`). The processor walks *shadow*
tables the hypervisor builds in its own frames, mapping guest-virtual addresses
straight to machine frames (:mod:`.propagate` says how each entry is derived). The
hardware CR3 points at the shadow of the guest's current root.

What the guest does, and what it costs:

- a store to one of its page tables faults into the hypervisor (ExitReason.PT_WRITE),
  which emulates it and re-propagates the entry into every shadow of that table
  (Xen ``sh_x86_emulate_write`` -> ``sh_validate_guest_pt_write``); a store to any
  other frame is a plain store;
- MOV to CR3 exits (CR3_WRITE): the hypervisor finds or builds the shadow of the new
  root and loads it, flushing as MOV CR3 does (``sh_update_cr3``);
- INVLPG exits (INVLPG) and is carried out on the hardware TLB (``sh_invlpg``);
- a hardware #PF exits (PAGE_FAULT): the hypervisor walks the *guest's* tables with
  the SDM's walk (setting the guest's A/D flags as the processor would). If that walk
  faults, the #PF is the guest's own and is reflected to it; otherwise the fault was
  the hypervisor's business (a "hidden" fault): it syncs the shadow entries along the
  walk (Event.SHADOW_FILL) and lets the guest retry (``sh_page_fault``).

Policies, stated:

- Which frames are write-protected: every guest table reachable through present
  entries from a root the guest has loaded is shadowed, and a shadowed frame is
  write-protected. Shadows are built eagerly, structure first: shadowing a table
  shadows every table its present entries reference, and *a table linked into a
  shadowed table by a trapped write is shadowed — write-protected — at once*, so the
  guest's following writes into that new table trap too (the seed's model: "the
  page-tables in the guest are write-protected and when a write happens, it's
  trapped"). Xen instead shadows a table lazily, the first time a hidden fault walks
  through it. Shadows are never torn down (Xen recycles them under memory pressure
  and unshadows on heuristics); an unlinked table stays write-protected, which costs
  traps, never correctness.
- Every shadow entry of an in-sync table equals the propagation of its guest entry at
  all times; a present one needs the guest's A flag, a writable leaf the guest's D
  flag, so every first access and first write reaches the hypervisor, which sets
  A/D in the guest's entry exactly when the processor would (Xen ``_sh_propagate``).
- Upper-level shadow changes that move or narrow a mapping flush this vCPU's TLB
  (Xen ``shadow_set_l{2,3,4}e``); L1 changes do not: the guest flushes, as it must on
  hardware (``shadow_set_l1e``).
- The hardware runs with CR0.WP = 1 whatever the guest set; a supervisor write the
  guest's CR0.WP = 0 allows through a read-only mapping is emulated (``sh_page_fault``).
- Xen unshadows a page table that *user* mode writes; refmodel emulates the write
  like any other, keeping the set of write-protected frames a function of the guest
  tables alone.
- Guest 2 MiB pages are not shadowed (Xen splinters them into "fl1" shadows): every
  access to one exits and is emulated — correct, and honestly slow. 1 GiB pages are
  reserved for a shadowed guest (see :func:`.guest.guest_paging_context`). Guest PCIDs
  are not modelled (the hardware runs the shadows with PCID 000H).
- ``tagged=False`` models a processor without VPIDs: every VM exit and entry
  invalidates every linear mapping (SDM Vol. 3C 28.1), counted as TLB_FLUSH_GLOBAL.

The out-of-sync variant (``oos=True``, Mode.SHADOW_OOS) is described in :mod:`.oos`.
"""

import struct
from dataclasses import replace

from ...account.events import Event, ExitReason
from ...arch.access import Access, AccessKind
from ...arch.fault import PageFault
from ...arch.mmu import Mmu
from ...arch.pte import Level, PageSize, PteFlag, entry_frame_address
from ...arch.types import ENTRIES_PER_TABLE, ENTRY_SIZE, GFN, MFN, PAGE_SHIFT, PAGE_SIZE, frame_of, page_offset
from ...arch.vcpu import ArchState
from ...arch.walk import PagingContext, Translation, is_leaf, reserved_bits, walk
from ...errors import RefmodelError
from ...guest.ops import MmuBackend, Mode
from ..machine import Domain, Machine
from ..native import hardware_access
from .guest import GuestPhysMemory, guest_paging_context, hardware_state
from .oos import OosPage, OosTable
from .propagate import guest_entry_usable, shadow_leaf_entry, shadow_upper_entry
from .tables import ShadowPage, ShadowTables

#: A hidden fault (or an unsync) is resolved in one round and the retry succeeds;
#: needing more rounds than this means the model is wrong.
MAX_FAULT_ROUNDS = 4
_TABLE_FORMAT = f"<{ENTRIES_PER_TABLE}Q"
#: The levels of a guest walk, in the order :func:`refmodel.arch.walk.walk` reads them.
WALK_LEVELS = (Level.L4, Level.L3, Level.L2, Level.L1)


class ShadowBackend(MmuBackend):
    """An HVM guest under shadow paging; ``oos=True`` adds out-of-sync L1 tables."""

    def __init__(self, machine: Machine, domain: Domain, *, tagged: bool = True, oos: bool = False) -> None:
        self.machine = machine
        self.domain = domain
        self.mode = Mode.SHADOW_OOS if oos else Mode.SHADOW
        self.counters = machine.counters
        self.tagged = tagged
        self.oos_enabled = oos
        self.vpid = domain.domid + 1
        #: the vCPU's registers as the guest sees them (its own CR3, CR2, ...)
        self.guest_state = ArchState()
        self.guest_mem = GuestPhysMemory(machine.mem, domain)
        self.shadows = ShadowTables(machine)
        self.oos = OosTable()
        #: the processor: the shadow tables in machine memory, the one physical TLB
        self.mmu = Mmu(machine.mem, ArchState(), machine.tlb, machine.counters, vpid=self.vpid if tagged else 0)
        self.root: ShadowPage | None = None  #: the shadow the hardware CR3 points at

    # ==== the guest's physical memory ==========================================================
    def _mfn(self, gfn: int) -> MFN:
        mfn = self.domain.mfn_of(gfn)
        if mfn is None:
            raise RefmodelError(f"domain {self.domain.domid} has no guest frame {gfn:#x}")
        return mfn

    def _gpa(self, gfn: int, offset: int) -> int:
        self._mfn(gfn)
        if not 0 <= offset < PAGE_SIZE or offset % ENTRY_SIZE:
            raise RefmodelError(f"offset {offset:#x} is not an aligned 8-byte slot of a 4 KiB frame")
        return (gfn << PAGE_SHIFT) + offset

    def guest_entries(self, gfn: GFN) -> tuple[int, ...]:
        """The 512 entries of guest frame ``gfn`` as they are in its memory now."""
        return struct.unpack(_TABLE_FORMAT, self.machine.mem.frame_bytes(self._mfn(gfn)))

    def read_frame_u64(self, gfn: GFN, offset: int) -> int:
        return self.guest_mem.read_u64(self._gpa(gfn, offset))

    def write_frame_u64(self, gfn: GFN, offset: int, value: int) -> None:
        self.guest_store(self._gpa(gfn, offset), value)

    def copy_frame(self, src: GFN, dst: GFN) -> None:
        """A memcpy: one plain copy, or — into a write-protected frame — one trapped
        store per 8 bytes."""
        data = self.machine.mem.frame_bytes(self._mfn(src))
        if not self.write_protected(dst):
            self.machine.mem.load_frame(self._mfn(dst), data)
            return
        for offset in range(0, PAGE_SIZE, ENTRY_SIZE):
            self.guest_store(self._gpa(dst, offset), int.from_bytes(data[offset : offset + ENTRY_SIZE], "little"))

    # ==== page tables ==========================================================================
    def pte_frame(self, gfn: GFN) -> int:
        return int(gfn)

    def entry_gfn(self, frame: int) -> GFN:
        return GFN(frame)

    def read_pte(self, table: GFN, index: int) -> int:
        return self.guest_mem.read_u64(self._gpa(table, _slot(index)))

    def write_pte(self, table: GFN, index: int, level: Level, value: int) -> None:
        """An ordinary guest store into its table. ``level`` is the guest's claim and
        is not used: the hypervisor knows at which levels it shadows the frame."""
        self.guest_store(self._gpa(table, _slot(index)), value)

    def new_table(self, table: GFN, level: Level) -> None:
        """Nothing to do: an HVM guest has no paravirtual hooks."""
        self._mfn(table)

    def lazy_begin(self) -> None:
        """Nothing to batch: the guest's stores trap one by one."""

    def lazy_end(self) -> None:
        """See :meth:`lazy_begin`."""

    # ==== guest stores to its own memory =========================================================
    def write_protected(self, gfn: int) -> bool:
        """A shadowed guest page table, unless it is out of sync."""
        return self.shadows.is_shadowed(GFN(gfn)) and gfn not in self.oos

    def guest_store(self, gpa: int, value: int) -> None:
        """A guest 8-byte store to its own physical memory (through its direct map):
        plain, or — to a write-protected page table — a #PF exit the hypervisor
        resolves by emulating the store, or (out-of-sync mode, an L1 table) by
        unsyncing the table and letting the guest's store through."""
        gfn = GFN(frame_of(gpa))
        if not self.write_protected(gfn):
            self.guest_mem.write_u64(gpa, value)
            return
        self.vm_exit(ExitReason.PT_WRITE)
        if self._may_unsync(gfn):
            self._unsync(gfn)
            self.guest_mem.write_u64(gpa, value)
            return
        self.counters.add(Event.EMULATED_PT_WRITE)
        self._emulate_pt_write(gpa, value)

    def _emulate_pt_write(self, gpa: int, value: int) -> None:
        """Xen ``sh_x86_emulate_write`` -> ``sh_validate_guest_pt_write``: perform the
        8-byte store, then re-propagate every entry it touched into every shadow of
        the frame, flushing if an upper-level mapping moved or narrowed."""
        self.guest_mem.write_uint(gpa, ENTRY_SIZE, value)
        first, last = page_offset(gpa) // ENTRY_SIZE, (page_offset(gpa) + ENTRY_SIZE - 1) // ENTRY_SIZE
        for index in range(first, last + 1):
            self.validate_entry(GFN(frame_of(gpa)), index)

    # ==== VM exits and the TLB ===================================================================
    def vm_exit(self, reason: ExitReason) -> None:
        """One VM exit and the VM entry that resumes the guest. Without VPIDs the
        processor invalidates every linear mapping on each (SDM Vol. 3C 28.1)."""
        self.counters.exit(reason)
        if not self.tagged:
            self.machine.tlb.flush_everything()

    def flush_vcpu_tlb(self) -> None:
        """The hypervisor's own flush of this vCPU's translations (Xen
        ``guest_flush_tlb_mask``; INVVPID single-context, SDM Vol. 3C 28.3.3.3)."""
        self.machine.tlb.invalidate_vpid(self.mmu.vpid)

    # ==== shadow construction and propagation (Xen: under the paging lock) =========================
    def guest_context(self) -> PagingContext:
        return guest_paging_context(self.guest_state, self.machine.mem.maxphyaddr)

    def shadow_of(self, gfn: GFN, level: Level) -> ShadowPage:
        """Find or build the shadow of guest table ``gfn`` at ``level``. A frame that
        was not yet a shadowed page table becomes one: its writable shadow mappings
        are hunted down (Xen ``sh_remove_write_access``, flushing if any were found),
        then every entry is propagated — which shadows the tables it references."""
        page = self.shadows.lookup(gfn, level)
        if page is not None:
            return page
        if gfn in self.oos:
            self.resync(gfn)  # oos.c rule 1: a page shadowed at another level must be in sync
        newly_tracked = not self.shadows.is_shadowed(gfn)
        page = self.shadows.allocate(gfn, level)
        if newly_tracked and self.shadows.remove_write_access(self._mfn(gfn)):
            self.flush_vcpu_tlb()
        flush = False
        for index, gentry in enumerate(self.guest_entries(gfn)):
            if gentry:
                flush |= self.propagate(page, index, gentry)
        if flush:
            self.flush_vcpu_tlb()
        return page

    def validate_entry(self, gfn: GFN, index: int, demand_write: bool = False) -> None:
        """Re-propagate entry ``index`` of guest frame ``gfn`` into each of its
        shadows (Xen ``sh_validate_guest_entry``); ``demand_write``: see
        :meth:`propagate`."""
        flush = False
        for level in sorted(self.shadows.levels_of(gfn)):
            page = self.shadows.lookup(gfn, level)
            assert page is not None
            flush |= self.propagate(page, index, demand_write=demand_write)
        if flush:
            self.flush_vcpu_tlb()

    def propagate(self, page: ShadowPage, index: int, gentry: int | None = None, demand_write: bool = False) -> bool:
        """Bring shadow entry ``index`` of ``page`` in line with its guest entry;
        returns whether the TLB must be flushed. For an out-of-sync L1 the snapshot
        slot follows, so its shadow always reflects exactly its snapshot."""
        if gentry is None:
            gentry = self.guest_mem.read_u64((page.gfn << PAGE_SHIFT) + index * ENTRY_SIZE)
        if page.level is Level.L1:
            self.shadows.set_leaf(page, index, self._leaf_value(gentry, demand_write))
            oos_page = self.oos.find(page.gfn)
            if oos_page is not None:
                oos_page.snapshot[index] = gentry
            return False
        value = self._upper_value(gentry, page.level)
        child = self.shadows.link_target(value)
        if child is not None and child is not self.shadows.link_target(self.shadows.read(page, index)):
            self._before_link(page.level, child)
        return self.shadows.set_upper(page, index, value)

    def _leaf_value(self, gentry: int, demand_write: bool) -> int:
        """The shadow PTE for a guest PTE (:func:`.propagate.shadow_leaf_entry`). An
        out-of-sync L1 frame may be mapped writable only for the write that found it
        so (Xen ``_sh_propagate``: ``ft == ft_demand_write && mfn_oos_may_write``)."""
        if not guest_entry_usable(gentry, Level.L1, self.guest_context()):
            return 0
        gfn = GFN(_entry_frame(gentry, self.machine.mem.maxphyaddr))
        mfn = self.domain.mfn_of(gfn)
        if mfn is None:
            return 0
        protect = self.shadows.is_shadowed(gfn) and not (demand_write and gfn in self.oos)
        return shadow_leaf_entry(gentry, mfn, protect)

    def _upper_value(self, gentry: int, level: Level) -> int:
        """The shadow PML4E/PDPTE/PDE for a guest one. The referenced guest table is
        shadowed (write-protected) as soon as the guest entry is present, whether or
        not A is set yet; the link itself waits for A (:mod:`.propagate`)."""
        ctx = self.guest_context()
        if not gentry & PteFlag.P or reserved_bits(gentry, level, ctx) or is_leaf(gentry, level):
            return 0
        child_gfn = GFN(_entry_frame(gentry, ctx.maxphyaddr))
        if self.domain.mfn_of(child_gfn) is None:
            return 0
        child = self.shadow_of(child_gfn, Level(level - 1))
        if not guest_entry_usable(gentry, level, ctx):
            return 0
        return shadow_upper_entry(gentry, child.smfn)

    def _before_link(self, level: Level, child: ShadowPage) -> None:
        """oos.c rule 4: a shadow link makes the child's entries reachable by the
        hardware, so they must not be stale (set.c ``shadow_set_l2e``; multi.c
        ``shadow_get_and_create_l1e``: resync all when an L4/L3 shadow was set)."""
        if not self.oos_enabled:
            return
        if level is Level.L2:
            if child.gfn in self.oos:
                self.resync(child.gfn)
        else:
            self.resync_all()

    # ==== out of sync (oos.c) ====================================================================
    def _may_unsync(self, gfn: GFN) -> bool:
        """``sh_unsync``: only an L1 shadowed at no other level, not already out of sync."""
        return self.oos_enabled and self.shadows.levels_of(gfn) == {Level.L1} and gfn not in self.oos

    def _unsync(self, gfn: GFN) -> None:
        """Lift write protection from L1 ``gfn`` and snapshot it (``sh_unsync`` ->
        ``oos_hash_add``); an evicted occupant is resynced."""
        evicted = self.oos.add(OosPage(gfn, self._mfn(gfn), list(self.guest_entries(gfn))))
        if evicted is not None:
            self._resync_page(evicted)

    def resync(self, gfn: GFN) -> None:
        """Bring one out-of-sync L1 back into sync (``sh_resync``)."""
        page = self.oos.remove(gfn)
        if page is not None:
            self._resync_page(page)

    def resync_all(self) -> None:
        """Every out-of-sync L1 of this vCPU (``shadow_resync_current_vcpu``)."""
        for page in self.oos.pages():
            self.resync(page.gfn)

    def _resync_page(self, page: OosPage) -> None:
        """``_sh_resync``: write-protect the frame again (flushing if a writable
        mapping of it existed), then re-propagate every entry that changed since the
        snapshot (``sh_resync_l1``)."""
        self.counters.add(Event.SHADOW_RESYNC)
        if self.shadows.remove_write_access(page.mfn):
            self.flush_vcpu_tlb()
        shadow = self.shadows.lookup(page.gfn, Level.L1)
        assert shadow is not None, "an out-of-sync page is always shadowed as an L1"
        current = self.guest_entries(page.gfn)
        for index in page.changed(current):
            self.propagate(shadow, index, current[index])

    # ==== the processor ==========================================================================
    def current_root(self) -> ShadowPage:
        """The shadow the hardware CR3 holds (built on first use from the guest's CR3)."""
        if self.root is None:
            self.root = self.shadow_of(GFN(self.guest_state.cr3 >> PAGE_SHIFT), Level.L4)
        return self.root

    def load_cr3(self, root: GFN) -> None:
        """MOV to CR3, intercepted: resync (out-of-sync mode), find or build the shadow
        of the new root, load it — a MOV CR3 on the hardware, which flushes this
        vCPU's non-global translations (SDM 4.10.4.1; Xen ``sh_update_cr3``)."""
        self._mfn(root)
        self.vm_exit(ExitReason.CR3_WRITE)
        if self.oos_enabled:
            self.resync_all()
        self.guest_state = replace(self.guest_state, cr3=root << PAGE_SHIFT)
        self.root = self.shadow_of(root, Level.L4)
        self.mmu.state = hardware_state(self.guest_state, self.root.smfn)
        fault = self.mmu.mov_cr3(self.root.smfn << PAGE_SHIFT)
        if fault is not None:
            raise RefmodelError(f"load_cr3: {fault.reason}")

    def flush_tlb(self) -> None:
        """An HVM guest flushes its TLB by reloading CR3 (trapped)."""
        self.load_cr3(GFN(self.guest_state.cr3 >> PAGE_SHIFT))

    def invlpg(self, va: int) -> None:
        """INVLPG, intercepted: in out-of-sync mode first sync the one shadow entry for
        ``va`` if its L1 is out of sync (oos.c rule 2), then invalidate the page in the
        hardware TLB (Xen ``sh_invlpg``)."""
        self.vm_exit(ExitReason.INVLPG)
        if self.oos_enabled:
            self._sync_one_oos_entry(va)
        self.mmu.state = hardware_state(self.guest_state, self.current_root().smfn)
        self.mmu.invlpg(va)

    def _sync_one_oos_entry(self, va: int) -> None:
        gpa = self.guest_l1e_address(va)
        if gpa is None or frame_of(gpa) not in self.oos:
            return
        shadow = self.shadows.lookup(GFN(frame_of(gpa)), Level.L1)
        assert shadow is not None
        self.propagate(shadow, page_offset(gpa) // ENTRY_SIZE)

    def guest_l1e_address(self, va: int) -> int | None:
        """The guest-physical address of the guest PTE for ``va``, found by reading
        the guest's tables without setting any flag; None if no PTE maps it."""
        ctx = self.guest_context()
        table = ctx.pml4_base
        for level in WALK_LEVELS[:-1]:
            entry = self.guest_mem.read_u64(table + _index(va, level) * ENTRY_SIZE)
            if not entry & PteFlag.P or reserved_bits(entry, level, ctx) or is_leaf(entry, level):
                return None
            table = entry_frame_address(entry, ctx.maxphyaddr)
        return table + _index(va, Level.L1) * ENTRY_SIZE

    # ==== guest accesses and the #PF intercept =========================================================
    def access(self, va: int, kind: AccessKind, cpl: int = 3, value: int = 0) -> int | PageFault:
        """Run the access on the processor over the shadow tables; a #PF is a VM exit
        the hypervisor either reflects to the guest or resolves (then the guest
        retries the instruction)."""
        for _ in range(MAX_FAULT_ROUNDS):
            self.mmu.state = hardware_state(self.guest_state, self.current_root().smfn)
            out = hardware_access(self.mmu, va, kind, cpl, value)
            if not isinstance(out, PageFault):
                return out
            resolved = self.page_fault_exit(va, Access(kind, cpl), value)
            if resolved is not None:
                return resolved
        raise AssertionError(f"shadow: the hidden fault at {va:#x} did not resolve")

    def page_fault_exit(self, va: int, access: Access, value: int) -> int | PageFault | None:
        """Xen ``sh_page_fault``. Walk the guest's tables (setting its A/D flags as the
        processor would) and sync every shadow entry the walk read. Then:

        - the guest walk faults: a true fault, reflected to the guest with the guest
          walk's error code and CR2 (the guest counts it, Event.GUEST_PAGE_FAULT, as
          it receives it);
        - a write to a write-protected page table: PT_WRITE, emulated (out-of-sync
          mode, an L1: unsynced, and the guest retries);
        - an access the shadows cannot carry (a guest 2 MiB page, unbacked memory, a
          supervisor write the guest's CR0.WP = 0 allows): emulated;
        - otherwise a hidden fault: the shadows now allow the access (SHADOW_FILL);
          returns None and the guest retries.
        """
        result = walk(self.guest_mem, self.guest_context(), va, access)
        self._sync_walk(result.entry_addrs, demand_write=access.kind is AccessKind.WRITE)
        outcome = result.outcome
        if isinstance(outcome, PageFault):
            self.vm_exit(ExitReason.PAGE_FAULT)
            self.guest_state = replace(self.guest_state, cr2=outcome.cr2)
            return outcome
        gfn = GFN(frame_of(outcome.pa))
        if access.kind is AccessKind.WRITE and self.write_protected(gfn):
            self.vm_exit(ExitReason.PT_WRITE)
            if self._may_unsync(gfn) and self._shadowable(outcome, access):
                self._unsync(gfn)
                self._sync_leaf_for_write(outcome.leaf_addr)
                return None
            self.counters.add(Event.EMULATED_PT_WRITE)
            return self._emulate_access(outcome, access, value)
        self.vm_exit(ExitReason.PAGE_FAULT)
        if not self._shadowable(outcome, access):
            return self._emulate_access(outcome, access, value)
        self.counters.add(Event.SHADOW_FILL)
        return None

    def _sync_walk(self, entry_addrs: list[int], demand_write: bool) -> None:
        """Propagate each guest entry a walk read (top level first) into every shadow
        of its table — the walk's table at its level is shadowed if it was not yet.

        ``demand_write`` (the fault was a write) propagates the leaf as Xen's
        ``sh_page_fault`` does with ``ft_demand_write``: a target L1 that is already
        out of sync is mapped writable (``_sh_propagate``: ``mfn_oos_may_write``).
        Propagated as for a read, that leaf stays read-only; the frame, out of sync,
        is not write-protected, so the fault counts as hidden and the retry faults
        again without end (issue 16; test_oos_write_fault_maps_the_table_writable)."""
        for level, gpa in zip(WALK_LEVELS, entry_addrs):
            gfn = GFN(frame_of(gpa))
            self.shadow_of(gfn, level)
            self.validate_entry(gfn, page_offset(gpa) // ENTRY_SIZE, demand_write=demand_write and level is Level.L1)

    def _sync_leaf_for_write(self, l1e_gpa: int) -> None:
        """Out-of-sync mode: map the just-unsynced L1 frame writable in the shadow
        PTE the guest's faulting write goes through (``ft_demand_write``)."""
        page = self.shadow_of(GFN(frame_of(l1e_gpa)), Level.L1)
        self.propagate(page, page_offset(l1e_gpa) // ENTRY_SIZE, demand_write=True)

    def _shadowable(self, t: Translation, access: Access) -> bool:
        """Whether a shadow leaf can carry this translation for this access."""
        if t.size is not PageSize.SIZE_4K or self.domain.mfn_of(frame_of(t.pa)) is None:
            return False
        return not (access.kind is AccessKind.WRITE and not t.rights.writable)

    def _emulate_access(self, t: Translation, access: Access, value: int) -> int:
        """The hypervisor performs the guest's access itself, at the guest-physical
        address the guest walk produced (the walk already set the guest's A/D)."""
        if access.kind is AccessKind.WRITE:
            if self.write_protected(frame_of(t.pa)):
                self._emulate_pt_write(t.pa, value)
            else:
                self.guest_mem.write_uint(t.pa, ENTRY_SIZE, value)
            return 0
        if access.kind is AccessKind.FETCH:
            return self.guest_mem.read_uint(t.pa, 1)
        return self.guest_mem.read_uint(t.pa, ENTRY_SIZE)


def _slot(index: int) -> int:
    if not 0 <= index < ENTRIES_PER_TABLE:
        raise RefmodelError(f"entry index {index} is outside 0..{ENTRIES_PER_TABLE - 1}")
    return index * ENTRY_SIZE


def _index(va: int, level: Level) -> int:
    return (va >> level.index_shift) & (ENTRIES_PER_TABLE - 1)


def _entry_frame(entry: int, maxphyaddr: int) -> int:
    return entry_frame_address(entry, maxphyaddr) >> PAGE_SHIFT

