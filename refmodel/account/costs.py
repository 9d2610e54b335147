"""The cost table: cycles per counted event, every figure with its source.

The default table prices trap-and-emulate with the nanobenchmarks of Adams &
Agesen, "A Comparison of Software and Hardware Techniques for x86 Virtualization",
ASPLOS 2006 (a Pentium 4 672 / Prescott-class machine, first-generation VT-x), and
TLB maintenance with figures from Linux's arch/x86/mm/tlb.c discussion (Skylake).
It is a mixture of generations, on purpose and stated: the point is the *ratio*
between "a trap per page-table write" and "a hypercall per batch", which these
figures make comparable. Figures quoted from a paper by another source are marked
``secondary``; figures that are a stand-in for something nobody measured directly
are marked ``proxy`` and say what they stand in for. Load your own figures with
:meth:`CostTable.with_overrides` / ``refmodel compare --costs FILE.json``.
"""

import enum
import json
import math
import os
from dataclasses import dataclass, replace

from ..errors import RefmodelError
from ..inputs import display_name, read_input
from .events import Counters, Event


@dataclass(frozen=True)
class Cost:
    """Cycles for one event, and where the figure comes from."""

    cycles: float
    source: str
    secondary: bool = False
    proxy: str = ""  #: non-empty: what this figure stands in for


GENERATION = "Pentium 4 (Prescott) / first-generation VT-x trap costs; Skylake-class TLB costs"

ADAMS_AGESEN = "Adams & Agesen, ASPLOS 2006, nanobenchmarks"

DEFAULT_COSTS: dict[Event, Cost] = {
    Event.VM_EXIT: Cost(
        1926, "Bugnion, Nieh & Tsafrir, Hardware and Software Support for Virtualization, Table 4.3 (Prescott round trip)",
        secondary=True,
    ),
    Event.EMULATED_PT_WRITE: Cost(
        12733 - 1926, f"{ADAMS_AGESEN}: ptemod under hardware VMM 12,733 minus the exit round trip",
        secondary=True,
    ),
    Event.SHADOW_FILL: Cost(
        11242 - 1093 - 1926,
        f"{ADAMS_AGESEN}: page fault under hardware VMM 11,242 minus native 1,093 minus the exit round trip",
        secondary=True,
    ),
    Event.SHADOW_RESYNC: Cost(
        12733 - 1926, f"{ADAMS_AGESEN}: as one emulated page-table write", secondary=True,
        proxy="re-propagating an out-of-sync L1 table (nobody published this figure)",
    ),
    Event.GUEST_PAGE_FAULT: Cost(1093, f"{ADAMS_AGESEN}: native page fault", secondary=True),
    Event.HYPERCALL: Cost(
        1080, "Barham et al., SOSP 2003, lmbench null call 0.45 us at 2.4 GHz", secondary=True,
        proxy="a PV hypercall: a trap into ring 0 like a system call",
    ),
    Event.HYPERCALL_ENTRY: Cost(
        391, f"{ADAMS_AGESEN}: ptemod under the software VMM (no trap)", secondary=True,
        proxy="Xen validating and applying one mmu_update request",
    ),
    Event.TLB_FLUSH_SINGLE: Cost(350, "LKML 2017-12-05 (INVLPG on Skylake); Linux arch/x86/mm/tlb.c"),
    Event.TLB_FLUSH_PCID: Cost(
        350, "LKML 2017-12-05", proxy="the direct cost of a CR3 reload; the refill is priced as misses"
    ),
    Event.TLB_FLUSH_FULL: Cost(350, "LKML 2017-12-05", proxy="the direct cost of a full flush; refill priced as misses"),
    Event.TLB_FLUSH_VPID: Cost(350, "LKML 2017-12-05", proxy="INVVPID single context; refill priced as misses"),
    Event.TLB_FLUSH_GLOBAL: Cost(350, "LKML 2017-12-05", proxy="a flush of everything; refill priced as misses"),
    Event.WALK_REF: Cost(
        14, "Intel 64 and IA-32 Optimization Reference Manual (Skylake L2 hit latency)",
        proxy="one paging-structure read hitting the L2 cache",
    ),
    Event.EPT_WALK_REF: Cost(
        14, "Intel 64 and IA-32 Optimization Reference Manual (Skylake L2 hit latency)",
        proxy="one EPT entry read hitting the L2 cache",
    ),
    Event.WORLD_SWITCH: Cost(
        2409, f"{ADAMS_AGESEN}, Table 1: VM entry on a Pentium 4 672", secondary=True,
        proxy="switching the physical CPU to another domain's vCPU",
    ),
    Event.CONTEXT_SWITCH: Cost(0, "counted for information; a vCPU switch is priced as WORLD_SWITCH"),
    Event.TLB_HIT: Cost(0, "a TLB hit adds no cycles to a load"),
    Event.TLB_MISS: Cost(0, "priced through WALK_REF / EPT_WALK_REF"),
}


