"""Control-register and EFER writes, and INVPCID's own checks (Intel SDM Vol. 3A 2.5,
4.1, 4.10.4.1; Vol. 2A MOV to CR, WRMSR, INVPCID).

Each write either returns a new state and the TLB invalidation it implies, or the
#GP(0) the SDM prescribes — in which case nothing changes. The model always runs in
64-bit mode with 4-level paging.
"""

import pytest

from refmodel.arch.control import CR3_NOFLUSH, Cr0, Cr4, Efer, Rflags
from refmodel.arch.fault import GeneralProtection
from refmodel.arch.pte import PteFlag
from refmodel.arch.vcpu import (
    ArchState,
    CrWrite,
    TlbEffect,
    write_cr0,
    write_cr3,
    write_cr4,
    write_efer,
)
from refmodel.errors import RefmodelError

from pt_helpers import CR0_DEFAULT, CR4_DEFAULT, PA, RSVD, SUPER_RW, VA, P, machine, read

BASE = ArchState()
PCID_ON = ArchState(cr4=CR4_DEFAULT | int(Cr4.PCIDE))
MAXPHY = 46
ROOT = 0x0000_0000_0012_3000


def ok(result: CrWrite | GeneralProtection) -> CrWrite:
    assert isinstance(result, CrWrite), f"expected a successful write, got {result!r}"
    return result


def gp(result: CrWrite | GeneralProtection) -> GeneralProtection:
    assert isinstance(result, GeneralProtection), f"expected #GP, got {result!r}"
    assert result.error_code == 0
    return result


# =====================================================================================
# MOV to CR3
# =====================================================================================


def test_cr3_write_without_pcids_flushes_pcid_0() -> None:
    """SDM 4.10.4.1: with CR4.PCIDE = 0, MOV to CR3 invalidates the non-global
    entries of PCID 000H; CR3[11:0] (PWT, PCD) is stored but is no PCID."""
    w = ok(write_cr3(BASE, ROOT | 0x18, MAXPHY))
    assert w.state.cr3 == ROOT | 0x18
    assert (w.effect, w.pcid) == (TlbEffect.PCID_NONGLOBAL, 0)
    assert w.state.pcid == 0


def test_cr3_write_with_pcids_flushes_the_new_pcid() -> None:
    """SDM 4.10.4.1: with CR4.PCIDE = 1 and bit 63 clear, MOV to CR3 invalidates the
    non-global entries of the PCID in bits 11:0 of the source."""
    w = ok(write_cr3(PCID_ON, ROOT | 0x2A, MAXPHY))
    assert (w.effect, w.pcid) == (TlbEffect.PCID_NONGLOBAL, 0x2A)
    assert w.state.pcid == 0x2A


def test_cr3_write_with_noflush_bit() -> None:
    """SDM 4.10.4.1, Vol. 2A MOV CR: with CR4.PCIDE = 1 and bit 63 set, nothing need
    be invalidated, and bit 63 is not stored in CR3."""
    w = ok(write_cr3(PCID_ON, CR3_NOFLUSH | ROOT | 7, MAXPHY))
    assert w.effect is TlbEffect.NONE
    assert w.state.cr3 == ROOT | 7


@pytest.mark.parametrize(
    ("state", "value"),
    [
        (BASE, ROOT | (1 << MAXPHY)),
        (BASE, ROOT | (1 << 62)),
        (BASE, ROOT | CR3_NOFLUSH),  # bit 63 is reserved without PCIDs
        (PCID_ON, ROOT | (1 << 51)),
        (PCID_ON, CR3_NOFLUSH | ROOT | (1 << 62)),
    ],
    ids=["bit-M", "bit-62", "bit-63-no-pcide", "pcide-bit-51", "pcide-noflush-bit-62"],
)
def test_cr3_reserved_bits_are_gp(state: ArchState, value: int) -> None:
    """Vol. 2A MOV CR, SDM 4.5 (Table 4-12): setting a CR3 bit at or above MAXPHYADDR
    is #GP(0) (bit 63 is the no-flush hint only when CR4.PCIDE = 1)."""
    gp(write_cr3(state, value, MAXPHY))


def test_cr3_top_address_bit_is_allowed() -> None:
    """SDM 4.5: bit MAXPHYADDR-1 of CR3 is an address bit."""
    assert ok(write_cr3(BASE, 1 << (MAXPHY - 1), MAXPHY)).state.cr3 == 1 << (MAXPHY - 1)


