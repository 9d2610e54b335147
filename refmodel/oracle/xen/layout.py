"""dom0 as Xen 4.17 boots it, as the model's initial state: the trace header a
differential run checks against.

What a boot tells (:class:`Dom0Layout`): dom0's P2M (``start_info.mfn_list``), its
boot page tables as the test kernel dumped them, the foreign frames it chose. From
that :func:`dom0_header` writes a PV trace header: a machine of ``RAM_FRAMES`` frames
(QEMU's ``-m 512``), dom0 privileged with exactly Xen's P2M, its tables in memory, and
its vCPU on the boot L4 — validated, pinned and loaded, as
xen/arch/x86/pv/dom0_build.c leaves it (:func:`refmodel.hv.pv.dom0.adopt_built_base`).

The vCPU's registers are those Xen runs a 64-bit PV guest with: paging with CR0.WP,
PAE, EFER.LME/LMA and NXE (Xen enables NX when the CPU has it); CR4.PGE is set
because Xen 4.17 without XPTI or PCID runs PV guests with global pages
(xen/arch/x86/include/asm/processor.h ``pv_make_cr4``). The guest kernel runs in ring
3, but Xen makes every present entry user-accessible (``adjust_guest_lNe``) and
clears the user bit of a kernel-mode #PF's error code (pv_inject_event), so the
model runs the kernel's accesses as supervisor accesses with SMEP and SMAP off: the
same faults, the same error codes.

:func:`synthetic_layout` is a stand-in with the same shape for the program generator,
which needs the model's view of the sandbox frames, not Xen's real frame numbers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ...arch.control import Cr0, Cr4, Efer
from ...arch.pte import Level
from ...arch.types import ENTRIES_PER_TABLE
from ...guest.ops import Mode
from ..trace import DomainInit, Header, MachineInit, VcpuInit
from .program import FrameMap, KERNEL_BASE, NR_FOREIGN

#: QEMU's ``-m 512``: RAM frames 0 .. 0x1FFFF.
RAM_FRAMES = 0x20000
#: The model's machine gives the frames below this to Xen (any frame dom0 does not own
#: behaves the same for dom0's requests: refused).
XEN_FRAMES = 1024
#: TCG's ``-cpu max`` has 40 physical address bits (QEMU TCG_PHYS_ADDR_BITS).
MAXPHYADDR = 40


@dataclass(frozen=True)
class TableDump:
    """One boot page table: its level, frame and non-zero entries."""

    level: int
    mfn: int
    entries: tuple[tuple[int, int], ...]  #: (slot, value)

    def frame_bytes(self) -> bytes:
        words = [0] * ENTRIES_PER_TABLE
        for slot, value in self.entries:
            words[slot] = value
        return struct.pack(f"<{ENTRIES_PER_TABLE}Q", *words)


@dataclass(frozen=True)
class Dom0Layout:
    """What the model needs of a booted dom0."""

    p2m: tuple[int, ...]  #: gfn -> mfn
    foreign: tuple[int, ...]
    boot_l4: int
    boot_l3: int
    tables: tuple[TableDump, ...]

    @property
    def nr_pages(self) -> int:
        return len(self.p2m)

    def frame_map(self) -> FrameMap:
        return FrameMap(self.p2m, self.foreign, self.boot_l4, self.boot_l3)


def vcpu_registers(cr3: int) -> VcpuInit:
    cr0 = int(Cr0.PE | Cr0.WP | Cr0.PG)
    cr4 = int(Cr4.PAE | Cr4.PGE)
    efer = int(Efer.LME | Efer.LMA | Efer.NXE)
    return VcpuInit(cr0=cr0, cr3=cr3, cr4=cr4, efer=efer, rflags=0x2, cpl=0, domid=0)


def dom0_header(layout: Dom0Layout, name: str = "xen-dom0", description: str = "") -> Header:
    """The PV trace header of dom0 as ``layout`` describes it."""
    memory = tuple(sorted((t.mfn, t.frame_bytes()) for t in layout.tables if t.entries))
    return Header(
        mode=Mode.PV,
        maxphyaddr=MAXPHYADDR,
        memory=memory,
        vcpus=(vcpu_registers(layout.boot_l4 << 12),),
        name=name,
        description=description,
        machine=MachineInit(nr_frames=RAM_FRAMES, hypervisor_frames=XEN_FRAMES),
        domains=(DomainInit(0, tuple(enumerate(layout.p2m)), privileged=True, pv_base=layout.boot_l4),),
    )


# -- a stand-in boot for the generator ------------------------------------------------
#: dom0_mem=64M
SYNTHETIC_PAGES = 0x4000
#: Where the stand-in's boot tables live (pfns), after a 2 MiB kernel image.
_BOOT_TABLE_PFN = 0x400
_PT_FLAGS = 0x67  # P|RW|US|A|D, as dom0_build's L2_PROT..L4_PROT


def synthetic_layout(nr_pages: int = SYNTHETIC_PAGES) -> Dom0Layout:
    """A dom0 shaped like Xen's: gfn -> a scrambled machine frame, a boot L4 whose
    slot 0 maps the kernel's 2 MiB at KERNEL_BASE read-write (its own tables
    read-only, as ``mark_pv_pt_pages_rdonly``), foreign frames outside the P2M."""
    p2m = tuple(0x4000 + ((g * 7919) % nr_pages) for g in range(nr_pages))
    foreign = tuple(0x10000 + k for k in range(NR_FOREIGN))
    l4, l3, l2, l1 = (p2m[_BOOT_TABLE_PFN + i] for i in range(4))
    table_pfns = {_BOOT_TABLE_PFN + i for i in range(4)}
    base_pfn = KERNEL_BASE >> 12
    l1_entries = tuple(
        (i, (p2m[base_pfn + i] << 12) | (0x65 if base_pfn + i in table_pfns else 0x67) | (1 << 52))
        for i in range(ENTRIES_PER_TABLE)
    )
    tables = (
        TableDump(int(Level.L4), l4, ((0, (l3 << 12) | _PT_FLAGS),)),
        TableDump(int(Level.L3), l3, ((0, (l2 << 12) | _PT_FLAGS),)),
        TableDump(int(Level.L2), l2, ((KERNEL_BASE >> 21, (l1 << 12) | _PT_FLAGS),)),
        TableDump(int(Level.L1), l1, l1_entries),
    )
    assert all(_BOOT_TABLE_PFN + i >= base_pfn + ENTRIES_PER_TABLE for i in range(4))
    return Dom0Layout(p2m, foreign, l4, l3, tables)


__all__ = ["Dom0Layout", "TableDump", "dom0_header", "synthetic_layout", "RAM_FRAMES"]