class Cause(enum.Enum):
    """What the estimated cycles are spent on: the candidate answers of the seed
    question (the traps, the TLB flushes, the context switch) made into columns."""

    EXITS = "exits + handling"  #: the VM exit round trip, and a hidden fault's fill
    EMULATION = "emulation"  #: emulating a trapped page-table write, resyncing an out-of-sync table
    HYPERCALLS = "hypercalls"  #: PV hypercalls and the requests they carry
    FLUSHES = "flushes"  #: the direct cost of invalidating TLB entries (the refill is walks)
    WALKS = "TLB misses"  #: the page walks of TLB misses: guest and EPT entry references
    SWITCHES = "world switches"  #: putting another domain's vCPU on the physical CPU
    GUEST_FAULTS = "guest #PF"  #: page faults the guest takes and handles itself, as on bare metal


#: The cause of every event (every :class:`Event` has one; most cost nothing).
CAUSE_OF: dict[Event, Cause] = {
    Event.VM_EXIT: Cause.EXITS,
    Event.SHADOW_FILL: Cause.EXITS,
    Event.EPT_SPLIT: Cause.EXITS,
    Event.EMULATED_PT_WRITE: Cause.EMULATION,
    Event.SHADOW_RESYNC: Cause.EMULATION,
    Event.HYPERCALL: Cause.HYPERCALLS,
    Event.HYPERCALL_ENTRY: Cause.HYPERCALLS,
    Event.TLB_FLUSH_FULL: Cause.FLUSHES,
    Event.TLB_FLUSH_SINGLE: Cause.FLUSHES,
    Event.TLB_FLUSH_PCID: Cause.FLUSHES,
    Event.TLB_FLUSH_VPID: Cause.FLUSHES,
    Event.TLB_FLUSH_GLOBAL: Cause.FLUSHES,
    Event.INVEPT: Cause.FLUSHES,
    Event.TLB_HIT: Cause.WALKS,
    Event.TLB_MISS: Cause.WALKS,
    Event.WALK_REF: Cause.WALKS,
    Event.EPT_WALK_REF: Cause.WALKS,
    Event.WORLD_SWITCH: Cause.SWITCHES,
    Event.CONTEXT_SWITCH: Cause.SWITCHES,
    Event.GUEST_PAGE_FAULT: Cause.GUEST_FAULTS,
}