# =====================================================================================
# MOV to CR4
# =====================================================================================


@pytest.mark.parametrize(
    ("state", "value"),
    [
        (BASE, CR4_DEFAULT | int(Cr4.LA57)),
        (BASE, CR4_DEFAULT | (1 << 15)),
        (BASE, CR4_DEFAULT | (1 << 32)),
        (BASE, 0),
        (BASE, int(Cr4.PGE)),
    ],
    ids=["set-LA57", "reserved-bit-15", "bit-32", "clear-PAE", "clear-PAE-set-PGE"],
)
def test_cr4_gp_cases(state: ArchState, value: int) -> None:
    """Vol. 2A MOV CR (64-bit mode): #GP(0) for a reserved CR4 bit, for changing
    CR4.LA57 in IA-32e mode, and for leaving IA-32e mode by clearing CR4.PAE."""
    gp(write_cr4(state, value))


def test_cr4_setting_pcide_needs_cr3_pcid_zero() -> None:
    """SDM 4.10.1, Vol. 2A MOV CR: setting CR4.PCIDE while CR3[11:0] != 000H is
    #GP(0); with CR3[11:0] = 0 it succeeds."""
    state = ArchState(cr3=ROOT | 0x5)
    gp(write_cr4(state, CR4_DEFAULT | int(Cr4.PCIDE)))
    assert ok(write_cr4(ArchState(cr3=ROOT), CR4_DEFAULT | int(Cr4.PCIDE))).state.cr4 & Cr4.PCIDE


def test_cr4_setting_pcide_outside_ia32e_mode_is_gp() -> None:
    """SDM 4.10.1: CR4.PCIDE can be set only in IA-32e mode (IA32_EFER.LMA = 1)."""
    state = ArchState(efer=int(Efer.LME))
    gp(write_cr4(state, CR4_DEFAULT | int(Cr4.PCIDE)))


def test_cr4_keeping_pcide_with_nonzero_pcid_is_fine() -> None:
    """The CR3[11:0] = 0 rule applies to *setting* PCIDE (0 -> 1) only; rewriting
    CR4 with PCIDE already 1 under PCID 5 is allowed."""
    state = ArchState(cr3=ROOT | 5, cr4=CR4_DEFAULT | int(Cr4.PCIDE))
    assert ok(write_cr4(state, CR4_DEFAULT | int(Cr4.PCIDE) | int(Cr4.SMAP))).effect is TlbEffect.NONE


def test_cr4_pke_is_outside_the_model() -> None:
    """Protection keys are not modelled: asking for CR4.PKE is a caller error."""
    with pytest.raises(RefmodelError):
        write_cr4(BASE, CR4_DEFAULT | int(Cr4.PKE))


@pytest.mark.parametrize(
    ("old", "new", "effect"),
    [
        (CR4_DEFAULT, CR4_DEFAULT | int(Cr4.PGE), TlbEffect.ALL_INCLUDING_GLOBAL),
        (CR4_DEFAULT | int(Cr4.PGE), CR4_DEFAULT, TlbEffect.ALL_INCLUDING_GLOBAL),
        (CR4_DEFAULT | int(Cr4.PCIDE), CR4_DEFAULT, TlbEffect.ALL_INCLUDING_GLOBAL),
        (CR4_DEFAULT, CR4_DEFAULT | int(Cr4.PCIDE), TlbEffect.NONE),
        (CR4_DEFAULT, CR4_DEFAULT | int(Cr4.SMEP), TlbEffect.ALL_INCLUDING_GLOBAL),
        (CR4_DEFAULT | int(Cr4.SMEP), CR4_DEFAULT, TlbEffect.NONE),
        (CR4_DEFAULT, CR4_DEFAULT | int(Cr4.SMAP), TlbEffect.NONE),
        (CR4_DEFAULT | int(Cr4.PGE), CR4_DEFAULT | int(Cr4.PGE), TlbEffect.NONE),
    ],
    ids=["PGE-0-1", "PGE-1-0", "PCIDE-1-0", "PCIDE-0-1", "SMEP-0-1", "SMEP-1-0", "SMAP", "same"],
)
def test_cr4_tlb_effects(old: int, new: int, effect: TlbEffect) -> None:
    """SDM 4.10.4.1: MOV to CR4 invalidates all entries, globals included, if it
    changes PGE or clears PCIDE; it invalidates the current PCID's entries if it sets
    SMEP (the model flushes everything — allowed, the processor is always free to
    invalidate more); other changes invalidate nothing."""
    w = ok(write_cr4(ArchState(cr4=old), new))
    assert w.effect is effect
    assert w.state.cr4 == new


