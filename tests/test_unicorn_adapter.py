"""Tests of the unicorn (QEMU softmmu) paging oracle, refmodel.oracle.unicorn_adapter.

Each test builds a small 4-level paging tree (Intel SDM Vol. 3A §4.5) in plain
bytes, runs accesses on unicorn's MMU and checks the architectural outcome:
data, A/D flags (§4.8), page-fault error codes (§4.7) and TLB behaviour (§4.10).
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refmodel.oracle.unicorn_adapter import (
    HARNESS_FRAME_BASE,
    HARNESS_PHYS_BASE,
    HARNESS_PML4_SLOT,
    HARNESS_VA_BASE,
    KNOWN_QEMU_DEVIATIONS,
    MAXPHYADDR,
    PAGE_SIZE,
    PF_ERR_ID,
    PF_ERR_P,
    PF_ERR_RSVD,
    PF_ERR_US,
    PF_ERR_WR,
    HarnessError,
    UcAccess,
    UcAccessKind,
    UcInvlpg,
    UcMachine,
    UcMovCr3,
    UcPhysWrite,
    UcResult,
    UcRun,
    UcStep,
    UnicornEngine,
    run_on_unicorn,
)

# Entry bits (SDM Tables 4-15..4-20).
P, RW, US, A, D, PS, G = 1 << 0, 1 << 1, 1 << 2, 1 << 5, 1 << 6, 1 << 7, 1 << 8
XD = 1 << 63
TABLE = P | RW | US  # a permissive non-leaf entry

READ, WRITE, FETCH = UcAccessKind.READ, UcAccessKind.WRITE, UcAccessKind.FETCH

# Frame numbers used by the standard tree: PML4 1 -> PDPT 2 -> PD 3 -> PT 4.
PML4, PDPT, PD, PT = 1, 2, 3, 4
DATA, OTHER = 5, 6
MARK_DATA, MARK_OTHER = 0x1122_3344_5566_7788, 0x0BAD_F00D_CAFE_D00D


def page(entries: dict[int, int] | None = None, first_qword: int = 0) -> bytes:
    """A 4 KiB frame: ``entries`` maps qword index -> value."""
    data = bytearray(PAGE_SIZE)
    data[0:8] = struct.pack("<Q", first_qword)
    for index, value in (entries or {}).items():
        data[index * 8 : index * 8 + 8] = struct.pack("<Q", value)
    return bytes(data)


def entry(memory: dict[int, bytes], frame: int, index: int) -> int:
    value: int = struct.unpack_from("<Q", memory[frame], index * 8)[0]
    return value


def tree(pte: int, *, pml4e: int = TABLE, pdpte: int = TABLE, pde: int = TABLE) -> dict[int, bytes]:
    """Linear page 0 (VA 0..0xFFF) mapped through PML4[0], PDPT[0], PD[0], PT[0] = pte.

    Frame DATA holds MARK_DATA and frame OTHER holds MARK_OTHER in their first qword.
    """
    return {
        PML4: page({0: pml4e | PDPT << 12}),
        PDPT: page({0: pdpte | PD << 12}),
        PD: page({0: pde | PT << 12}),
        PT: page({0: pte}),
        DATA: page(first_qword=MARK_DATA),
        OTHER: page(first_qword=MARK_OTHER),
    }


def run(memory: dict[int, bytes], steps: list[UcStep], **config: bool) -> UcRun:
    return run_on_unicorn(memory, UcMachine(cr3=PML4 << 12, **config), steps)


def pf(va: int, error_code: int) -> UcResult:
    return UcResult("page_fault", 0, va, error_code)


OK = UcResult("ok")


# -- basic translation, A/D flags (§4.5, §4.8) --------------------------------


def test_read_4k_returns_data_and_sets_accessed_on_all_levels() -> None:
    memory = tree(DATA << 12 | P | RW)
    result = run(memory, [UcAccess(READ, 0x0, cpl=0)])
    assert result.results == (UcResult("ok", MARK_DATA),)
    final = result.memory
    assert entry(final, PML4, 0) == TABLE | A | PDPT << 12
    assert entry(final, PDPT, 0) == TABLE | A | PD << 12
    assert entry(final, PD, 0) == TABLE | A | PT << 12
    assert entry(final, PT, 0) == DATA << 12 | P | RW | A  # no D for a read
    assert sorted(final) == sorted(memory)


def test_write_sets_dirty_on_leaf_only() -> None:
    memory = tree(DATA << 12 | P | RW)
    result = run(memory, [UcAccess(WRITE, 0x18, cpl=0, value=0xDEAD_BEEF_0000_0001)])
    assert result.results == (OK,)
    final = result.memory
    assert entry(final, PT, 0) == DATA << 12 | P | RW | A | D
    for frame in (PML4, PDPT, PD):
        assert entry(final, frame, 0) & (A | D) == A
    assert entry(final, DATA, 3) == 0xDEAD_BEEF_0000_0001


def test_harness_slot_is_invisible_in_returned_memory() -> None:
    memory = tree(DATA << 12 | P)
    memory[PML4] = memory[PML4][: HARNESS_PML4_SLOT * 8] + struct.pack("<Q", 0x1234_5000 | P)
    final = run(memory, [UcAccess(READ, 0x0)]).memory
    assert entry(final, PML4, HARNESS_PML4_SLOT) == 0x1234_5000 | P
    assert final[DATA] == memory[DATA]


def test_large_pages_translate() -> None:
    # PD[1] maps the 2 MiB page at VA 0x20_0000 onto PA 0x40_0000;
    # PDPT[1] maps the 1 GiB page at VA 0x4000_0000 onto PA 0x8000_0000.
    frame_2m = (0x40_0000 + 0x3000) >> 12
    frame_1g = (0x8000_0000 + 0x12_5000) >> 12
    memory = tree(0)
    memory[PD] = page({0: TABLE | PT << 12, 1: 0x40_0000 | P | RW | PS})
    memory[PDPT] = page({0: TABLE | PD << 12, 1: 0x8000_0000 | P | RW | PS})
    memory[frame_2m] = page({1: 0x2222})
    memory[frame_1g] = page({2: 0x1111})
    result = run(
        memory,
        [
            UcAccess(READ, 0x20_0000 + 0x3008, cpl=0),
            UcAccess(READ, 0x4000_0000 + 0x12_5010, cpl=0),
            UcAccess(WRITE, 0x4000_0000 + 0x12_5018, cpl=0, value=7),
        ],
    )
    assert result.results == (UcResult("ok", 0x2222), UcResult("ok", 0x1111), OK)
    assert entry(result.memory, PD, 1) == 0x40_0000 | P | RW | PS | A
    assert entry(result.memory, PDPT, 1) == 0x8000_0000 | P | RW | PS | A | D
    assert entry(result.memory, frame_1g, 3) == 7


def test_unsupplied_frames_read_as_zero_and_are_not_returned() -> None:
    memory = tree(0x777 << 12 | P | RW)
    result = run(memory, [UcAccess(READ, 0x8), UcAccess(WRITE, 0x8, value=5), UcAccess(READ, 0x8)])
    assert result.results == (UcResult("ok", 0), OK, UcResult("ok", 5))
    assert 0x777 not in result.memory


# -- page faults and error codes (§4.6, §4.7) ---------------------------------


@pytest.mark.parametrize("level", ["pml4e", "pdpte", "pde", "pte"])
def test_not_present_entry_faults_with_p_clear(level: str) -> None:
    entries = {"pml4e": TABLE, "pdpte": TABLE, "pde": TABLE, "pte": DATA << 12 | P | RW}
    entries[level] &= ~P
    memory = tree(entries["pte"], pml4e=entries["pml4e"], pdpte=entries["pdpte"], pde=entries["pde"])
    result = run(memory, [UcAccess(READ, 0x10, cpl=3), UcAccess(WRITE, 0x20, cpl=0)])
    assert result.results == (pf(0x10, PF_ERR_US), pf(0x20, PF_ERR_WR))
    assert entry(result.memory, PT, 0) & A == 0


def test_write_to_read_only_page_depends_on_cr0_wp() -> None:
    memory = tree(DATA << 12 | P)
    va = 0x88
    faulting = run(memory, [UcAccess(WRITE, va, cpl=0, value=1)], cr0_wp=True)
    assert faulting.results == (pf(va, PF_ERR_P | PF_ERR_WR),)
    assert entry(faulting.memory, PT, 0) & (A | D) == 0
    allowed = run(memory, [UcAccess(WRITE, va, cpl=0, value=1)], cr0_wp=False)
    assert allowed.results == (OK,)
    assert entry(allowed.memory, PT, 0) & (A | D) == A | D
    # A user-mode write to a read-only page faults even with WP=0.
    user = run(tree(DATA << 12 | P | US), [UcAccess(WRITE, va, cpl=3)], cr0_wp=False)
    assert user.results == (pf(va, PF_ERR_P | PF_ERR_WR | PF_ERR_US),)


def test_user_read_of_supervisor_page_faults_with_us_bit() -> None:
    # U/S=0 in the PDE only: user access is denied by any level (§4.6.1).
    memory = tree(DATA << 12 | P | RW | US, pde=P | RW)
    result = run(memory, [UcAccess(READ, 0x40, cpl=3), UcAccess(READ, 0x40, cpl=0)])
    assert result.results == (pf(0x40, PF_ERR_P | PF_ERR_US), UcResult("ok", 0))


@pytest.mark.parametrize(
    ("where", "bit"),
    [
        ("pte", 1 << 51),  # above MAXPHYADDR
        ("pte", 1 << MAXPHYADDR),
        ("pde", 1 << (MAXPHYADDR + 3)),
        ("pml4e", PS),  # PS must be 0 in a PML4E
        ("pde_2m", 1 << 13),  # bits 20:13 of a 2 MiB PDE
    ],
)
def test_reserved_bit_faults_with_rsvd(where: str, bit: int) -> None:
    if where == "pml4e":
        memory = tree(DATA << 12 | P, pml4e=TABLE | bit)
    elif where == "pde":
        memory = tree(DATA << 12 | P, pde=TABLE | bit)
    elif where == "pde_2m":
        memory = tree(0, pde=P | RW | PS | bit)
    else:
        memory = tree(DATA << 12 | P | bit)
    result = run(memory, [UcAccess(READ, 0x8, cpl=3), UcAccess(WRITE, 0x8, cpl=0)])
    assert result.results == (
        pf(0x8, PF_ERR_P | PF_ERR_RSVD | PF_ERR_US),
        pf(0x8, PF_ERR_P | PF_ERR_RSVD | PF_ERR_WR),
    )


def test_bits_62_to_52_are_ignored() -> None:
    memory = tree(DATA << 12 | P | (0x7FF << 52))
    assert run(memory, [UcAccess(READ, 0x0)]).results == (UcResult("ok", MARK_DATA),)


def test_execute_disable() -> None:
    memory = tree(DATA << 12 | P | RW | US | XD)
    steps: list[UcStep] = [UcAccess(FETCH, 0x123, cpl=0), UcAccess(FETCH, 0x0, cpl=3), UcAccess(READ, 0x0)]
    assert run(memory, steps, efer_nxe=True).results == (
        pf(0x123, PF_ERR_P | PF_ERR_ID),
        pf(0x0, PF_ERR_P | PF_ERR_ID | PF_ERR_US),
        UcResult("ok", MARK_DATA),
    )
    # With EFER.NXE = 0 bit 63 is reserved (§4.5), and I/D is not reported (§4.7).
    assert run(memory, [UcAccess(FETCH, 0x123)], efer_nxe=False).results == (
        pf(0x123, PF_ERR_P | PF_ERR_RSVD),
    )
    # Without XD the fetch succeeds and sets A.
    plain = run(tree(DATA << 12 | P | US), [UcAccess(FETCH, 0x0, cpl=3)])
    assert plain.results == (OK,)
    assert entry(plain.memory, PT, 0) & (A | D) == A


def test_smep() -> None:
    memory = tree(DATA << 12 | P | RW | US)
    steps: list[UcStep] = [UcAccess(FETCH, 0x10, cpl=0), UcAccess(FETCH, 0x10, cpl=3), UcAccess(READ, 0x0)]
    assert run(memory, steps, cr4_smep=True).results == (
        pf(0x10, PF_ERR_P | PF_ERR_ID),
        OK,
        UcResult("ok", MARK_DATA),
    )
    assert run(memory, steps, cr4_smep=False).results == (OK, OK, UcResult("ok", MARK_DATA))
    # SMEP reports I/D even with NXE = 0 (§4.7).
    assert run(memory, steps[:1], cr4_smep=True, efer_nxe=False).results == (pf(0x10, PF_ERR_P | PF_ERR_ID),)


def test_smap() -> None:
    memory = tree(DATA << 12 | P | RW | US)
    steps: list[UcStep] = [
        UcAccess(READ, 0x0, cpl=0),
        UcAccess(WRITE, 0x8, cpl=0),
        UcAccess(FETCH, 0x10, cpl=0),  # SMAP does not restrict fetches
        UcAccess(READ, 0x0, cpl=3),
    ]
    assert run(memory, steps, cr4_smap=True).results == (
        pf(0x0, PF_ERR_P),
        pf(0x8, PF_ERR_P | PF_ERR_WR),
        OK,
        UcResult("ok", MARK_DATA),
    )
    assert run(memory, steps, cr4_smap=True, rflags_ac=True).results == (
        UcResult("ok", MARK_DATA),
        OK,
        OK,
        UcResult("ok", MARK_DATA),
    )


def test_non_canonical_address_gives_gp() -> None:
    memory = tree(DATA << 12 | P | RW | US)
    steps: list[UcStep] = [
        UcAccess(READ, 0x0000_8000_0000_0000, cpl=3),
        UcAccess(WRITE, 0xFFFF_7FFF_FFFF_FFF8, cpl=0),
        UcAccess(FETCH, 0x0001_0000_0000_0000, cpl=0),
        UcAccess(READ, 0x0, cpl=0),  # the faults leave no trace
    ]
    gp = UcResult("gp")
    assert run(memory, steps).results == (gp, gp, gp, UcResult("ok", MARK_DATA))


def test_many_faults_in_a_row_stay_page_faults() -> None:
    """unicorn never clears QEMU's exception-in-flight state; the harness must."""
    steps: list[UcStep] = [UcAccess(READ, 0x1000 * i, cpl=i % 2 * 3) for i in range(1, 6)]
    results = run(tree(0), steps).results
    assert results == tuple(pf(0x1000 * i, PF_ERR_US if i % 2 else 0) for i in range(1, 6))


