"""Events the model counts. Events are data: every layer adds to a
:class:`Counters`; nothing prints.

The names follow what the literature measures (Adams & Agesen, ASPLOS 2006; Barham
et al., SOSP 2003): VM exits by reason, hypercalls and the entries they carry,
emulated page-table writes, TLB flushes by kind, TLB hits and misses, page-walk
memory references, context switches.
"""

import enum
from collections import Counter


class Event(enum.Enum):
    """Every countable event, grouped by layer."""

    # TLB and walks (SDM 4.10)
    TLB_HIT = "tlb_hit"
    TLB_MISS = "tlb_miss"
    WALK_REF = "walk_ref"  #: one paging-structure (or EPT) entry read by a walk
    TLB_FLUSH_FULL = "tlb_flush_full"  #: every entry of a tag set (CR3 load, CR4 change, all-context)
    TLB_FLUSH_SINGLE = "tlb_flush_single"  #: one page (INVLPG, INVPCID type 0)
    TLB_FLUSH_PCID = "tlb_flush_pcid"  #: one PCID (INVPCID type 1, CR3 load with PCIDs)
    TLB_FLUSH_VPID = "tlb_flush_vpid"  #: one VPID (INVVPID, VM switch with tags)
    TLB_FLUSH_GLOBAL = "tlb_flush_global"  #: everything, global entries included
    GUEST_PAGE_FAULT = "guest_page_fault"  #: #PF delivered to the guest
    # Hypervisor
    VM_EXIT = "vm_exit"  #: any exit; the reason is counted separately (below)
    HYPERCALL = "hypercall"
    HYPERCALL_ENTRY = "hypercall_entry"  #: one request inside a batched hypercall
    EMULATED_PT_WRITE = "emulated_pt_write"  #: a trapped guest page-table store, emulated
    SHADOW_FILL = "shadow_fill"  #: a hidden fault that filled a shadow entry
    SHADOW_RESYNC = "shadow_resync"  #: an out-of-sync page table resynchronised
    EPT_WALK_REF = "ept_walk_ref"  #: an EPT entry read during a 2-D walk
    INVEPT = "invept"  #: INVEPT single-context: a domain's combined (GVA -> MPA) translations dropped
    EPT_SPLIT = "ept_split"  #: a 2 MiB or 1 GiB EPT leaf split into a table of smaller ones
    CONTEXT_SWITCH = "context_switch"  #: a vCPU switch on the physical CPU
    WORLD_SWITCH = "world_switch"  #: a switch between two domains


class ExitReason(enum.Enum):
    """VM-exit reasons the model raises (names after SDM Vol. 3C App. C)."""

    PAGE_FAULT = "page_fault"  #: #PF intercepted (shadow paging: hidden or reflected)
    PT_WRITE = "pt_write"  #: write to a write-protected guest page table (a #PF exit)
    CR3_WRITE = "cr3_write"  #: MOV to CR3 intercepted
    INVLPG = "invlpg"  #: INVLPG intercepted
    EPT_VIOLATION = "ept_violation"
    EPT_MISCONFIG = "ept_misconfig"  #: an EPT entry with a reserved setting (SDM Vol. 3C 29.3.3.1)
    HYPERCALL = "hypercall"  #: VMCALL / PV syscall into the hypervisor
    HLT = "hlt"


class Counters:
    """A bag of counts: events and VM exits by reason."""

    def __init__(self) -> None:
        self.events: Counter[Event] = Counter()
        self.exits: Counter[ExitReason] = Counter()

    def add(self, event: Event, n: int = 1) -> None:
        if n:
            self.events[event] += n

    def exit(self, reason: ExitReason) -> None:
        """Count one VM exit for ``reason``."""
        self.exits[reason] += 1
        self.events[Event.VM_EXIT] += 1

    def copy(self) -> "Counters":
        out = Counters()
        out.events = Counter(self.events)
        out.exits = Counter(self.exits)
        return out

    def since(self, earlier: "Counters") -> "Counters":
        """What was counted after ``earlier`` (a :meth:`copy` taken before)."""
        out = Counters()
        out.events = self.events - earlier.events
        out.exits = self.exits - earlier.exits
        return out

    def __getitem__(self, event: Event) -> int:
        return self.events[event]

    def merged(self, other: "Counters") -> "Counters":
        out = Counters()
        out.events = self.events + other.events
        out.exits = self.exits + other.exits
        return out

    def as_dict(self) -> dict[str, int]:
        """Flat, sorted mapping for reports and traces."""
        d = {e.value: n for e, n in self.events.items() if n}
        d.update({f"exit.{r.value}": n for r, n in self.exits.items() if n})
        return dict(sorted(d.items()))


