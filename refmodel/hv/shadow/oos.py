"""Out-of-sync L1 tables (Xen xen/arch/x86/mm/shadow/oos.c; KVM "unsync" shadow
pages, Documentation/virt/kvm/x86/mmu.rst).

A guest L1 table that takes a trapped write is *unsynced*: its write protection is
lifted and a snapshot of its contents kept, so the guest's further writes to it are
plain stores. Its shadow is then stale — like a TLB that may hold old translations —
until it is brought back into sync. The rules refmodel follows (oos.c's header comment
and the callers of ``sh_resync``/``sh_resync_all`` in multi.c):

1. Only L1 tables go out of sync, and only a table shadowed at no other level
   (``sh_unsync``); a table about to be shadowed at another level is resynced first.
2. A guest TLB flush — MOV to CR3, which is also how an HVM guest flushes its TLB —
   resyncs every out-of-sync table (``sh_update_cr3`` -> ``shadow_resync_current_vcpu``).
3. INVLPG and a hidden page fault may update the *one* shadow entry they concern
   (and its snapshot slot) without resyncing the table: "the pagefault and invlpg
   handlers may update only one entry on an out-of-sync page without resyncing it"
   (oos.c rule 2; ``sh_page_fault`` updates ``snp[guest_l1_table_offset(va)]``).
   KVM does the same: "We synchronize modified gptes when the guest invokes
   invlpg ... we have to resynchronize all reachable unsynchronized shadow pages on
   a tlb flush" (mmu.rst, "Synchronized and unsynchronized pages"); its invlpg
   handler drops the translation and tries to "reinstantiate" it ("Reaction to
   events"), which is what refmodel does: it re-propagates that one entry.
4. When a shadow PDE starts linking the shadow of an out-of-sync L1, that L1 is
   resynced first (set.c ``shadow_set_l2e``); when a new PML4E/PDPTE link is
   installed, every out-of-sync table is (multi.c ``shadow_get_and_create_l1e``,
   ``validate_gl4e``/``validate_gl3e``: ``shadow_resync_all``). Stale entries never
   become newly reachable by the hardware.
5. A vCPU keeps at most ``SHADOW_OOS_PAGES`` = 3 out-of-sync tables in a small hash;
   unsyncing another evicts (resyncs) an occupant (``oos_hash_add``).

Resync (``_sh_resync``): remove write access again (every writable shadow mapping of
the frame, with a TLB flush if there were any), then re-propagate every entry that
differs from the snapshot (``sh_resync_l1``). This module holds the hash and the
snapshots; the shadow backend performs the resync.
"""

from dataclasses import dataclass

from ...arch.types import GFN, MFN

#: xen/arch/x86/include/asm/mm.h: out-of-sync pages a vCPU may hold.
SHADOW_OOS_PAGES = 3


@dataclass
class OosPage:
    """One out-of-sync guest L1: its frame and the snapshot its shadow reflects."""

    gfn: GFN
    mfn: MFN
    snapshot: list[int]  #: the guest entries as last propagated into the shadow

    def changed(self, current: tuple[int, ...]) -> list[int]:
        """Indices whose guest entry differs from the snapshot."""
        return [i for i, (old, new) in enumerate(zip(self.snapshot, current)) if old != new]


class OosTable:
    """A vCPU's out-of-sync pages: Xen's open-addressed hash with a second chance
    (slot ``mfn % SHADOW_OOS_PAGES``, else the next one)."""

    def __init__(self, nslots: int = SHADOW_OOS_PAGES) -> None:
        self._slots: list[OosPage | None] = [None] * nslots

    def __contains__(self, gfn: object) -> bool:
        return self.find(gfn) is not None

    def find(self, gfn: object) -> OosPage | None:
        return next((p for p in self._slots if p is not None and p.gfn == gfn), None)

    def pages(self) -> list[OosPage]:
        return [p for p in self._slots if p is not None]

    def add(self, page: OosPage) -> OosPage | None:
        """Insert ``page``; returns the occupant it evicts, which the caller must
        resync (``oos_hash_add``: a page found in its home slot is punted to the next
        slot to make room; whatever occupies the slot finally used is "crushed")."""
        n = len(self._slots)
        idx = page.mfn % n
        occupant = self._slots[idx]
        if occupant is not None and occupant.mfn % n == idx:
            self._slots[idx], page = page, occupant
            idx = (idx + 1) % n
        evicted = self._slots[idx]
        self._slots[idx] = page
        return evicted

    def remove(self, gfn: GFN) -> OosPage | None:
        for i, p in enumerate(self._slots):
            if p is not None and p.gfn == gfn:
                self._slots[i] = None
                return p
        return None