@dataclass(frozen=True)
class CostTable:
    """Cycles per event; events not in the table cost nothing (and are listed as such)."""

    costs: dict[Event, Cost]
    generation: str = GENERATION

    @staticmethod
    def default() -> "CostTable":
        return CostTable(dict(DEFAULT_COSTS))

    def cycles(self, counters: Counters) -> float:
        """Estimated cycles for everything counted."""
        return sum(self.cost_of(e) * n for e, n in counters.events.items())

    def cost_of(self, event: Event) -> float:
        c = self.costs.get(event)
        return c.cycles if c is not None else 0.0

    def breakdown(self, counters: Counters) -> dict[Event, float]:
        """Cycles per event kind, largest first."""
        parts = {e: self.cost_of(e) * n for e, n in counters.events.items() if self.cost_of(e) * n}
        return dict(sorted(parts.items(), key=lambda kv: -kv[1]))

    def by_cause(self, counters: Counters) -> dict[Cause, float]:
        """Cycles per :class:`Cause`, every cause present (0 if nothing was spent on
        it), in the order of the enum; they add up to :meth:`cycles`."""
        parts = {cause: 0.0 for cause in Cause}
        for event, n in counters.events.items():
            parts[CAUSE_OF[event]] += self.cost_of(event) * n
        return parts

    def with_overrides(self, path: str | os.PathLike[str]) -> "CostTable":
        """Replace figures from a JSON file ``{"event_name": cycles | {"cycles": n,
        "source": "..."}}`` (``-``: standard input); event names are :class:`Event`
        values (e.g. ``"vm_exit"``). Unknown names, duplicate names, and figures that
        are not finite numbers in 0..:data:`MAX_CYCLES` are errors."""
        name = display_name(path)
        raw = _load_cost_json(read_input(path, "cost file", limit=MAX_COST_FILE_BYTES), name)
        if not isinstance(raw, dict):
            raise RefmodelError(f"cost file {name}: expected an object of event -> cycles")
        costs = dict(self.costs)
        names = {e.value: e for e in Event}
        for key, spec in raw.items():
            if key not in names:
                raise RefmodelError(f"cost file {name}: unknown event {key!r}; known: {', '.join(sorted(names))}")
            if isinstance(spec, dict):
                cycles, source = spec.get("cycles"), str(spec.get("source", f"user file {name}"))
            else:
                cycles, source = spec, f"user file {name}"
            if (
                isinstance(cycles, bool) or not isinstance(cycles, (int, float))
                or not 0 <= cycles <= MAX_CYCLES or not math.isfinite(cycles)
            ):
                raise RefmodelError(
                    f"cost file {name}: {key}: cycles must be a number in 0..{MAX_CYCLES:.0e}, got {_shown(cycles)}"
                )
            costs[names[key]] = Cost(float(cycles), source)
        return replace(self, costs=costs, generation=f"{self.generation}, overridden from {name}")


#: A cost file is a small JSON object; anything larger is refused unread.
MAX_COST_FILE_BYTES = 1 << 20
#: The largest figure a cost file may give one event (a trillion cycles, minutes of
#: CPU time): larger ones are typing mistakes, and would overflow the sums.
MAX_CYCLES = 1e12


def _shown(value: object) -> str:
    """A value for an error message, shortened to one readable line."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise _CostJsonError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _no_constant(word: str) -> object:
    raise _CostJsonError(f"{word} is not a number JSON allows")


class _CostJsonError(ValueError):
    """A cost file that is JSON to Python's lenient parser but not to the standard."""


def _load_cost_json(data: bytes, name: str) -> object:
    """Parse a cost file strictly: UTF-8, standard JSON (no NaN or Infinity), no
    duplicate keys; every problem is one :class:`RefmodelError` line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RefmodelError(f"cost file {name}: not UTF-8 text (byte {err.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as err:
        raise RefmodelError(f"cost file {name}: invalid JSON at line {err.lineno}: {err.msg}") from None
    except _CostJsonError as err:
        raise RefmodelError(f"cost file {name}: {err}") from None
    except RecursionError:
        raise RefmodelError(f"cost file {name}: invalid JSON: nested too deeply") from None
    except ValueError as err:  # e.g. an integer with more digits than Python converts
        raise RefmodelError(f"cost file {name}: invalid JSON: {str(err).splitlines()[0]}") from None