# =====================================================================================
# MOV to CR0
# =====================================================================================


@pytest.mark.parametrize(
    "value",
    [
        CR0_DEFAULT | (1 << 32),
        CR0_DEFAULT & ~int(Cr0.PE),
        CR0_DEFAULT | int(Cr0.NW),
        CR0_DEFAULT & ~int(Cr0.PG),
    ],
    ids=["bit-32", "PG-without-PE", "NW-without-CD", "clear-PG"],
)
def test_cr0_gp_cases(value: int) -> None:
    """Vol. 2A MOV CR (64-bit mode): #GP(0) for bits 63:32, for PG = 1 with PE = 0,
    for NW = 1 with CD = 0, and for clearing CR0.PG."""
    gp(write_cr0(BASE, value))


def test_cr0_wp_toggle_needs_no_invalidation() -> None:
    """SDM 4.10.4.1 lists no invalidation for CR0.WP; the model's TLB caches rights
    and re-judges them on every hit, so the new WP applies at once."""
    w = ok(write_cr0(BASE, CR0_DEFAULT & ~int(Cr0.WP)))
    assert w.effect is TlbEffect.NONE
    assert not w.state.cr0 & Cr0.WP


def test_cr0_cd_and_nw_together_are_fine() -> None:
    """CR0.NW = 1 is allowed together with CR0.CD = 1."""
    assert ok(write_cr0(BASE, CR0_DEFAULT | int(Cr0.CD | Cr0.NW))).state.cr0 & Cr0.NW


# =====================================================================================
# WRMSR IA32_EFER
# =====================================================================================


@pytest.mark.parametrize("bit", [1, 9, 12, 20, 63])
def test_efer_reserved_bit_is_gp(bit: int) -> None:
    """SDM 2.2.1: writing a reserved IA32_EFER bit is #GP(0) — below bit 12 as well
    as above it."""
    gp(write_efer(BASE, BASE.efer | (1 << bit)))


def test_efer_changing_lme_with_paging_on_is_gp() -> None:
    """SDM 9.8.5: IA32_EFER.LME cannot change while CR0.PG = 1."""
    gp(write_efer(BASE, BASE.efer & ~int(Efer.LME)))


def test_efer_lma_is_read_only() -> None:
    """SDM 2.2.1: LMA is set by the processor; a WRMSR value without it leaves it set."""
    w = ok(write_efer(BASE, int(Efer.LME | Efer.NXE | Efer.SCE)))
    assert w.state.efer == int(Efer.LME | Efer.LMA | Efer.NXE | Efer.SCE)
    assert w.effect is TlbEffect.NONE


def test_efer_nxe_off_makes_xd_reserved_for_the_next_walk() -> None:
    """SDM 4.6: clearing IA32_EFER.NXE makes bit 63 of every entry reserved. WRMSR
    is not among the operations that invalidate the TLB (4.10.4.1), so a translation
    cached before may still be used; the next walk reports the reserved bit."""
    m = machine()
    m.map(VA, PA, SUPER_RW | PteFlag.XD)
    m.access(VA, read())
    assert m.mmu.wrmsr_efer(int(Efer.LME)) is None
    assert not m.mmu.state.efer & Efer.NXE
    assert m.pa_of(VA) == PA  # the cached translation
    m.mmu.invlpg(VA)
    assert m.fault(VA, read()).error_code == P | RSVD


# =====================================================================================
# ArchState
# =====================================================================================


def test_arch_state_rejects_bad_shapes() -> None:
    """Sixteen general registers and a CPL of 0..3; anything else is a caller error."""
    with pytest.raises(RefmodelError):
        ArchState(gprs=(0,) * 15)
    with pytest.raises(RefmodelError):
        ArchState(cpl=4)