def test_mixed_successes_and_faults_at_both_privilege_levels() -> None:
    """Every privilege transition and stop mechanism, followed by faults."""
    memory = tree(DATA << 12 | P | RW | US)
    memory[PT] = page({0: DATA << 12 | P | RW | US, 1: DATA << 12 | P})
    steps: list[UcStep] = [
        UcAccess(READ, 0x0, cpl=3),
        UcAccess(READ, 0x5000, cpl=3),
        UcAccess(READ, 0x0, cpl=0),
        UcAccess(WRITE, 0x1000, cpl=3),
        UcAccess(FETCH, 0x0, cpl=3),
        UcAccess(FETCH, 0x1000, cpl=0),
        UcAccess(FETCH, 0x6000, cpl=0),
        UcInvlpg(0x0),
        UcAccess(WRITE, 0x1000, cpl=0),
        UcAccess(READ, 0x7000, cpl=3),
        UcMovCr3(PML4 << 12),
        UcAccess(READ, 0x1008, cpl=3),
        UcAccess(READ, 0x8000, cpl=0),
    ]
    assert run(memory, steps).results == (
        UcResult("ok", MARK_DATA),
        pf(0x5000, PF_ERR_US),
        UcResult("ok", MARK_DATA),
        pf(0x1000, PF_ERR_P | PF_ERR_WR | PF_ERR_US),
        OK,
        OK,
        pf(0x6000, PF_ERR_ID),
        pf(0x1000, PF_ERR_P | PF_ERR_WR),
        pf(0x7000, PF_ERR_US),
        pf(0x1008, PF_ERR_P | PF_ERR_US),
        pf(0x8000, 0),
    )