#: What each event counts, in one line: the meaning of each counter name in a trace
#: (docs/oracle.md, "Counters", and the trace schema list the same words).
EVENT_MEANINGS: dict[Event, str] = {
    Event.TLB_HIT: "an access found its translation in the TLB",
    Event.TLB_MISS: "an access found no translation in the TLB and walked the paging structures",
    Event.WALK_REF: "one paging-structure entry read by a walk (a guest entry during a 2-D walk)",
    Event.TLB_FLUSH_FULL: "every entry of a tag set dropped (a CR3 load, a CR4 change, an all-context flush)",
    Event.TLB_FLUSH_SINGLE: "the entries of one page dropped (INVLPG, INVPCID type 0)",
    Event.TLB_FLUSH_PCID: "the entries of one PCID dropped (INVPCID type 1, a CR3 load with PCIDs)",
    Event.TLB_FLUSH_VPID: "the entries of one VPID dropped (INVVPID, a VM switch with tags)",
    Event.TLB_FLUSH_GLOBAL: "every entry dropped, global ones included",
    Event.GUEST_PAGE_FAULT: "a #PF delivered to the guest (or, natively, raised)",
    Event.VM_EXIT: "a VM exit of any reason (the reason is counted as `exit.<reason>`)",
    Event.HYPERCALL: "a PV hypercall: one entry into the hypervisor",
    Event.HYPERCALL_ENTRY: "one request inside a hypercall (an mmu_update request, an mmuext_op, a multicall entry)",
    Event.EMULATED_PT_WRITE: "a trapped guest page-table store, emulated by the hypervisor (shadow paging)",
    Event.SHADOW_FILL: "a hidden fault that filled a shadow entry (shadow paging)",
    Event.SHADOW_RESYNC: "an out-of-sync guest page table brought back in sync with its shadow",
    Event.EPT_WALK_REF: "one EPT entry read during a 2-D walk",
    Event.INVEPT: "INVEPT single-context: a domain's combined (linear to machine) translations dropped",
    Event.EPT_SPLIT: "a 2 MiB or 1 GiB EPT leaf split into a table of smaller ones",
    Event.CONTEXT_SWITCH: "a vCPU switch on the physical CPU",
    Event.WORLD_SWITCH: "a switch between two domains",
}

#: What each VM-exit reason means (counter name ``exit.<reason>``).
EXIT_MEANINGS: dict[ExitReason, str] = {
    ExitReason.PAGE_FAULT: "a #PF intercepted (shadow paging: a hidden fault or one reflected to the guest)",
    ExitReason.PT_WRITE: "a store to a write-protected guest page table (a #PF exit)",
    ExitReason.CR3_WRITE: "MOV to CR3 intercepted",
    ExitReason.INVLPG: "INVLPG intercepted",
    ExitReason.EPT_VIOLATION: "an EPT violation: the EPT does not allow the access",
    ExitReason.EPT_MISCONFIG: "an EPT entry with a reserved setting (SDM Vol. 3C 29.3.3.1)",
    ExitReason.HYPERCALL: "VMCALL or a PV hypercall into the hypervisor",
    ExitReason.HLT: "HLT",
}


def counter_meanings() -> dict[str, str]:
    """Every counter name a trace may record, with its meaning, in a stable order:
    the events, then ``exit.<reason>`` for every exit reason."""
    out = {e.value: EVENT_MEANINGS[e] for e in Event}
    out.update({f"exit.{r.value}": EXIT_MEANINGS[r] for r in ExitReason})
    return out