def test_arch_state_paging_context() -> None:
    """The walk sees CR0/CR3/CR4/EFER/RFLAGS as stored; PCID 0 unless CR4.PCIDE."""
    s = ArchState(cr3=ROOT | 3, rflags=int(Rflags.FIXED1 | Rflags.AC), cr4=CR4_DEFAULT | int(Cr4.PCIDE))
    ctx = s.paging_context(40, page1gb=False)
    assert (ctx.pml4_base, ctx.pcid, ctx.ac, ctx.maxphyaddr, ctx.page1gb) == (ROOT, 3, True, 40, False)
    assert ArchState(cr3=ROOT | 3).pcid == 0


def test_with_gpr_truncates_to_64_bits() -> None:
    assert ArchState().with_gpr(3, -1).gprs[3] == (1 << 64) - 1


# =====================================================================================
# The MMU applies each write, or leaves everything alone on #GP
# =====================================================================================


def test_rejected_write_changes_nothing() -> None:
    """A #GP write leaves the state and the TLB as they were."""
    m = machine(cr4=CR4_DEFAULT | int(Cr4.PGE))
    m.map(VA, PA, SUPER_RW)
    m.access(VA, read())
    before = m.mmu.state
    assert isinstance(m.mmu.mov_cr4(int(Cr4.PGE)), GeneralProtection)  # clears PAE
    assert isinstance(m.mmu.mov_cr0(0), GeneralProtection)
    assert isinstance(m.mmu.mov_cr3(1 << 60), GeneralProtection)
    assert isinstance(m.mmu.wrmsr_efer(1 << 30), GeneralProtection)
    assert m.mmu.state == before
    assert len(m.tlb.entries()) == 1


def test_mov_cr3_reloads_the_address_space() -> None:
    """MOV to CR3 points the walk at a new PML4 and flushes the old translations:
    with an empty PML4 loaded, the page faults as not-present."""
    m = machine()
    m.map(VA, PA, SUPER_RW)
    m.access(VA, read())
    m.mem.load_frame(0x500, bytes(4096))
    assert m.mmu.mov_cr3(0x500 << 12) is None
    assert m.fault(VA, read()).error_code == 0


# =====================================================================================
# INVPCID's #GP cases (Vol. 2A)
# =====================================================================================


@pytest.mark.parametrize(
    ("cr4", "kind", "pcid", "va"),
    [
        (CR4_DEFAULT | int(Cr4.PCIDE), 4, 0, 0),
        (CR4_DEFAULT | int(Cr4.PCIDE), 1, 0x1000, 0),
        (CR4_DEFAULT | int(Cr4.PCIDE), 2, 0x1000, 0),
        (CR4_DEFAULT | int(Cr4.PCIDE), 0, 1, 1 << 47),
        (CR4_DEFAULT, 0, 1, VA),
        (CR4_DEFAULT, 1, 1, 0),
    ],
    ids=["type-4", "pcid-above-fff", "type2-pcid-above-fff", "type0-non-canonical",
         "type0-pcid-without-pcide", "type1-pcid-without-pcide"],
)
def test_invpcid_gp_cases(cr4: int, kind: int, pcid: int, va: int) -> None:
    """INVPCID (Vol. 2A), 64-bit mode #GP(0): the type is above 3; bits 63:12 of the
    descriptor (above the PCID) are not zero; CR4.PCIDE = 0 and a type 0 or 1 names a
    PCID other than 000H; type 0 with a non-canonical linear address."""
    m = machine(cr4=cr4)
    m.map(VA, PA, SUPER_RW)
    m.access(VA, read())
    out = m.mmu.invpcid(kind, pcid, va)
    assert isinstance(out, GeneralProtection) and out.error_code == 0
    assert len(m.tlb.entries()) == 1  # nothing was invalidated


@pytest.mark.parametrize(("kind", "pcid"), [(0, 0), (1, 0), (2, 5), (3, 5)])
def test_invpcid_allowed_without_pcide(kind: int, pcid: int) -> None:
    """INVPCID (Vol. 2A): with CR4.PCIDE = 0, types 0 and 1 are allowed for PCID
    000H, and types 2 and 3 ignore the PCID; the linear address matters for type 0
    only (a non-canonical one is fine for the other types)."""
    m = machine()
    va = VA if kind == 0 else 1 << 47
    assert m.mmu.invpcid(kind, pcid, va) is None