def test_page_crossing_read() -> None:
    memory = tree(DATA << 12 | P | RW)
    memory[PT] = page({0: DATA << 12 | P, 1: OTHER << 12 | P})
    memory[DATA] = memory[DATA][:-4] + bytes.fromhex("01020304")
    steps: list[UcStep] = [UcAccess(READ, 0xFFC), UcAccess(READ, 0x1FFC)]
    first, second = run(memory, steps).results
    expected = bytes.fromhex("01020304") + struct.pack("<Q", MARK_OTHER)[:4]
    assert first == UcResult("ok", int.from_bytes(expected, "little"))
    assert second == pf(0x2000, 0)  # CR2: first byte of the faulting page


def test_invlpg_of_non_canonical_address_is_harmless() -> None:
    steps: list[UcStep] = [UcInvlpg(0x0000_8000_0000_0000), UcAccess(READ, 0x0)]
    assert run(tree(DATA << 12 | P), steps).results == (UcResult("ok", MARK_DATA),)


def test_page_aligned_and_unaligned_fetch_report_exact_cr2() -> None:
    memory = tree(0)
    steps: list[UcStep] = [UcAccess(FETCH, va, cpl=3) for va in (0x0, 0x5000, 0x5FFF, 0x7123)]
    results = run(memory, steps).results
    assert [r.cr2 for r in results] == [0x0, 0x5000, 0x5FFF, 0x7123]
    assert {r.error_code for r in results} == {PF_ERR_ID | PF_ERR_US}


