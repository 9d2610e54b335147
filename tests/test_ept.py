"""EPT as the SDM defines it (Vol. 3C 29.3): the entry and EPTP formats, the walk of
one guest-physical address, and the two ways it fails — misconfiguration (a value
reserved for the future) and violation (not present, or the access is refused).
"""

import pytest

from refmodel.arch.access import AccessKind
from refmodel.arch.pte import Level, PageSize, table_index
from refmodel.arch.types import ENTRY_SIZE, GFN, MFN, PAGE_SHIFT
from refmodel.errors import RefmodelError
from refmodel.hv.hap import (
    Ept,
    EptCapabilities,
    EptFlag,
    EptMemType,
    EptMisconfiguration,
    Eptp,
    EptRights,
    EptTranslation,
    EptViolation,
    ept_walk,
)
from refmodel.hv.hap.ept import EptAccess, make_leaf
from refmodel.hv.machine import Machine

R, W, X = EptFlag.R, EptFlag.W, EptFlag.X
LEVELS = (Level.L4, Level.L3, Level.L2, Level.L1)
#: a GFN whose four EPT indices differ (L4 1, L3 2, L2 3, L1 4), so no level shares a slot
GFN_A = GFN((1 << 27) | (2 << 18) | (3 << 9) | 4)


def ept_with(gfn: int = GFN_A, perms: EptFlag | int = R | W | X) -> tuple[Machine, Ept, MFN]:
    """A machine, an EPT, and one domain frame mapped at ``gfn``."""
    machine = Machine(nr_frames=2048, hypervisor_frames=64)
    dom = machine.create_domain(1, 1)
    mfn = dom.p2m[GFN(0)]
    ept = Ept(machine)
    ept.write_leaf(gfn, make_leaf(mfn, perms))
    return machine, ept, mfn


def entry_addr(ept: Ept, gfn: int, level: Level) -> int:
    addr = ept.entry_addr(gfn, level)
    assert addr is not None
    return addr


def set_bits(machine: Machine, addr: int, set_: int = 0, clear: int = 0) -> None:
    machine.mem.write_u64(addr, (machine.mem.read_u64(addr) & ~clear) | set_)


def go(machine: Machine, ept: Ept, kind: AccessKind = AccessKind.READ, gfn: int = GFN_A,
       caps: EptCapabilities = EptCapabilities(), offset: int = 0x123) -> EptTranslation | EptViolation | EptMisconfiguration:
    return ept_walk(machine.mem, ept.eptp, (gfn << PAGE_SHIFT) + offset, EptAccess(kind, gla=0x4000, final=True), caps).outcome


# -- formats ------------------------------------------------------------------------------------


def test_leaf_format_matches_the_sdm_table() -> None:
    """EPT PTE: R bit 0, W bit 1, X bit 2, memory type bits 5:3, ignore-PAT bit 6,
    frame bits N-1:12 (SDM Vol. 3C Table 29-6)."""
    entry = make_leaf(0x1234, R | W, EptMemType.WB)
    assert entry & 0x7 == 0b011
    assert (entry >> 3) & 0x7 == 6
    assert entry & (1 << 6)
    assert entry >> PAGE_SHIFT == 0x1234
    assert make_leaf(0x1234, X, EptMemType.UC, ignore_pat=False) == (0x1234 << 12) | 0b100


def test_leaf_refuses_bits_beyond_rwx() -> None:
    with pytest.raises(RefmodelError, match="beyond R/W/X"):
        make_leaf(1, 1 << 7)


def test_eptp_format_and_round_trip() -> None:
    """EPTP: memory type bits 2:0 (WB = 6), walk length - 1 in bits 5:3 (3), PML4 at 12."""
    eptp = Eptp(MFN(0x42))
    assert eptp.value == 0x42000 | (3 << 3) | 6
    assert Eptp.decode(eptp.value) == eptp
    assert Eptp.decode(0x42000 | (3 << 3)).memtype is EptMemType.UC


@pytest.mark.parametrize(
    "value, message",
    [
        (0x42000 | (3 << 3) | 2, "neither UC nor WB"),
        (0x42000 | (3 << 3) | 6 | (1 << 6), "accessed/dirty"),
        (0x42000 | (3 << 3) | 6 | (1 << 9), "reserved"),
        (0x42000 | (4 << 3) | 6, "walk length 5"),
    ],
)
def test_eptp_decode_refuses_what_vm_entry_refuses(value: int, message: str) -> None:
    with pytest.raises(RefmodelError, match=message):
        Eptp.decode(value)


