"""Record a trace on QEMU's MMU (through unicorn) and check it: the worked example of
another implementation tested against refmodel without sharing its code.

:mod:`refmodel.oracle.unicorn_adapter` runs accesses, INVLPG, MOV CR3 and physical
stores on unicorn's x86-64 CPU (QEMU's softmmu and page walker). This module
translates a core trace's operations into those steps (:func:`to_unicorn`), runs
them, and writes what QEMU observed into the trace's ``obs`` fields
(:func:`record`). ``refmodel check`` then compares QEMU with the model, the TLB's
freedom included: QEMU flushes global entries on MOV CR3 and re-walks a write to a
clean page, both of which the architecture allows.

Workflow (docs/oracle.md)::

    refmodel fixtures --out fx
    python -m refmodel.oracle.unicorn_record fx/core/tlb/remap-then-invlpg.jsonl > qemu.jsonl
    refmodel check qemu.jsonl

What unicorn cannot express is reported by :func:`obstacle` (and such a trace is
refused): a mode other than native, MAXPHYADDR other than 40, 1 GiB pages switched
off, control-register bits the harness does not set (CR4.PCIDE, CR0.AM ...), a
vCPU at CPL 1 or 2, accesses that are not 8 bytes or are implicit, register writes
and INVPCID in the middle of a run, privileged operations at CPL 3, and anything
that touches the harness's reservations (PML4 slot 511, the top MiB of memory).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..arch.control import Cr0, Cr4, Efer, Rflags
from ..arch.types import ENTRY_SIZE, PAGE_SHIFT, PAGE_SIZE
from ..errors import RefmodelError
from ..guest.ops import Mode
from .trace import (
    Fetch,
    Invlpg,
    Observation,
    Op,
    PhysWrite,
    PteWrite,
    Read,
    Register,
    RegWrite,
    Trace,
    Write,
    dump_trace,
    gp_obs,
    load_trace,
    ok,
    op_name,
    page_fault_obs,
)

try:
    from .unicorn_adapter import (
        HARNESS_FRAME_BASE,
        HARNESS_PML4_SLOT,
        HARNESS_VA_BASE,
        MAXPHYADDR,
        UcAccess,
        UcAccessKind,
        UcInvlpg,
        UcMachine,
        UcMovCr3,
        UcPhysWrite,
        UcResult,
        UcRun,
        UcStep,
        run_on_unicorn,
    )
except ModuleNotFoundError as _missing:
    # Run as a program without unicorn (an optional dependency): say so in one line
    # instead of a traceback. Imported as a library, the error propagates as usual.
    if __name__ != "__main__" or _missing.name not in ("unicorn", "unicorn.x86_const"):
        raise
    print("python -m refmodel.oracle.unicorn_record: error: needs unicorn, an optional dependency: "
          "pip install 'refmodel[test]' (or pip install unicorn)", file=sys.stderr)
    sys.exit(2)

#: Register bits the harness reproduces (it sets PE, PG, PAE, LME, LMA itself).
CR0_EXPRESSIBLE = int(Cr0.PE | Cr0.PG | Cr0.WP | Cr0.ET | Cr0.NE | Cr0.MP)
CR4_EXPRESSIBLE = int(Cr4.PAE | Cr4.PGE | Cr4.SMEP | Cr4.SMAP)
EFER_EXPRESSIBLE = int(Efer.SCE | Efer.LME | Efer.LMA | Efer.NXE)
RFLAGS_EXPRESSIBLE = int(Rflags.FIXED1 | Rflags.AC)
#: CR3 bits MOV CR3 may carry without PCIDs: PWT, PCD and the PML4 address.
CR3_EXPRESSIBLE = ((1 << MAXPHYADDR) - 1) & ~0xFFF | 0x18
#: Offset of the harness's own PML4 entry in every frame used as a PML4.
HARNESS_SLOT_OFFSET = HARNESS_PML4_SLOT * ENTRY_SIZE


@dataclass(frozen=True)
class UnicornRun:
    """A trace as unicorn steps: initial memory, control state, and one step per
    trace operation, in order."""

    memory: dict[int, bytes]
    machine: UcMachine
    steps: tuple[UcStep, ...]


def obstacle(trace: Trace) -> str | None:
    """Why unicorn_adapter cannot run ``trace`` (None if it can)."""
    try:
        to_unicorn(trace)
    except RefmodelError as err:
        return str(err)
    return None


def _header_obstacle(trace: Trace) -> str | None:
    h = trace.header
    if h.mode is not Mode.NATIVE:
        return f"mode {h.mode.value}: unicorn_adapter runs bare-metal paging only"
    if h.maxphyaddr != MAXPHYADDR:
        return f"MAXPHYADDR {h.maxphyaddr}: QEMU's CPU has {MAXPHYADDR}"
    if not h.page1gb:
        return "1 GiB pages cannot be switched off in QEMU's CPU model"
    v = h.vcpus[0]
    for name, value, allowed in (
        ("CR0", v.cr0, CR0_EXPRESSIBLE), ("CR4", v.cr4, CR4_EXPRESSIBLE),
        ("EFER", v.efer, EFER_EXPRESSIBLE), ("RFLAGS", v.rflags, RFLAGS_EXPRESSIBLE), ("CR3", v.cr3, CR3_EXPRESSIBLE),
    ):
        if value & ~allowed:
            return f"{name} bits {value & ~allowed:#x} are not set by the harness"
    if v.cpl not in (0, 3):
        return f"CPL {v.cpl}: the harness runs at CPL 0 or 3"
    for frame, _ in h.memory:
        if frame >= HARNESS_FRAME_BASE:
            return f"frame {frame:#x} is in the harness's reserved memory"
    return None


def _pml4_frames(trace: Trace) -> set[int]:
    frames = {trace.header.vcpus[0].cr3 >> PAGE_SHIFT}
    frames.update(op.value >> PAGE_SHIFT for op in trace.ops if isinstance(op, RegWrite) and op.reg is Register.CR3)
    return frames


def to_unicorn(trace: Trace) -> UnicornRun:
    """The unicorn steps for ``trace``; :class:`RefmodelError` names what cannot be
    expressed."""
    problem = _header_obstacle(trace)
    if problem is not None:
        raise RefmodelError(problem)
    pml4s = _pml4_frames(trace)
    memory = dict(trace.header.memory)
    for frame in pml4s:
        data = memory.get(frame, bytes(PAGE_SIZE))
        if any(data[HARNESS_SLOT_OFFSET:]):
            raise RefmodelError(f"PML4 frame {frame:#x} uses slot {HARNESS_PML4_SLOT}, which the harness owns")
    v = trace.header.vcpus[0]
    machine = UcMachine(
        cr3=v.cr3, cr0_wp=bool(v.cr0 & Cr0.WP), efer_nxe=bool(v.efer & Efer.NXE), cr4_smep=bool(v.cr4 & Cr4.SMEP),
        cr4_smap=bool(v.cr4 & Cr4.SMAP), cr4_pge=bool(v.cr4 & Cr4.PGE), rflags_ac=bool(v.rflags & Rflags.AC),
    )
    steps: list[UcStep] = []
    for index, op in enumerate(trace.ops):
        steps.append(_step(op, v.cpl, pml4s, index))
    return UnicornRun(memory, machine, tuple(steps))


def _step(op: Op, cpl: int, pml4s: set[int], index: int) -> UcStep:
    where = f"operation {index} ({op_name(op)})"
    if isinstance(op, (Read, Write, Fetch)):
        effective = cpl if op.cpl is None else op.cpl
        if effective not in (0, 3):
            raise RefmodelError(f"{where}: CPL {effective}: the harness runs at CPL 0 or 3")
        if not isinstance(op, Fetch) and (op.size != 8 or op.implicit):
            raise RefmodelError(f"{where}: the harness makes explicit 8-byte loads and stores only")
        if op.va >= HARNESS_VA_BASE:
            raise RefmodelError(f"{where}: {op.va:#x} is in the harness's PML4 slot")
        kind = UcAccessKind.READ if isinstance(op, Read) else UcAccessKind.WRITE if isinstance(op, Write) else UcAccessKind.FETCH
        return UcAccess(kind, op.va, effective, op.value if isinstance(op, Write) else 0)
    if isinstance(op, (PhysWrite, PteWrite)):
        pa = op.pa if isinstance(op, PhysWrite) else (op.table << PAGE_SHIFT) + op.index * ENTRY_SIZE
        if isinstance(op, PhysWrite) and (op.size != 8 or op.pa % 8):
            raise RefmodelError(f"{where}: the harness stores aligned 8-byte values only")
        if pa >> PAGE_SHIFT in pml4s and pa % PAGE_SIZE == HARNESS_SLOT_OFFSET:
            raise RefmodelError(f"{where}: writes the harness-owned PML4 slot {HARNESS_PML4_SLOT}")
        if pa >> PAGE_SHIFT >= HARNESS_FRAME_BASE:
            raise RefmodelError(f"{where}: writes the harness's reserved memory")
        return UcPhysWrite(pa, op.value)
    if cpl != 0:
        raise RefmodelError(f"{where}: privileged at CPL {cpl}; the harness runs it at CPL 0")
    if isinstance(op, Invlpg):
        if op.va >= HARNESS_VA_BASE:
            raise RefmodelError(f"{where}: {op.va:#x} is in the harness's PML4 slot")
        return UcInvlpg(op.va)
    if isinstance(op, RegWrite) and op.reg is Register.CR3:
        if op.value & ~CR3_EXPRESSIBLE or op.value >> PAGE_SHIFT >= HARNESS_FRAME_BASE:
            raise RefmodelError(f"{where}: CR3 {op.value:#x} is not a PCID-less PML4 address the harness accepts")
        return UcMovCr3(op.value)
    raise RefmodelError(f"{where}: unicorn_adapter cannot run '{op_name(op)}' in the middle of a run")


def observation(op: Op, result: UcResult | None) -> Observation:
    """What QEMU showed for one operation. A fetch's byte is not read by the
    harness (it stops before decoding), so a fetch records no value."""
    if result is None:
        return ok()
    if result.kind == "page_fault":
        return page_fault_obs(result.cr2, result.error_code)
    if result.kind == "gp":
        return gp_obs(result.error_code)
    return ok(result.value) if isinstance(op, Read) else ok()


def with_observations(trace: Trace, run: UnicornRun, uc: UcRun) -> Trace:
    """``trace`` with each operation's ``obs`` taken from unicorn's results (one
    result per access, in order) and no ``allowed`` lists."""
    results = iter(uc.results)
    steps = []
    for step, uc_step in zip(trace.steps, run.steps):
        result = next(results) if isinstance(uc_step, UcAccess) else None
        steps.append(replace(step, obs=observation(step.op, result), allowed=()))
    return replace(trace, steps=tuple(steps))


def record(trace: Trace) -> Trace:
    """Run ``trace`` on unicorn and return it with QEMU's observations."""
    run = to_unicorn(trace)
    return with_observations(trace, run, run_on_unicorn(run.memory, run.machine, run.steps))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m refmodel.oracle.unicorn_record TRACE``: print the trace with
    QEMU's observations (JSON Lines) on stdout."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args in (["-h"], ["--help"]):
        print(USAGE)
        print("Print TRACE (a refmodel trace; - for standard input) with the observations QEMU's MMU makes, "
              "through unicorn, as JSON Lines on stdout; then `refmodel check` compares them with the model.")
        return 0
    if len(args) != 1 or (args[0].startswith("-") and args[0] != "-"):
        print(f"{PROG}: error: expected one argument, TRACE ({USAGE})", file=sys.stderr)
        return 2
    try:
        print(dump_trace(record(load_trace(args[0]))), end="")
    except RefmodelError as err:
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


PROG = "python -m refmodel.oracle.unicorn_record"
USAGE = f"usage: {PROG} TRACE"


if __name__ == "__main__":
    sys.exit(main())