# -- TLB behaviour (§4.10) -----------------------------------------------------


def test_stale_translation_survives_phys_write_until_invlpg() -> None:
    memory = tree(DATA << 12 | P | RW)
    remap = UcPhysWrite(PT << 12, OTHER << 12 | P | RW)
    result = run(
        memory,
        [
            UcAccess(READ, 0x0),
            remap,
            UcAccess(READ, 0x0),  # TLB hit: still the old frame
            UcInvlpg(0x0),
            UcAccess(READ, 0x0),
        ],
    )
    assert result.results == (UcResult("ok", MARK_DATA), UcResult("ok", MARK_DATA), UcResult("ok", MARK_OTHER))
    assert entry(result.memory, PT, 0) == OTHER << 12 | P | RW | A


def test_stale_translation_survives_until_mov_cr3() -> None:
    memory = tree(DATA << 12 | P | RW)
    steps: list[UcStep] = [
        UcAccess(READ, 0x0),
        UcPhysWrite(PT << 12, 0),  # now not present
        UcAccess(READ, 0x0),
        UcMovCr3(PML4 << 12),
        UcAccess(READ, 0x0),
    ]
    assert run(memory, steps).results == (UcResult("ok", MARK_DATA), UcResult("ok", MARK_DATA), pf(0x0, 0))