def test_built_ept_mirrors_the_p2m_in_xen_frames() -> None:
    machine = Machine(nr_frames=2048, hypervisor_frames=64)
    dom = machine.create_domain(1, 600)  # two EPT page tables
    ept = Ept.from_p2m(machine, dom)
    assert {(m.gfn, m.mfn) for m in ept.mappings()} == set(dom.p2m.items())
    assert all(m.rights == EptRights() and m.size is PageSize.SIZE_4K for m in ept.mappings())
    tables = ept.tables()
    assert len(tables) == 5 and all(machine.is_hypervisor_frame(t) for t in tables)


# -- translation ----------------------------------------------------------------------------------


def test_walk_translates_with_four_reads() -> None:
    machine, ept, mfn = ept_with()
    r = ept_walk(machine.mem, ept.eptp, (GFN_A << 12) + 0x123, EptAccess(AccessKind.WRITE))
    assert isinstance(r.outcome, EptTranslation)
    assert r.outcome.mpa == (mfn << 12) + 0x123
    assert r.outcome.rights == EptRights(True, True, True)
    assert r.refs == 4


def test_large_pages_translate_with_fewer_reads() -> None:
    """An EPT PDE with bit 7 maps 2 MiB (3 reads); a PDPTE 1 GiB (2 reads)."""
    machine, ept, _ = ept_with()
    base = 0x20_0000_0000  # 1 GiB aligned machine address, beyond the machine's frames
    machine.mem.write_u64(entry_addr(ept, GFN_A, Level.L2), base | int(R | W | X | EptFlag.PS) | (6 << 3))
    gpa = (GFN_A << 12) + 0x123
    r = ept_walk(machine.mem, ept.eptp, gpa, EptAccess(AccessKind.READ))
    assert isinstance(r.outcome, EptTranslation)
    assert (r.outcome.size, r.outcome.mpa, r.refs) == (PageSize.SIZE_2M, base | (gpa & 0x1F_FFFF), 3)
    machine.mem.write_u64(entry_addr(ept, GFN_A, Level.L3), base | int(R | X | EptFlag.PS) | (6 << 3))
    r = ept_walk(machine.mem, ept.eptp, gpa, EptAccess(AccessKind.FETCH))
    assert isinstance(r.outcome, EptTranslation)
    assert (r.outcome.size, r.outcome.mpa, r.refs) == (PageSize.SIZE_1G, base | (gpa & 0x3FFF_FFFF), 2)


# -- violations -------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", LEVELS, ids=[lvl.entry_name for lvl in LEVELS])
def test_not_present_entry_is_a_violation_whatever_its_other_bits(level: Level) -> None:
    """Bits 2:0 = 000: not present, bits 63:3 ignored (so no misconfiguration)."""
    machine, ept, _ = ept_with()
    addr = entry_addr(ept, GFN_A, level)
    machine.mem.write_u64(addr, (machine.mem.read_u64(addr) & ~0x7) | (0xFFF << 40) | (7 << 3))
    r = ept_walk(machine.mem, ept.eptp, GFN_A << 12, EptAccess(AccessKind.READ, gla=0x1000, final=False))
    assert isinstance(r.outcome, EptViolation)
    assert r.refs == LEVELS.index(level) + 1
    q = r.outcome.qualification
    assert (q.read, q.write, q.fetch) == (True, False, False)
    assert (q.readable, q.writable, q.executable) == (False, False, False)
    assert q.raw == 0b1 | (1 << 7)  # data read, linear address valid, not the final access


@pytest.mark.parametrize(
    "perms, kind, allowed",
    [
        (R, AccessKind.READ, True),
        (R, AccessKind.WRITE, False),
        (R, AccessKind.FETCH, False),
        (R | W, AccessKind.WRITE, True),
        (R | W, AccessKind.FETCH, False),
        (X, AccessKind.FETCH, True),
        (X, AccessKind.READ, False),
        (R | X, AccessKind.WRITE, False),
    ],
)
def test_leaf_permissions_decide(perms: EptFlag, kind: AccessKind, allowed: bool) -> None:
    machine, ept, _ = ept_with(perms=perms)
    out = go(machine, ept, kind)
    assert isinstance(out, EptTranslation) is allowed
    if isinstance(out, EptViolation):
        q = out.qualification
        assert (q.readable, q.writable, q.executable) == (bool(perms & R), bool(perms & W), bool(perms & X))
        assert q.gla_valid and q.final and out.gla == 0x4000
        assert out.gfn == GFN_A


@pytest.mark.parametrize("level", LEVELS[:3], ids=[lvl.entry_name for lvl in LEVELS[:3]])
def test_permissions_are_anded_over_every_level(level: Level) -> None:
    """An upper entry without W refuses a write even though the leaf allows it."""
    machine, ept, _ = ept_with()
    set_bits(machine, entry_addr(ept, GFN_A, level), clear=int(W))
    out = go(machine, ept, AccessKind.WRITE)
    assert isinstance(out, EptViolation)
    assert (out.qualification.readable, out.qualification.writable) == (True, False)
    assert isinstance(go(machine, ept, AccessKind.READ), EptTranslation)


