"""The program a PV test kernel runs under real Xen: oracle trace operations in the
guest's own frame numbers, encoded for the kernel's boot module.

A *program* is a sequence of :mod:`refmodel.oracle.trace` operations (``mmu_update``,
``mmuext_op``, ``update_va_mapping``, ``multicall``, ``read``, ``write``, ``fetch``)
whose frame numbers are *program frames* rather than machine frames, because the
machine frames Xen gives dom0 are known only once it has booted:

- ``0 <= f < nr_pages``: guest frame ``f`` (a pfn; the kernel looks it up in the P2M
  that ``start_info.mfn_list`` gives);
- ``FOREIGN_BASE + k`` (``k < NR_FOREIGN``): the k-th RAM frame that dom0 does not
  own (Xen's heap or free memory), chosen by the kernel at boot;
- ``SYM_BOOT_L4`` / ``SYM_BOOT_L3``: the L4 Xen built for dom0 (``start_info.pt_base``)
  and the L3 in its slot 0, which maps the kernel;
- anything else: that machine frame as it is (a non-RAM or invalid frame).

Which words hold frames is said by a tag on every word, so the kernel needs no
knowledge of the operations' meaning to translate them.

Binary encoding (little-endian, every number a u64):

    header  := "RMXPROG1" (8 bytes)  n_ops
    op      := kind  n_fields  field * n_fields
    field   := tag  value
    tag     := 0 RAW    value as it is
             | 1 FRAME  value is a program frame        -> its machine frame
             | 2 ENTRY  bits 51:12 hold a program frame -> replaced by the machine
                        frame; bits 63:52 and 11:0 kept (page-table entries, and
                        machine addresses with the mmu_update command in bits 2:0)

    kind 1 MMU_UPDATE         foreigndom n (ptr val)*n
    kind 2 MMUEXT_OP          foreigndom n (cmd arg1 arg2)*n
    kind 3 UPDATE_VA_MAPPING  va val flags
    kind 4 MULTICALL          n  then n nested ops of kinds 1-3, each as
                              RAW(kind) RAW(n_fields) field*n_fields
    kind 5 READ               va             (8 bytes, aligned)
    kind 6 WRITE              va value       (8 bytes, aligned)
    kind 7 FETCH              va             (``call *va``: the byte there must be 0xC3)

Console output of the kernel, one line each, parsed by :mod:`.boot`:

    XP start nr_pages=<dec> pt_base=<hex> l4=<hex> l3=<hex> shinfo=<hex>
    XP foreign <k> <hex mfn>                  NR_FOREIGN lines
    XP p2m <gfn hex> <count dec> <mfn hex>    runs: gfn+i -> mfn+i
    XP table <level dec> <mfn hex>            every boot page table (L4's guest slots
                                              down, each once)
    XP run <mfn hex> <slot dec> <count dec> <entry hex>
                                              non-zero entries of that table: entry
                                              slot+i = entry + i*0x1000
    XP ready
    R <i> ret=<dec> done=<dec>                mmu_update, mmuext_op
    R <i> ret=<dec>                           update_va_mapping
    R <i> ret=<dec> results=<dec>,<dec>,...   multicall (entries' results)
    R <i> ok [value=<hex>]                    read (with value), write, fetch
    R <i> pf cr2=<hex> ec=<hex>               #PF: CR2 from vcpu_info, the error
                                              code from the exception frame
    R <i> gp ec=<hex>                         #GP
    XP end <n_ops>

Fixed virtual addresses inside the kernel's image (Xen maps the image from
``KERNEL_BASE``; the linker script places these pages):
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeGuard

from ...errors import RefmodelError
from ..trace import (
    Fetch,
    Hypercall,
    MmuextEntry,
    MmuextOp,
    MmuUpdate,
    MmuUpdateReq,
    Multicall,
    Op,
    Read,
    UpdateVaMapping,
    Write,
    op_name,
)

MAGIC = b"RMXPROG1"

#: Where the kernel image is linked (``XEN_ELFNOTE_VIRT_BASE`` 0, image at 2 MiB).
KERNEL_BASE = 0x200000
#: A page the program remaps (``update_va_mapping``) to read any frame back.
SCRATCH_VA = 0x380000
#: A page for the vCPU bitmaps of ``*_MULTI`` flushes and ``UVMF_MULTI``.
MASK_VA = 0x381000
#: The kernel's own page for ``vcpu_info`` (VCPUOP_register_vcpu_info): never named
#: by a program.
VCPU_INFO_VA = 0x382000

#: Program frames that stand for something else (see the module docstring).
FOREIGN_BASE = 0xFFF00
NR_FOREIGN = 8
SYM_BOOT_L4 = 0xFFFF0
SYM_BOOT_L3 = 0xFFFF1

ADDR_BITS = ((1 << 52) - 1) & ~0xFFF


class Tag(enum.IntEnum):
    RAW = 0
    FRAME = 1
    ENTRY = 2


class Kind(enum.IntEnum):
    MMU_UPDATE = 1
    MMUEXT_OP = 2
    UPDATE_VA_MAPPING = 3
    MULTICALL = 4
    READ = 5
    WRITE = 6
    FETCH = 7


@dataclass(frozen=True)
class Field:
    tag: Tag
    value: int


#: mmuext_op commands whose arg1 is a frame: the pins, UNPIN, NEW_BASEPTR,
#: NEW_USER_BASEPTR, CLEAR_PAGE, COPY_PAGE (dst) (xen.h); COPY_PAGE's arg2 is its
#: source frame.
MMUEXT_ARG1_FRAME = frozenset({0, 1, 2, 3, 4, 5, 15, 16, 17})
MMUEXT_ARG2_FRAME = frozenset({17})
#: mmu_update command MMU_MACHPHYS_UPDATE: ``val`` is a pfn, not an entry.
MMU_MACHPHYS_UPDATE = 1


def raw(v: int) -> Field:
    return Field(Tag.RAW, v)


def _mmu_update_fields(op: MmuUpdate) -> list[Field]:
    out = [raw(op.foreigndom), raw(len(op.reqs))]
    for r in op.reqs:
        out.append(Field(Tag.ENTRY, r.ptr))
        out.append(raw(r.val) if r.ptr & 7 == MMU_MACHPHYS_UPDATE else Field(Tag.ENTRY, r.val))
    return out


def _mmuext_fields(op: MmuextOp) -> list[Field]:
    out = [raw(op.foreigndom), raw(len(op.ops))]
    for e in op.ops:
        out.append(raw(e.cmd))
        out.append(Field(Tag.FRAME, e.arg1) if e.cmd in MMUEXT_ARG1_FRAME else raw(e.arg1))
        out.append(Field(Tag.FRAME, e.arg2) if e.cmd in MMUEXT_ARG2_FRAME else raw(e.arg2))
    return out


def fields_of(op: Op) -> tuple[Kind, list[Field]]:
    """The kind and tagged fields of one program operation."""
    if isinstance(op, MmuUpdate):
        return Kind.MMU_UPDATE, _mmu_update_fields(op)
    if isinstance(op, MmuextOp):
        return Kind.MMUEXT_OP, _mmuext_fields(op)
    if isinstance(op, UpdateVaMapping):
        return Kind.UPDATE_VA_MAPPING, [raw(op.va), Field(Tag.ENTRY, op.val), raw(op.flags)]
    if isinstance(op, Multicall):
        out = [raw(len(op.calls))]
        for call in op.calls:
            if isinstance(call, Multicall):
                raise RefmodelError("a nested multicall is not encodable yet")
            kind, sub = fields_of(call)
            out.append(raw(kind))
            out.append(raw(len(sub)))
            out.extend(sub)
        return Kind.MULTICALL, out
    if isinstance(op, Read):
        _check_access(op.va, op.size)
        return Kind.READ, [raw(op.va)]
    if isinstance(op, Write):
        _check_access(op.va, op.size)
        return Kind.WRITE, [raw(op.va), raw(op.value)]
    if isinstance(op, Fetch):
        return Kind.FETCH, [raw(op.va)]
    raise RefmodelError(f"'{op_name(op)}' is not an operation the Xen test kernel runs")


def _check_access(va: int, size: int) -> None:
    if size != 8 or va % 8:
        raise RefmodelError(f"the Xen test kernel reads and writes 8 aligned bytes, not {size} at {va:#x}")


def encode(ops: Sequence[Op]) -> bytes:
    """The boot-module bytes of a program."""
    words: list[int] = []
    for op in ops:
        kind, fields = fields_of(op)
        words += [int(kind), len(fields)]
        for f in fields:
            words += [int(f.tag), f.value]
    return MAGIC + struct.pack(f"<{1 + len(words)}Q", len(ops), *words)


# -- translation from program frames to machine frames (the kernel's rule) ----------
@dataclass(frozen=True)
class FrameMap:
    """What a boot told of dom0's frames: its P2M, the foreign frames, the boot L4
    and L3. Translates program frames as the kernel does."""

    p2m: tuple[int, ...]
    foreign: tuple[int, ...]
    boot_l4: int
    boot_l3: int

    def frame(self, f: int) -> int:
        if 0 <= f < len(self.p2m):
            return self.p2m[f]
        if FOREIGN_BASE <= f < FOREIGN_BASE + len(self.foreign):
            return self.foreign[f - FOREIGN_BASE]
        if f == SYM_BOOT_L4:
            return self.boot_l4
        if f == SYM_BOOT_L3:
            return self.boot_l3
        return f

    def entry(self, value: int) -> int:
        frame = (value & ADDR_BITS) >> 12
        return (value & ~ADDR_BITS) | (self.frame(frame) << 12)

    def field(self, f: Field) -> int:
        if f.tag is Tag.FRAME:
            return self.frame(f.value)
        if f.tag is Tag.ENTRY:
            return self.entry(f.value)
        return f.value


def is_hypercall(op: Op) -> TypeGuard[Hypercall]:
    return isinstance(op, (MmuUpdate, MmuextOp, UpdateVaMapping, Multicall))


__all__ = [
    "ADDR_BITS", "FOREIGN_BASE", "FrameMap", "Field", "Hypercall", "KERNEL_BASE", "Kind", "MAGIC",
    "MASK_VA", "NR_FOREIGN", "SCRATCH_VA", "SYM_BOOT_L3", "SYM_BOOT_L4", "Tag", "VCPU_INFO_VA",
    "encode", "fields_of",
]


def to_machine(op: Op, fmap: FrameMap) -> Op:
    """``op`` with every program frame replaced by the machine frame the kernel uses
    (the same tags :func:`fields_of` writes, read back the same way)."""
    if isinstance(op, MmuUpdate):
        reqs = tuple(
            MmuUpdateReq(fmap.entry(r.ptr), r.val if r.ptr & 7 == MMU_MACHPHYS_UPDATE else fmap.entry(r.val))
            for r in op.reqs
        )
        return MmuUpdate(reqs, op.foreigndom)
    if isinstance(op, MmuextOp):
        ops = tuple(
            MmuextEntry(
                e.cmd,
                fmap.frame(e.arg1) if e.cmd in MMUEXT_ARG1_FRAME else e.arg1,
                fmap.frame(e.arg2) if e.cmd in MMUEXT_ARG2_FRAME else e.arg2,
            )
            for e in op.ops
        )
        return MmuextOp(ops, op.foreigndom)
    if isinstance(op, UpdateVaMapping):
        return UpdateVaMapping(op.va, fmap.entry(op.val), op.flags)
    if isinstance(op, Multicall):
        calls: list[Hypercall] = []
        for call in op.calls:
            translated = to_machine(call, fmap)
            assert is_hypercall(translated)
            calls.append(translated)
        return Multicall(tuple(calls))
    return op