def test_invlpg_only_flushes_its_page() -> None:
    memory = tree(DATA << 12 | P | RW)
    memory[PT] = page({0: DATA << 12 | P | RW, 1: DATA << 12 | P | RW})
    steps: list[UcStep] = [
        UcAccess(READ, 0x0),
        UcAccess(READ, 0x1000),
        UcPhysWrite(PT << 12, OTHER << 12 | P),
        UcPhysWrite((PT << 12) + 8, OTHER << 12 | P),
        UcInvlpg(0x1000),
        UcAccess(READ, 0x0),
        UcAccess(READ, 0x1000),
    ]
    assert run(memory, steps).results[2:] == (UcResult("ok", MARK_DATA), UcResult("ok", MARK_OTHER))


def test_user_and_supervisor_translations_are_cached_separately() -> None:
    memory = tree(DATA << 12 | P | RW | US)
    steps: list[UcStep] = [
        UcAccess(READ, 0x0, cpl=3),
        UcPhysWrite(PT << 12, OTHER << 12 | P | RW | US),
        UcAccess(READ, 0x0, cpl=3),  # cached
        UcAccess(READ, 0x0, cpl=0),  # QEMU: separate TLB per MMU mode, so a fresh walk
    ]
    assert run(memory, steps).results == (
        UcResult("ok", MARK_DATA),
        UcResult("ok", MARK_DATA),
        UcResult("ok", MARK_OTHER),
    )


