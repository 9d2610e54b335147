"""The Xen oracle's boot harness against real Xen 4.17 (refmodel.oracle.xen.boot).

Each boot takes one to a few seconds (QEMU TCG). Without QEMU, Xen 4.17 and gcc the
module is skipped, unless the environment variable CI is set: then it fails.
Expectations cite the Xen 4.17.7 source lines they come from.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from refmodel.oracle.trace import (
    Fetch,
    MmuUpdate,
    MmuUpdateReq,
    Multicall,
    Op,
    Read,
    UpdateVaMapping,
    Write,
)
from refmodel.oracle.xen import boot, program
from refmodel.oracle.xen.program import SCRATCH_VA, SYM_BOOT_L3, SYM_BOOT_L4

REASON = boot.available()
if REASON is not None and not os.environ.get("CI"):
    pytest.skip(REASON, allow_module_level=True)


@pytest.fixture(autouse=True)
def _xen_present() -> None:
    if REASON is not None:  # CI is set: a missing Xen is a failure, not a skip
        pytest.fail(REASON)


UNMAPPED = 0x0000_0100_0000_0000  # L4 slot 2: nothing there in dom0's boot tables
NON_CANONICAL = 0x8000_0000_0000_0000
UVMF_INVLPG = 2  # xen/include/public/xen.h:474
P = 1


def known_answer_program(pt_base: int) -> list[Op]:
    return [
        # 0: xen/arch/x86/mm.c:2387-2391 mod_l4_entry: "L4 update in Xen-private
        # area" -> -EINVAL; nothing done.
        MmuUpdate((MmuUpdateReq((SYM_BOOT_L4 << 12) + 256 * 8, 0),)),
        # 1: xen/arch/x86/mm.c:4250-4251 do_mmu_update: an unknown command -> -ENOSYS.
        MmuUpdate((MmuUpdateReq((SYM_BOOT_L4 << 12) | 7, 0),)),
        # 2: the kernel's own image is mapped.
        Read(program.KERNEL_BASE),
        # 3: #PF, not present; xen/arch/x86/pv/traps.c:71-74 pv_inject_event clears
        # PFEC_user_mode for a fault in guest kernel mode -> ec 0.
        Read(UNMAPPED),
        # 4: the boot L4 is mapped read-only; writable-pagetable emulation is for L1
        # tables only (xen/arch/x86/pv/ro-page-fault.c:295) -> #PF P|W = 3.
        Write(pt_base, 0),
        # 5: instruction fetch from a non-present page: I/D (0x10), as Xen runs with
        # EFER.NXE set ("NX (Execute Disable) protection active").
        Fetch(UNMAPPED),
        # 6: non-canonical -> #GP(0), passed on as is (xen/arch/x86/traps.c:1782).
        Read(NON_CANONICAL),
        # 7, 8: xen/arch/x86/mm.c:4463 __do_update_va_mapping -> mod_l1_entry -> 0;
        # then read the L4's slot 256 (Xen's, read-only to the guest) through it.
        UpdateVaMapping(SCRATCH_VA, (SYM_BOOT_L4 << 12) | P, UVMF_INVLPG),
        Read(SCRATCH_VA + 256 * 8),
        # 9: a multicall of two update_va_mappings: both succeed.
        Multicall((
            UpdateVaMapping(SCRATCH_VA, (SYM_BOOT_L3 << 12) | P, UVMF_INVLPG),
            UpdateVaMapping(SCRATCH_VA, (SYM_BOOT_L4 << 12) | P, UVMF_INVLPG),
        )),
        # 10: the scratch page now shows the L4 again: slot 0 names the L3.
        Read(SCRATCH_VA),
    ]


@pytest.fixture(scope="module")
def records() -> tuple[boot.BootRecord, boot.BootRecord]:
    """Two boots: the first learns pt_base for a program of this length (Xen's
    layout of dom0 depends only on the sizes of the kernel and the module); the
    second runs the program with the boot L4's VA filled in."""
    if REASON is not None:
        pytest.fail(REASON)
    first = boot.boot(program.encode(known_answer_program(0)))
    second = boot.boot(program.encode(known_answer_program(first.pt_base)))
    assert second.pt_base == first.pt_base
    return first, second