# -- misconfigurations -------------------------------------------------------------------------------


@pytest.mark.parametrize("level", LEVELS, ids=[lvl.entry_name for lvl in LEVELS])
@pytest.mark.parametrize("perms", [0b010, 0b110], ids=["write-only", "write-execute"])
def test_write_without_read_is_a_misconfiguration(level: Level, perms: int) -> None:
    machine, ept, _ = ept_with()
    set_bits(machine, entry_addr(ept, GFN_A, level), set_=perms, clear=0x7 & ~perms)
    out = go(machine, ept, AccessKind.READ)
    assert isinstance(out, EptMisconfiguration)
    assert out.level is level and "without read" in out.reason


def test_execute_only_depends_on_the_processor() -> None:
    machine, ept, _ = ept_with(perms=X)
    assert isinstance(go(machine, ept, AccessKind.FETCH), EptTranslation)
    out = go(machine, ept, AccessKind.FETCH, caps=EptCapabilities(execute_only=False))
    assert isinstance(out, EptMisconfiguration) and "execute-only" in out.reason


@pytest.mark.parametrize("memtype", [2, 3, 7])
def test_reserved_memory_type_in_the_leaf(memtype: int) -> None:
    machine, ept, _ = ept_with()
    set_bits(machine, entry_addr(ept, GFN_A, Level.L1), set_=memtype << 3, clear=0x38)
    out = go(machine, ept)
    assert isinstance(out, EptMisconfiguration) and "memory type" in out.reason


@pytest.mark.parametrize(
    "level, bits",
    [
        (Level.L4, 1 << 3),  # bits 7:3 of a PML4E
        (Level.L4, 1 << 7),
        (Level.L3, 1 << 6),  # ignore-PAT in a PDPTE that references a table
        (Level.L2, 6 << 3),  # a memory type in a PDE that references a table
        (Level.L1, 1 << 45),  # beyond MAXPHYADDR (40)
        (Level.L3, 1 << 51),
    ],
)
def test_reserved_bits_are_misconfigurations(level: Level, bits: int) -> None:
    machine, ept, _ = ept_with()
    set_bits(machine, entry_addr(ept, GFN_A, level), set_=bits)
    out = go(machine, ept)
    assert isinstance(out, EptMisconfiguration) and "reserved bits" in out.reason


def test_misaligned_or_unsupported_large_pages_are_misconfigurations() -> None:
    machine, ept, _ = ept_with()
    pde = entry_addr(ept, GFN_A, Level.L2)
    machine.mem.write_u64(pde, 0x4000_0000 | (1 << 12) | int(R | W | X | EptFlag.PS) | (6 << 3))
    assert isinstance(go(machine, ept), EptMisconfiguration)  # bits 20:12 of a 2 MiB PDE
    machine.mem.write_u64(pde, 0x4000_0000 | int(R | W | X | EptFlag.PS) | (6 << 3))
    assert isinstance(go(machine, ept), EptTranslation)
    assert isinstance(go(machine, ept, caps=EptCapabilities(page_2m=False)), EptMisconfiguration)


def test_misconfiguration_wins_over_a_violation_higher_up() -> None:
    """SDM 29.3.3.2: a violation needs a translation that causes no misconfiguration,
    so a write refused by the PML4E still reports the leaf's reserved memory type."""
    machine, ept, _ = ept_with()
    set_bits(machine, entry_addr(ept, GFN_A, Level.L4), clear=int(W))
    set_bits(machine, entry_addr(ept, GFN_A, Level.L1), set_=7 << 3, clear=0x38)
    assert isinstance(go(machine, ept, AccessKind.WRITE), EptMisconfiguration)


def test_walk_refuses_addresses_beyond_48_bits() -> None:
    machine, ept, _ = ept_with()
    with pytest.raises(RefmodelError, match="48 bits"):
        ept_walk(machine.mem, ept.eptp, 1 << 48, EptAccess(AccessKind.READ))


def test_table_editor_indexes_like_the_walk() -> None:
    """The editor's entry for a GFN is the one the hardware reads (same 9-bit indices)."""
    machine, ept, _ = ept_with()
    l1 = entry_addr(ept, GFN_A, Level.L1)
    assert (l1 % 4096) // ENTRY_SIZE == table_index(GFN_A << 12, Level.L1) == 4
    assert ept.lookup(GFN_A + 1) is None and ept.entry_addr(1 << 20) is None