def test_mov_cr3_switches_address_space() -> None:
    memory = tree(DATA << 12 | P)
    memory[10] = page({0: TABLE | 11 << 12})
    memory[11] = page({0: TABLE | 12 << 12})
    memory[12] = page({0: TABLE | 13 << 12})
    memory[13] = page({0: OTHER << 12 | P})
    steps: list[UcStep] = [UcAccess(READ, 0x0), UcMovCr3(10 << 12), UcAccess(READ, 0x0)]
    result = run(memory, steps)
    assert result.results == (UcResult("ok", MARK_DATA), UcResult("ok", MARK_OTHER))
    assert entry(result.memory, 10, HARNESS_PML4_SLOT) == 0


# -- documented QEMU deviations ---------------------------------------------------


def test_qemu_deviation_global_pages_do_not_survive_mov_cr3() -> None:
    assert any("Global pages" in text for text in KNOWN_QEMU_DEVIATIONS)
    memory = tree(DATA << 12 | P | RW | G)
    steps: list[UcStep] = [
        UcAccess(READ, 0x0),
        UcPhysWrite(PT << 12, OTHER << 12 | P | RW | G),
        UcMovCr3(PML4 << 12),
        UcAccess(READ, 0x0),
    ]
    # Hardware may still return MARK_DATA here (§4.10.4.1); QEMU re-walks.
    assert run(memory, steps, cr4_pge=True).results[1] == UcResult("ok", MARK_OTHER)


def test_qemu_deviation_1g_leaf_accessed_flag_set_on_fault() -> None:
    assert any("1 GiB PDPTE" in text for text in KNOWN_QEMU_DEVIATIONS)
    memory = tree(0)
    memory[PDPT] = page({0: P | PS})  # read-only 1 GiB page: VA 0 -> PA 0
    result = run(memory, [UcAccess(WRITE, 0x0, cpl=3)])
    assert result.results == (pf(0x0, PF_ERR_P | PF_ERR_WR | PF_ERR_US),)
    assert entry(result.memory, PDPT, 0) & A  # set although the access faulted
    # The same fault on a 4 KiB leaf leaves A clear.
    small = run(tree(DATA << 12 | P), [UcAccess(WRITE, 0x0, cpl=3)])
    assert entry(small.memory, PT, 0) & A == 0


def test_qemu_deviation_permission_upgrade_needs_no_invalidation() -> None:
    assert any("Only permissions are cached" in text for text in KNOWN_QEMU_DEVIATIONS)
    memory = tree(DATA << 12 | P | A | D)
    steps: list[UcStep] = [
        UcAccess(READ, 0x0),
        UcPhysWrite(PT << 12, DATA << 12 | P | RW | A | D),
        UcAccess(WRITE, 0x0, value=1),  # hardware may fault on the cached read-only entry
    ]
    assert run(memory, steps).results == (UcResult("ok", MARK_DATA), OK)


def test_qemu_deviation_large_pages_are_cached_per_4k() -> None:
    assert any("cached per 4 KiB" in text for text in KNOWN_QEMU_DEVIATIONS)
    memory = tree(0)
    memory[PD] = page({0: 0x20_0000 | P | RW | PS})
    memory[0x200] = page(first_qword=0x200)
    memory[0x201] = page(first_qword=0x201)
    memory[0x401] = page(first_qword=0x401)
    steps: list[UcStep] = [
        UcAccess(READ, 0x0),
        UcPhysWrite(PD << 12, 0x40_0000 | P | RW | PS),
        UcAccess(READ, 0x0),  # cached 4 KiB piece: stale
        UcAccess(READ, 0x1000),  # other 4 KiB piece of the same 2 MiB page: new entry
    ]
    assert run(memory, steps).results == tuple(UcResult("ok", value) for value in (0x200, 0x200, 0x401))