def test_kernel_symbols_match_program() -> None:
    syms = _symbols()
    assert syms["_start"] == program.KERNEL_BASE
    assert syms["scratch_page"] == program.SCRATCH_VA
    assert syms["mask_page"] == program.MASK_VA
    assert syms["vcpu_info_page"] == program.VCPU_INFO_VA


def test_boot_record_is_consistent(records: tuple[boot.BootRecord, boot.BootRecord]) -> None:
    rec = records[0]
    assert len(rec.p2m) == rec.nr_pages == len(set(rec.p2m))
    assert rec.boot_l4 == rec.p2m[rec.pt_base >> 12]
    l4 = rec.table(rec.boot_l4)
    assert l4.level == 4 and rec.tables[0] is l4
    slot0 = dict(l4.entries)[0]
    assert slot0 & 1 and (slot0 & program.ADDR_BITS) >> 12 == rec.boot_l3
    assert rec.table(rec.boot_l3).level == 3
    assert len(rec.foreign) == program.NR_FOREIGN
    assert not set(rec.foreign) & set(rec.p2m)
    levels = [t.level for t in rec.tables]
    assert levels.count(4) == 1 and all(lv in (1, 2, 3) for lv in levels[1:])
    assert len({t.mfn for t in rec.tables}) == len(rec.tables)


def test_known_answers(records: tuple[boot.BootRecord, boot.BootRecord]) -> None:
    rec = records[1]
    r = rec.results
    assert len(r) == 11
    assert (r[0].ret, r[0].done) == (-22, 0)
    assert (r[1].ret, r[1].done) == (-38, 0)
    assert r[2].outcome == "ok" and r[2].value is not None
    assert (r[3].outcome, r[3].cr2, r[3].error_code) == ("pf", UNMAPPED, 0)
    assert (r[4].outcome, r[4].cr2, r[4].error_code) == ("pf", rec.pt_base, 3)
    assert (r[5].outcome, r[5].cr2, r[5].error_code) == ("pf", UNMAPPED, 0x10)
    assert (r[6].outcome, r[6].error_code) == ("gp", 0)
    assert r[7].ret == 0
    l4 = dict(rec.table(rec.boot_l4).entries)
    assert (r[8].outcome, r[8].value) == ("ok", l4[256])
    assert r[9].ret == 0 and r[9].results == (0, 0)
    assert (r[10].outcome, r[10].value) == ("ok", l4[0])


def _symbols() -> dict[str, int]:
    out = subprocess.run(["nm", str(boot.build_kernel())], capture_output=True, text=True, check=True).stdout
    return {name: int(addr, 16) for addr, _, name in (line.split() for line in out.splitlines())
            if not addr.startswith("U")}


def test_bad_program_is_an_error() -> None:
    with pytest.raises(boot.XenHarnessError, match="XP error bad magic"):
        boot.boot(b"NOTAPROG" + bytes(8))


def test_unexpected_exception_is_an_error() -> None:
    # Fetching the kernel's own ud2 raises #UD (vector 6): a crash line, not a result.
    ud2 = _symbols()["not_reached"]
    with pytest.raises(boot.XenHarnessError, match=f"XP crash vector=6 rip={ud2:#x}"):
        boot.boot(program.encode([Read(program.KERNEL_BASE), Fetch(ud2)]))


def test_parse_checks_the_result_count() -> None:
    console = "\n".join([
        "XP start nr_pages=2 pt_base=0x1000 l4=0x11 l3=0x12 shinfo=0x99000",
        "XP foreign 0 0x8000", "XP p2m 0x0 2 0x10", "XP table 4 0x11", "XP run 0x11 0 1 0x12067",
        "(XEN) something of Xen's", "XP ready", "R 0 ret=-22 done=0", "XP end 2",
    ])
    with pytest.raises(boot.XenHarnessError, match="1 results for a program of 2"):
        boot.parse(console)
    rec = boot.parse(console.replace("XP end 2", "R 1 pf cr2=0x5000 ec=0x3\nXP end 2"))
    assert rec.p2m == (0x10, 0x11) and rec.tables[0].entries == ((0, 0x12067),)
    assert rec.results[1] == boot.OpResult(1, outcome="pf", cr2=0x5000, error_code=3)
