"""The public ABI numbers, as xen/include/public/xen.h and errno.h define them, and
the entry-flag masks cross-checked against Xen's own 24-bit flag encoding."""

import pytest

from refmodel.arch.pte import PteFlag
from refmodel.errors import RefmodelError
from refmodel.hv import machine
from refmodel.hv.pv import Domid, Errno, Hypercall, MmuCmd, MmuextCmd, MmuextOp, MmuUpdate, MulticallEntry, Uvmf
from refmodel.hv.pv.errno import errno_name, neg
from refmodel.hv.pv.pteflags import (
    FASTPATH_FLAG_WHITELIST,
    UPPER_DISALLOW_MASK,
    entry_has_changed,
    l1_disallow_mask,
)


def test_hypercall_and_command_numbers() -> None:
    assert [(h.name, h.value) for h in Hypercall] == [
        ("MMU_UPDATE", 1), ("MULTICALL", 13), ("UPDATE_VA_MAPPING", 14),
        ("UPDATE_VA_MAPPING_OTHERDOMAIN", 22), ("MMUEXT_OP", 26),
    ]
    assert [int(c) for c in MmuCmd] == [0, 1, 2, 3]
    assert {c.name: c.value for c in MmuextCmd} == {
        "PIN_L1_TABLE": 0, "PIN_L2_TABLE": 1, "PIN_L3_TABLE": 2, "PIN_L4_TABLE": 3, "UNPIN_TABLE": 4,
        "NEW_BASEPTR": 5, "TLB_FLUSH_LOCAL": 6, "INVLPG_LOCAL": 7, "TLB_FLUSH_MULTI": 8, "INVLPG_MULTI": 9,
        "TLB_FLUSH_ALL": 10, "INVLPG_ALL": 11, "FLUSH_CACHE": 12, "SET_LDT": 13, "NEW_USER_BASEPTR": 15,
        "CLEAR_PAGE": 16, "COPY_PAGE": 17, "FLUSH_CACHE_GLOBAL": 18, "MARK_SUPER": 19, "UNMARK_SUPER": 20,
    }
    assert (Uvmf.NONE, Uvmf.TLB_FLUSH, Uvmf.INVLPG, Uvmf.FLUSHTYPE_MASK, Uvmf.LOCAL, Uvmf.ALL) == (0, 1, 2, 3, 0, 4)
    assert (Domid.SELF, Domid.IO, Domid.XEN, Domid.COW, Domid.INVALID) == (0x7FF0, 0x7FF1, 0x7FF2, 0x7FF3, 0x7FF4)
    assert (int(Domid.SELF), int(Domid.XEN)) == (int(machine.DOMID_SELF), int(machine.DOMID_XEN))


def test_errno_values_and_negative_returns() -> None:
    assert {e.name: e.value for e in Errno if e.name in ("EPERM", "ESRCH", "ENOMEM", "EFAULT", "EBUSY", "EINVAL", "ENOSYS")} == {
        "EPERM": 1, "ESRCH": 3, "ENOMEM": 12, "EFAULT": 14, "EBUSY": 16, "EINVAL": 22, "ENOSYS": 38,
    }
    assert neg(Errno.EINVAL) == -22
    assert (errno_name(0), errno_name(-16), errno_name(-999)) == ("0", "-EBUSY", "-999")


def test_request_structures() -> None:
    req = MmuUpdate.pt_update(0x1234_5000 + 8 * 3, 0xABC, MmuCmd.PT_UPDATE_PRESERVE_AD)
    assert (req.ptr, req.cmd, req.maddr) == (0x1234_5018 | 2, 2, 0x1234_5018)
    with pytest.raises(RefmodelError, match="aligned"):
        MmuUpdate.pt_update(0x1004, 0)
    with pytest.raises(RefmodelError, match="64-bit"):
        MmuUpdate(1 << 64, 0)
    with pytest.raises(RefmodelError, match="32-bit"):
        MmuextOp(-1)
    with pytest.raises(RefmodelError, match="6 argument slots"):
        MulticallEntry(Hypercall.MMU_UPDATE, args=(0,) * 7)
    with pytest.raises(AttributeError):
        req.val = 1  # type: ignore[misc]


# -- Xen's 24-bit flag encoding (asm/x86_64/page.h get_pte_flags / put_pte_flags) -------------
def get_pte_flags(pte: int) -> int:
    return ((pte >> 40) & ~0xFFF) | (pte & 0xFFF)


def put_pte_flags(flags: int) -> int:
    return ((flags & ~0xFFF) << 40 | (flags & 0xFFF)) & ((1 << 64) - 1)


#: asm/page.h and asm/x86_64/page.h, in Xen's flag space.
_PAGE_PRESENT, _PAGE_RW, _PAGE_USER, _PAGE_PWT, _PAGE_PCD = 0x1, 0x2, 0x4, 0x8, 0x10
_PAGE_ACCESSED, _PAGE_DIRTY, _PAGE_PAT, _PAGE_GLOBAL = 0x20, 0x40, 0x80, 0x100
_PAGE_AVAIL, _PAGE_AVAIL_HIGH, _PAGE_NX_BIT = 0xE00, 0x7FF << 12, 1 << 23
FLAG_SPACE = (1 << 24) - 1
#: arch_init_memory: base_disallow_mask = ~(P|RW|USER|A|D|AVAIL|AVAIL_HIGH|NX), 32-bit.
BASE_DISALLOW = ~(_PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED | _PAGE_DIRTY
                  | _PAGE_AVAIL | _PAGE_AVAIL_HIGH | _PAGE_NX_BIT) & 0xFFFF_FFFF


def test_disallow_masks_match_xens_flag_encoding() -> None:
    assert UPPER_DISALLOW_MASK == put_pte_flags(BASE_DISALLOW & FLAG_SPACE)
    l1 = BASE_DISALLOW & ~_PAGE_GLOBAL  # L1_DISALLOW_MASK (release build: _PAGE_GNTTAB = 0)
    assert l1_disallow_mask(False) == put_pte_flags(l1 & FLAG_SPACE)
    assert l1_disallow_mask(True) == put_pte_flags(l1 & ~(_PAGE_PAT | _PAGE_PCD | _PAGE_PWT) & FLAG_SPACE)
    whitelist = _PAGE_NX_BIT | _PAGE_AVAIL_HIGH | _PAGE_AVAIL | _PAGE_GLOBAL | _PAGE_DIRTY | _PAGE_ACCESSED | _PAGE_USER
    assert FASTPATH_FLAG_WHITELIST == put_pte_flags(whitelist)
    assert get_pte_flags(int(PteFlag.XD)) == _PAGE_NX_BIT


@pytest.mark.parametrize(
    "old, new, changed",
    [
        (0x5000 | 0x7, 0x5000 | 0x27, False),  # A set
        (0x5000 | 0x7, 0x5000 | 0x5, True),  # RW cleared
        (0x5000 | 0x7, 0x6000 | 0x7, True),  # another frame
        (0x5000 | 0x7, 0x5000 | 0x7 | 1 << 63 | 1 << 55, False),  # NX and an AVAIL_HIGH bit
        (0x5000 | 0x7, 0x5000 | 0x7 | 0x10, True),  # PCD
    ],
)
def test_entry_has_changed_is_l1e_has_changed(old: int, new: int, changed: bool) -> None:
    xen = bool((old ^ new) & ((((1 << 52) - 1) & ~0xFFF) | put_pte_flags(~get_pte_flags(FASTPATH_FLAG_WHITELIST) & FLAG_SPACE)))
    assert entry_has_changed(old, new, FASTPATH_FLAG_WHITELIST) is changed is xen
