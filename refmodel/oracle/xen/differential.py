"""The real-Xen differential run: one program, run by the PV test kernel under Xen
4.17 (QEMU TCG) and checked against the model with the oracle's rules.

1. :func:`.generate.generate` writes a program in dom0's own frame numbers.
2. :func:`.boot.boot` runs it: the kernel prints dom0's P2M, its boot page tables
   and one result per operation.
3. :func:`recorded_trace` turns program and boot into an oracle trace: the
   operations with machine frames (the kernel's translation, :mod:`.program`), each
   with what Xen did as its observation, and a header that starts the model where
   Xen's boot left dom0 (:mod:`.layout`).
4. :func:`refmodel.oracle.check.check` compares: every return value and done count,
   every multicall result, every value read (page-table entries read back included,
   so the bits Xen itself sets are compared) and every fault with its CR2 and error
   code, allowing any behaviour the SDM allows a TLB.

A divergence is a trace file that ``refmodel check`` reproduces without Xen.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ...errors import RefmodelError
from ..check import CheckResult, check
from ..trace import (
    Fetch,
    MmuextOp,
    MmuUpdate,
    Multicall,
    Observation,
    Op,
    Read,
    Result,
    Step,
    Trace,
    UpdateVaMapping,
    Write,
    dump_trace,
    gp_obs,
    ok,
    page_fault_obs,
)
from .boot import BootRecord, OpResult, boot
from .generate import generate
from .layout import dom0_header
from .program import encode, to_machine


class XenDivergence(RefmodelError):
    """Xen and the model disagree; the message names the operation and where the
    replayable trace was written."""


def observation(op: Op, res: OpResult) -> Observation:
    """What the kernel printed for ``op``, as an oracle observation."""
    if isinstance(op, (MmuUpdate, MmuextOp)):
        return Observation(Result.OK, ret=res.ret, done=res.done)
    if isinstance(op, UpdateVaMapping):
        return Observation(Result.OK, ret=res.ret)
    if isinstance(op, Multicall):
        return Observation(Result.OK, ret=res.ret, results=tuple(res.results or ()))
    assert isinstance(op, (Read, Write, Fetch))
    if res.outcome == "pf":
        assert res.cr2 is not None and res.error_code is not None
        return page_fault_obs(res.cr2, res.error_code)
    if res.outcome == "gp":
        return gp_obs(res.error_code or 0)
    return ok(res.value) if isinstance(op, Read) else ok()


def recorded_trace(program: Sequence[Op], record: BootRecord, name: str = "") -> Trace:
    """The program as Xen ran it: machine frames, Xen's observations, dom0's boot state."""
    if len(record.results) != len(program) and record.aborted is None:
        raise RefmodelError(f"the kernel reported {len(record.results)} results for {len(program)} operations")
    layout = record.layout()
    fmap = layout.frame_map()
    steps = tuple(
        Step(op=to_machine(op, fmap), obs=observation(op, res), note=f"program operation {i}")
        for i, (op, res) in enumerate(zip(program, record.results))
    )
    header = dom0_header(layout, name=name, description="dom0 under Xen 4.17 (QEMU TCG), recorded by refmodel.oracle.xen")
    return Trace(header, steps)


@dataclass(frozen=True)
class RunResult:
    seed: int
    operations: int
    check: CheckResult
    trace: Trace


def run_program(seed: int, program: Sequence[Op], timeout: float = 300) -> RunResult:
    """Boot Xen with ``program`` and check what it did against the model. If the
    kernel stopped early (an operation the generator believed safe was not, because
    Xen had already gone another way), the operations it finished are checked: the
    divergence that led there is the finding; with none, the stop itself is."""
    record = boot(encode(program), timeout=timeout, allow_abort=True)
    trace = recorded_trace(program, record, name=f"xen-differential seed {seed}")
    result = check(trace)
    if result.clean and record.aborted is not None:
        raise XenDivergence(
            f"seed {seed}: the test kernel stopped after {len(record.results)} of {len(program)} operations "
            f"({record.aborted}) although Xen and the model agreed on all of them"
        )
    return RunResult(seed, len(record.results), result, trace)


def run_seed(seed: int, n_ops: int, timeout: float = 300) -> RunResult:
    return run_program(seed, generate(seed, n_ops), timeout)


def save_divergence(result: RunResult, directory: str | os.PathLike[str]) -> Path:
    """Write the recorded trace of a divergent run, for ``refmodel check``."""
    path = Path(directory) / f"xen-divergence-seed{result.seed}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_trace(result.trace))
    return path