# -- engine reuse and input validation -------------------------------------------


def test_mapping_harness_memory_is_detected() -> None:
    code_frame = (HARNESS_PHYS_BASE >> 12) + 3  # the harness kernel code page
    with pytest.raises(HarnessError):
        run(tree(code_frame << 12 | P | RW), [UcAccess(WRITE, 0x0, value=0)])
    # The engine was discarded; the next run gets a fresh one.
    assert run(tree(DATA << 12 | P), [UcAccess(READ, 0x0)]).results == (UcResult("ok", MARK_DATA),)



def test_runs_are_independent_on_a_reused_engine() -> None:
    engine = UnicornEngine()
    memory = tree(DATA << 12 | P | RW)
    steps: list[UcStep] = [UcAccess(READ, 0x0), UcAccess(WRITE, 0x8, value=3)]
    config = UcMachine(cr3=PML4 << 12)
    first = engine.run(memory, config, steps)
    # A different case touching other frames, leaving a cached translation behind.
    other = tree(OTHER << 12 | P | RW)
    engine.run(other, config, [UcAccess(READ, 0x0), UcAccess(WRITE, 0x0, value=9)])
    again = engine.run(memory, config, steps)
    assert first == again
    assert memory[DATA] == page(first_qword=MARK_DATA)  # inputs are not mutated


_flags = st.sampled_from([0, P, P | RW, P | US, P | RW | US, P | RW | US | XD, P | RW | US | A | D])


@st.composite
def _cases(draw: st.DrawFn) -> tuple[dict[int, bytes], UcMachine, list[UcStep]]:
    """Small random trees (4 linear pages) and step sequences."""
    memory = tree(0, pml4e=draw(_flags) | P, pdpte=draw(_flags) | P, pde=draw(_flags) | P)
    memory[PT] = page({i: (DATA + i % 2) << 12 | draw(_flags) for i in range(4)})
    steps: list[UcStep] = []
    for _ in range(draw(st.integers(1, 6))):
        choice = draw(st.integers(0, 5))
        va = draw(st.integers(0, 3)) * PAGE_SIZE + draw(st.integers(0, 7)) * 8
        if choice <= 2:
            steps.append(UcAccess((READ, WRITE, FETCH)[choice], va, draw(st.sampled_from([0, 3])), va))
        elif choice == 3:
            steps.append(UcPhysWrite((PT << 12) + draw(st.integers(0, 3)) * 8, OTHER << 12 | draw(_flags)))
        elif choice == 4:
            steps.append(UcInvlpg(va))
        else:
            steps.append(UcMovCr3(PML4 << 12))
    bits = draw(st.lists(st.booleans(), min_size=6, max_size=6))
    config = UcMachine(PML4 << 12, *bits)
    return memory, config, steps


@settings(max_examples=25)
@given(_cases())
def test_reused_engine_matches_fresh_engine(case: tuple[dict[int, bytes], UcMachine, list[UcStep]]) -> None:
    memory, config, steps = case
    assert run_on_unicorn(memory, config, steps) == UnicornEngine().run(memory, config, steps)


@pytest.mark.parametrize(
    "step",
    [
        UcAccess(READ, HARNESS_VA_BASE),
        UcAccess(READ, 0x0, cpl=1),
        UcAccess(READ, 1 << 64),
        UcInvlpg(HARNESS_VA_BASE + 0x1000),
        UcPhysWrite(HARNESS_FRAME_BASE << 12, 0),
        UcPhysWrite(3, 0),
        UcPhysWrite((PML4 << 12) + HARNESS_PML4_SLOT * 8, 0),
        UcMovCr3(HARNESS_FRAME_BASE << 12),
        UcMovCr3(1 << MAXPHYADDR),
    ],
)
def test_invalid_steps_are_rejected(step: UcStep) -> None:
    with pytest.raises(ValueError):
        run(tree(0), [step])


def test_invalid_memory_is_rejected() -> None:
    with pytest.raises(ValueError):
        run({**tree(0), HARNESS_FRAME_BASE: page()}, [])
    with pytest.raises(ValueError):
        run({**tree(0), 7: b"short"}, [])
