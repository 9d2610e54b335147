"""Batch two-dimensional translation: N guest-linear addresses of one guest on EPT.

:func:`translate_nested_batch` computes, for every address, what the slow path —
the canonical-address check of :meth:`refmodel.arch.mmu.Mmu.translate`, then
:func:`refmodel.hv.hap.nested.nested_walk` (no TLB) — computes when called on the
addresses one after another, in array order: the machine address, the combined page
size, the guest's and EPT's rights, the guest #PF (CR2, error code, cause), the EPT
violation (guest-physical address, exit qualification) or EPT misconfiguration
(level, entry, reason), the guest and EPT references made (up to 4 + 4·5 = 24,
SDM Vol. 3C 29.3.2) — and it leaves the guest's Accessed/Dirty flags in memory as
those N walks leave them. :func:`ept_walk_batch` is the one-dimensional part: N
guest-physical addresses through EPT, equal to N calls of
:func:`refmodel.hv.hap.ept.ept_walk`.

Why the batch may ignore the order, and where it may not (the argument of
:mod:`refmodel.fast.translate`, extended to two dimensions):

1. The guest walk decides from P, PS, R/W, U/S, XD, address and reserved bits of
   the guest entries (SDM Vol. 3A 4.5, 4.6), never from A or D; the EPT walk decides
   from EPT entries alone (29.3.2, 29.3.3). A walk writes only by OR-ing A (and D)
   into a *guest* entry it has read (4.8).
2. So if no guest entry the batch writes lies in a frame the batch's EPT walks read
   (EPT tables mapped into the guest, which no sane hypervisor does), every EPT
   outcome and every guest decision can be computed from memory as it was before the
   batch, and the final memory is that memory OR every walk's A/D bits.
3. Two dimensions add one decision that *does* read A/D: the A/D update is a data
   write for EPT (29.3.3.2) and needs EPT write permission, but the processor writes
   only when a flag is missing (:func:`~refmodel.arch.walk.set_accessed`). Whether a
   walk exits on that write therefore depends on whether an *earlier* walk already
   set the flag. That happens only if one guest entry (one machine word) is reached
   both through a translation granting EPT write (some walk sets a flag there) and
   through one refusing it (some walk needs a flag there that is clear before the
   batch) — a guest page-table frame mapped at two guest-physical addresses with
   different EPT rights. If no word is both written and refused, then by induction
   over the batch each walk meets, at every entry, either a granted write (it never
   exits) or a refused one whose flags no walk ever sets (the entry is the same as
   before the batch): the order-free computation is exact.
4. As in one dimension, the D flag a translation reports depends on earlier writes
   through the same leaf (machine word): a prefix computation. A walk sets A/D in
   the guest leaf *before* EPT translates the final guest-physical address, so a
   walk that then exits has still set them.

When 2 or 3 fails for some batch the order matters, and the batch is computed by the
slow path, address by address (``NestedBatchResult.sequential`` says so): exact,
not fast. Nothing else falls back.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..arch.access import Access, AccessKind
from ..arch.fault import FaultCause, GeneralProtection, PageFault, PfErrorCode, fetch_reports_id
from ..arch.physmem import PhysicalMemory
from ..arch.pte import Level, PageSize, PteFlag, phys_addr_mask
from ..arch.types import GPA, PA, PAGE_SHIFT, VA
from ..arch.walk import PagingContext, Rights, is_canonical
from ..errors import RefmodelError
from ..hv.hap.ept import (
    NONLEAF_RESERVED,
    RESERVED_MEMTYPES,
    EptAccess,
    EptCapabilities,
    EptFlag,
    EptMisconfiguration,
    Eptp,
    EptRights,
    EptTranslation,
    EptViolation,
    ept_walk,
    misconfiguration,
    violation,
)
from ..hv.hap.nested import CombinedTranslation, NestedWalkResult, nested_walk
from .snapshot import WORDS_PER_FRAME, FrameSnapshot
from .translate import (
    CAUSES,
    KIND_FETCH,
    KIND_READ,
    KIND_WRITE,
    KINDS,
    _dirty_after,
    _or_bits,
    _per_address,
    denial_codes,
    kind_codes,
)

U64 = NDArray[np.uint64]
U8 = NDArray[np.uint8]
Bools = NDArray[np.bool_]
Idx = NDArray[np.intp]

#: ``status`` values: 0 for a translation, the exception vector for a #GP or guest
#: #PF, the basic VM-exit reason for an EPT exit (SDM Vol. 3D App. C: 48, 49).
STATUS_OK = 0
STATUS_GP = GeneralProtection.VECTOR
STATUS_PF = PageFault.VECTOR
STATUS_EPT_VIOLATION = 48
STATUS_EPT_MISCONFIG = 49

_C = {c: i + 1 for i, c in enumerate(CAUSES)}
_C_NOT_PRESENT = _C[FaultCause.NOT_PRESENT]
_C_RESERVED = _C[FaultCause.RESERVED_BIT]

_P = np.uint64(int(PteFlag.P))
_A = np.uint64(int(PteFlag.A))
_D = np.uint64(int(PteFlag.D))
_PS = np.uint64(int(PteFlag.PS))
_G = np.uint64(int(PteFlag.G))
_RW_US = np.uint64(int(PteFlag.RW | PteFlag.US))
_XD = np.uint64(int(PteFlag.XD))
#: Reserved bits of a 1 GiB PDPTE (29:13) and a 2 MiB PDE (20:13), SDM Tables 4-17, 4-19.
_RSVD_1G = np.uint64(((1 << 30) - 1) & ~((1 << 13) - 1))
_RSVD_2M = np.uint64(((1 << 21) - 1) & ~((1 << 13) - 1))
_SLOT = np.uint64(WORDS_PER_FRAME - 1)
_ZERO = np.uint64(0)

_EPT_RWX = np.uint64(0x7)
_EPT_W = np.uint64(int(EptFlag.W))
_EPT_PS = np.uint64(int(EptFlag.PS))
#: bit m set for each reserved EPT memory type m (SDM 29.3.7)
_RESERVED_MEMTYPE_BITS = np.uint64(sum(1 << m for m in RESERVED_MEMTYPES))


# -- one dimension: guest-physical addresses through EPT ------------------------------------


@dataclass(frozen=True, eq=False)
class EptBatch:
    """Per-address outcome of :func:`ept_walk_batch` (arrays of length N).

    ``status`` is 0, :data:`STATUS_EPT_VIOLATION` or :data:`STATUS_EPT_MISCONFIG`;
    ``rights`` holds EPT bits 2:0 ANDed over the entries read (the qualification's
    bits 5:3 for a violation); ``mpa`` and ``size`` are 0 unless translated;
    ``level`` and ``entry`` are the misconfigured entry's, else 0."""

    status: U8
    refs: U8
    mpa: U64
    size: U64
    rights: U8
    level: U8
    entry: U64

    def gather(self, idx: Idx) -> "EptBatch":
        """The outcomes of addresses ``idx``, in that order."""
        return EptBatch(self.status[idx], self.refs[idx], self.mpa[idx], self.size[idx], self.rights[idx],
                        self.level[idx], self.entry[idx])


def ept_walk_batch(
    snap: FrameSnapshot,
    eptp: Eptp,
    gpas: ArrayLike,
    kind: ArrayLike = KIND_READ,
    caps: EptCapabilities = EptCapabilities(),
    rows_read: Bools | None = None,
) -> EptBatch:
    """:func:`refmodel.hv.hap.ept.ept_walk` for every address of ``gpas`` (an EPT walk
    writes nothing, so the order is irrelevant). ``kind`` is a code
    (:data:`~refmodel.fast.translate.KIND_READ` ...) or one per address. If
    ``rows_read`` is given, the snapshot rows the walks read are marked in it."""
    gpa = np.asarray(gpas, dtype=np.uint64)
    n = int(gpa.size)
    k = np.asarray(_per_address(kind, n, np.uint8, "kind"), dtype=np.uint8)
    if n and int(gpa.max()) >= 1 << 48:
        raise RefmodelError(f"guest-physical address {int(gpa.max()):#x} is beyond 4-level EPT's 48 bits")
    m = snap.maxphyaddr
    addr_mask = phys_addr_mask(m)
    high = np.uint64(((1 << 52) - 1) & ~((1 << m) - 1))
    words = snap.words.reshape(-1)
    nrows = snap.frames.size + 1
    wanted = np.uint64(1) << k.astype(np.uint64)  # bit 0 read, 1 write, 2 fetch (29.3.3.2)

    row = np.full(n, snap.row(eptp.pml4), dtype=np.intp)
    alive = np.ones(n, dtype=np.bool_)
    status = np.zeros(n, dtype=np.uint8)
    refs = np.zeros(n, dtype=np.uint8)
    rights = np.full(n, _EPT_RWX, dtype=np.uint64)
    mpa = np.zeros(n, dtype=np.uint64)
    size = np.zeros(n, dtype=np.uint64)
    mc_level = np.zeros(n, dtype=np.uint8)
    mc_entry = np.zeros(n, dtype=np.uint64)
    for level in (4, 3, 2, 1):
        if rows_read is not None:
            rows_read[row[alive]] = True
        slot = (gpa >> np.uint64(PAGE_SHIFT + 9 * (level - 1))) & _SLOT
        flat = (row << 9) | slot.astype(np.intp)
        e = words[flat]
        refs += alive
        perms = e & _EPT_RWX
        rights &= np.where(alive, perms, _EPT_RWX)
        absent = alive & (perms == 0)
        status[absent] = STATUS_EPT_VIOLATION
        alive &= ~absent
        # misconfiguration (29.3.3.1): W without R, unsupported execute-only, a
        # reserved bit (Tables 29-1..29-6), a reserved memory type in a leaf
        ps = (e & _EPT_PS) != 0
        large_ok = (level == 3 and caps.page_1g) or (level == 2 and caps.page_2m)
        if level == 1:
            rsvd = e & high
            leaf = np.ones(n, dtype=np.bool_)
        elif large_ok:
            large_bits = np.uint64((PageSize.for_leaf_level(Level(level)).value - 1) & ~((1 << PAGE_SHIFT) - 1))
            rsvd = e & (high | np.where(ps, large_bits, np.uint64(NONLEAF_RESERVED)))
            leaf = ps
        else:
            rsvd = e & (high | np.uint64(NONLEAF_RESERVED))
            leaf = ps if level in (3, 2) else np.zeros(n, dtype=np.bool_)  # PS here is reserved
        memtype = (e >> np.uint64(3)) & np.uint64(7)
        bad_memtype = leaf & (((_RESERVED_MEMTYPE_BITS >> memtype) & np.uint64(1)) != 0)
        bad_perms = (perms == 2) | (perms == 6) | ((perms == 4) & (not caps.execute_only))
        bad = alive & (bad_perms | (rsvd != 0) | bad_memtype)
        status[bad] = STATUS_EPT_MISCONFIG
        mc_level[bad] = level
        mc_entry[bad] = e[bad]
        alive &= ~bad
        at_leaf = alive & leaf
        refused = at_leaf & ((rights & wanted) == 0)
        status[refused] = STATUS_EPT_VIOLATION
        done = at_leaf & ~refused
        page = _page_size(level)
        size[done] = page
        mpa[done] = (e[done] & np.uint64(addr_mask) & ~(page - np.uint64(1))) | (gpa[done] & (page - np.uint64(1)))
        alive &= ~at_leaf
        if level == 1 or not alive.any():
            break
        in_use = np.flatnonzero(np.bincount(row[alive], minlength=nrows))
        row = np.where(alive, snap.child_rows(in_use, addr_mask)[flat], snap.zero_row)
    return EptBatch(status, refs, mpa, size, rights.astype(np.uint8), mc_level, mc_entry)


# -- two dimensions -----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class NestedBatchResult:
    """Per-address outcome of a batch 2-D translation (arrays of length N).

    ``status``: :data:`STATUS_OK`, :data:`STATUS_GP` (non-canonical),
    :data:`STATUS_PF` (guest #PF: ``cr2``, ``error_code``, ``cause``),
    :data:`STATUS_EPT_VIOLATION` or :data:`STATUS_EPT_MISCONFIG` (``exit_gpa``, and
    ``exit_kind`` / ``exit_final`` / ``exit_rights`` for the qualification, or
    ``misconfig_level`` / ``misconfig_entry``). A translation has ``mpa``, ``gpa``,
    the combined ``size``, the guest's rights, ``global_page``, ``dirty``,
    ``ept_rights`` and ``leaf_addr``; ``entry_addrs[i, :guest_refs[i]]`` are the
    guest-physical addresses of the guest entries read, top first. ``guest_refs`` and
    ``ept_refs`` count the references of every walk (a #GP makes none).
    ``sequential`` is True when the batch was order-dependent and ran on the slow
    path (module docstring, points 2-3)."""

    va: U64
    kind: U8
    cpl: U8
    implicit: Bools
    status: U8
    mpa: U64
    gpa: U64
    size: U64
    writable: Bools
    user: Bools
    execute_disable: Bools
    global_page: Bools
    dirty: Bools
    ept_rights: U8
    leaf_addr: U64
    entry_addrs: U64
    guest_refs: U8
    ept_refs: U8
    cr2: U64
    error_code: NDArray[np.uint32]
    cause: U8
    exit_gpa: U64
    exit_kind: U8
    exit_final: Bools
    exit_rights: U8
    misconfig_level: U8
    misconfig_entry: U64
    maxphyaddr: int
    caps: EptCapabilities
    sequential: bool

    def __len__(self) -> int:
        return int(self.va.size)

    @property
    def ok(self) -> Bools:
        return np.asarray(self.status == STATUS_OK, dtype=np.bool_)

    @property
    def refs(self) -> NDArray[np.uint16]:
        """Memory references per address: guest + EPT (24 for a cold 4+4-level walk)."""
        return self.guest_refs.astype(np.uint16) + self.ept_refs.astype(np.uint16)

    def outcome(self, i: int) -> CombinedTranslation | PageFault | GeneralProtection | EptViolation | EptMisconfiguration:
        """Address ``i``'s outcome as the slow path's value types."""
        va, st = int(self.va[i]), int(self.status[i])
        if st == STATUS_GP:
            return GeneralProtection(f"non-canonical linear address {va:#x}")
        if st == STATUS_PF:
            return PageFault(cr2=int(self.cr2[i]), error_code=PfErrorCode(int(self.error_code[i])),
                             cause=CAUSES[int(self.cause[i]) - 1])
        if st == STATUS_EPT_VIOLATION:
            access = EptAccess(KINDS[int(self.exit_kind[i])], gla=va, final=bool(self.exit_final[i]))
            return violation(int(self.exit_gpa[i]), access, _ept_rights(int(self.exit_rights[i])))
        if st == STATUS_EPT_MISCONFIG:
            level, entry = Level(int(self.misconfig_level[i])), int(self.misconfig_entry[i])
            reason = misconfiguration(entry, level, self.maxphyaddr, self.caps)
            assert reason is not None, "a misconfiguration the slow rules do not see"
            return EptMisconfiguration(GPA(int(self.exit_gpa[i])), level, entry, reason)
        refs = int(self.guest_refs[i])
        return CombinedTranslation(
            va=VA(va), pa=PA(int(self.mpa[i])), size=PageSize(int(self.size[i])),
            rights=Rights(bool(self.writable[i]), bool(self.user[i]), bool(self.execute_disable[i])),
            global_page=bool(self.global_page[i]), dirty=bool(self.dirty[i]), leaf_addr=int(self.leaf_addr[i]),
            entry_addrs=tuple(int(a) for a in self.entry_addrs[i, :refs].tolist()),
            gpa=GPA(int(self.gpa[i])), ept=_ept_rights(int(self.ept_rights[i])),
        )


def _page_size(level: int) -> np.uint64:
    """The size of the page a leaf of ``level`` maps (level 4 never maps one; the
    value is unused there)."""
    return np.uint64(1 << (PAGE_SHIFT + 9 * (level - 1)))


def _ept_rights(bits: int) -> EptRights:
    return EptRights(bool(bits & EptFlag.R), bool(bits & EptFlag.W), bool(bits & EptFlag.X))


def _rights_bits(r: EptRights) -> int:
    return (int(EptFlag.R) if r.read else 0) | (int(EptFlag.W) if r.write else 0) | (int(EptFlag.X) if r.execute else 0)


class _Lanes:
    """The output arrays of a batch, filled level by level."""

    def __init__(self, n: int) -> None:
        self.status = np.zeros(n, dtype=np.uint8)
        self.mpa = np.zeros(n, dtype=np.uint64)
        self.gpa = np.zeros(n, dtype=np.uint64)
        self.size = np.zeros(n, dtype=np.uint64)
        self.ept_rights = np.zeros(n, dtype=np.uint8)
        self.leaf_addr = np.zeros(n, dtype=np.uint64)
        self.entry_addrs = np.zeros((n, 4), dtype=np.uint64)
        self.guest_refs = np.zeros(n, dtype=np.uint8)
        self.ept_refs = np.zeros(n, dtype=np.uint8)
        self.cause = np.zeros(n, dtype=np.uint8)
        self.exit_gpa = np.zeros(n, dtype=np.uint64)
        self.exit_kind = np.zeros(n, dtype=np.uint8)
        self.exit_final = np.zeros(n, dtype=np.bool_)
        self.exit_rights = np.zeros(n, dtype=np.uint8)
        self.misconfig_level = np.zeros(n, dtype=np.uint8)
        self.misconfig_entry = np.zeros(n, dtype=np.uint64)
        # the guest leaf, for rights, G, D
        self.and_bits = np.full(n, _RW_US, dtype=np.uint64)
        self.or_bits = np.zeros(n, dtype=np.uint64)
        self.leaf_entry = np.zeros(n, dtype=np.uint64)
        self.leaf_flat = np.zeros(n, dtype=np.intp)
        self.d_written = np.zeros(n, dtype=np.bool_)

    def ept_exit(self, lanes: Idx, h: EptBatch, sel: Bools, gpa: U64, kind: U8 | int, final: bool) -> None:
        """Record the EPT exits ``h`` reports for ``lanes[sel]``."""
        idx = lanes[sel]
        self.status[idx] = h.status[sel]
        self.exit_gpa[idx] = gpa[sel]
        self.exit_kind[idx] = kind[sel] if isinstance(kind, np.ndarray) else kind
        self.exit_final[idx] = final
        self.exit_rights[idx] = h.rights[sel]
        self.misconfig_level[idx] = h.level[sel]
        self.misconfig_entry[idx] = h.entry[sel]


def translate_nested_batch(
    snap: FrameSnapshot,
    eptp: Eptp,
    ctx: PagingContext,
    vas: ArrayLike,
    kind: AccessKind | Sequence[AccessKind] | ArrayLike = AccessKind.READ,
    cpl: ArrayLike = 0,
    implicit: ArrayLike = False,
    caps: EptCapabilities = EptCapabilities(),
) -> NestedBatchResult:
    """Translate every address of ``vas`` with guest paging ``ctx`` (CR3 a GPA) on
    EPT ``eptp``, setting guest A/D flags in ``snap`` as N sequential
    :func:`~refmodel.hv.hap.nested.nested_walk` calls would (call
    :meth:`FrameSnapshot.write_back` to store them). ``snap`` must hold every frame
    the walks can read (:func:`nested_structure_frames`, or all)."""
    if ctx.maxphyaddr > 48:
        raise RefmodelError(
            f"batch 2-D translate: guest MAXPHYADDR {ctx.maxphyaddr} exceeds the 48 bits 4-level EPT translates"
        )
    va = np.asarray(vas, dtype=np.uint64)
    if va.ndim != 1:
        raise RefmodelError(f"batch 2-D translate: addresses must be one-dimensional, got shape {va.shape}")
    n = int(va.size)
    k, cpls, impl = _access_arrays(kind, cpl, implicit, n)
    top = va >> np.uint64(47)
    canonical = (top == 0) | (top == np.uint64((1 << 17) - 1))
    out = _Lanes(n)
    out.status[~canonical] = STATUS_GP

    gmask = np.uint64(phys_addr_mask(ctx.maxphyaddr))
    high_rsvd = np.uint64((((1 << 52) - 1) & ~((1 << ctx.maxphyaddr) - 1)) | (0 if ctx.nxe else int(PteFlag.XD)))
    words = snap.words.reshape(-1)
    is_write = k == KIND_WRITE
    user_mode = (cpls == 3) & ~impl
    ept_rows = np.zeros(snap.frames.size + 1, dtype=np.bool_)
    a_writes: list[Idx] = []  # machine words a walk sets A (or A/D) in
    d_writes: list[Idx] = []
    refused: list[Idx] = []  # machine words where a needed A/D update was refused

    lanes = np.flatnonzero(canonical)
    table = np.full(lanes.size, ctx.pml4_base, dtype=np.uint64)
    parent: Idx | None = None  # per lane: the word of the entry that referenced its table
    final_lanes: list[Idx] = []
    final_gpa: list[U64] = []
    final_size: list[U64] = []
    for depth, level in enumerate((4, 3, 2, 1)):
        if not lanes.size:
            break
        # 1. the entry's guest-physical address through EPT: a data read (29.3.3.2).
        #    EPT sees only the page (bits 47:12), so each distinct table is walked
        #    once — the guest's CR3, or the entry that referenced the table — and the
        #    outcome given to every lane reading that table (refs counted per lane).
        slot = (va[lanes] >> np.uint64(PAGE_SHIFT + 9 * (level - 1))) & _SLOT
        entry_gpa = table | (slot << np.uint64(3))
        if parent is None:
            key = np.zeros(lanes.size, dtype=np.intp)
            table_gpas = np.array([ctx.pml4_base], dtype=np.uint64)
        else:
            referencing = np.flatnonzero(np.bincount(parent, minlength=words.size))
            key = np.searchsorted(referencing, parent)
            table_gpas = words[referencing] & gmask
        per_table = ept_walk_batch(snap, eptp, table_gpas, KIND_READ, caps, ept_rows)
        table_row = snap.rows(per_table.mpa >> np.uint64(PAGE_SHIFT))
        h = per_table.gather(key)
        out.ept_refs[lanes] += h.refs
        fail = h.status != 0
        out.ept_exit(lanes, h, fail, entry_gpa, KIND_READ, final=False)
        got = ~fail
        lanes, entry_gpa, key, slot = lanes[got], entry_gpa[got], key[got], slot[got]
        entry_rights = h.rights[got]
        ept_w = (entry_rights & np.uint8(_EPT_W)) != 0
        # 2. the guest entry, read from machine memory
        out.guest_refs[lanes] += 1
        out.entry_addrs[lanes, depth] = entry_gpa
        flat = (table_row[key] << 9) | slot.astype(np.intp)
        e = words[flat]
        # 3. the guest's checks (SDM 4.5): present, reserved bits, leaf or table
        absent = (e & _P) == 0
        rs = e & high_rsvd
        if level == 4 or (level == 3 and not ctx.page1gb):
            rs |= e & _PS
            leaf = np.zeros(lanes.size, dtype=np.bool_)
        elif level == 1:
            leaf = np.ones(lanes.size, dtype=np.bool_)
        else:
            leaf = (e & _PS) != 0
            rs |= np.where(leaf, e & (_RSVD_1G if level == 3 else _RSVD_2M), _ZERO)
        bad = ~absent & (rs != 0)
        pf = absent | bad
        out.status[lanes[pf]] = STATUS_PF
        out.cause[lanes[absent]] = _C_NOT_PRESENT
        out.cause[lanes[bad]] = _C_RESERVED
        keep = ~pf
        out.and_bits[lanes[keep]] &= e[keep]
        out.or_bits[lanes[keep]] |= e[keep]
        # 4. a table entry: set A, an EPT data write if A is clear (29.3.3.2)
        table_entry = keep & ~leaf
        need_a = table_entry & ((e & _A) == 0)
        refuse = need_a & ~ept_w
        a_writes.append(flat[need_a & ept_w])
        refused.append(flat[refuse])
        _write_refused(out, lanes, refuse, entry_gpa, entry_rights)
        cont = table_entry & ~refuse
        # 5. a leaf: the guest's rights (SDM 4.6), then A (and D for a write)
        at_leaf = keep & leaf
        li = lanes[at_leaf]
        denial = denial_codes(
            ctx, (out.and_bits[li] & np.uint64(int(PteFlag.RW))) != 0, (out.and_bits[li] & np.uint64(int(PteFlag.US))) != 0,
            (out.or_bits[li] & _XD) != 0, k[li], user_mode[li], impl[li],
        )
        denied = np.zeros(lanes.size, dtype=np.bool_)
        denied[at_leaf] = denial != 0
        out.status[li[denial != 0]] = STATUS_PF
        out.cause[li[denial != 0]] = denial[denial != 0]
        allowed = at_leaf & ~denied
        need = _A | np.where(is_write[lanes], _D, _ZERO)
        missing = allowed & ((e & need) != need)
        refuse = missing & ~ept_w
        refused.append(flat[refuse])
        _write_refused(out, lanes, refuse, entry_gpa, entry_rights)
        writer = missing & ept_w
        a_writes.append(flat[writer])
        d_writer = writer & is_write[lanes] & ((e & _D) == 0)
        d_writes.append(flat[d_writer])
        out.d_written[lanes[d_writer]] = True
        through = allowed & ~refuse
        ti = lanes[through]
        out.leaf_entry[ti] = e[through]
        out.leaf_flat[ti] = flat[through]
        out.leaf_addr[ti] = entry_gpa[through]
        page = _page_size(level)
        final_lanes.append(ti)
        final_gpa.append((e[through] & gmask & ~(page - np.uint64(1))) | (va[ti] & (page - np.uint64(1))))
        final_size.append(np.full(ti.size, page, dtype=np.uint64))
        lanes, table, parent = lanes[cont], e[cont] & gmask, flat[cont]

    # 6. the final guest-physical address through EPT, for the access itself
    fl = _cat(final_lanes, np.intp)
    fgpa, fsize = _cat(final_gpa, np.uint64), _cat(final_size, np.uint64)
    h = ept_walk_batch(snap, eptp, fgpa, k[fl], caps, ept_rows)
    out.ept_refs[fl] += h.refs
    fail = h.status != 0
    out.ept_exit(fl, h, fail, fgpa, k[fl], final=True)
    ok = fl[~fail]
    out.mpa[ok] = h.mpa[~fail]
    out.gpa[ok] = fgpa[~fail]
    out.size[ok] = np.minimum(fsize[~fail], h.size[~fail])
    out.ept_rights[ok] = h.rights[~fail]

    # 7. is the order-free computation exact? (module docstring, points 2 and 3)
    written = _cat(a_writes + d_writes, np.intp)
    no_refs = _cat(refused, np.intp)
    order_dependent = bool(np.intersect1d(written, no_refs).size) or bool(
        ept_rows[np.unique(written // WORDS_PER_FRAME)].any()
    )
    if order_dependent:
        return _sequential(snap, eptp, ctx, va, k, cpls, impl, caps)
    _or_bits(snap, _cat(a_writes, np.intp), _A)
    _or_bits(snap, _cat(d_writes, np.intp), _D)
    return _finish(out, ctx, va, k, cpls, impl, snap.maxphyaddr, caps)


def _cat(parts: Sequence[NDArray[Any]], dtype: type[np.generic]) -> NDArray[Any]:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _write_refused(out: _Lanes, lanes: Idx, sel: Bools, entry_gpa: U64, rights: U8) -> None:
    """The A/D update of a guest entry refused by EPT: a violation on the entry's
    guest-physical address, a data write during the walk (:class:`GuestPagingEntries`
    ``write_u64``), with the rights of the translation that read the entry."""
    idx = lanes[sel]
    out.status[idx] = STATUS_EPT_VIOLATION
    out.exit_gpa[idx] = entry_gpa[sel]
    out.exit_kind[idx] = KIND_WRITE
    out.exit_final[idx] = False
    out.exit_rights[idx] = rights[sel]


def _finish(
    out: _Lanes, ctx: PagingContext, va: U64, k: U8, cpls: U8, impl: Bools, maxphyaddr: int, caps: EptCapabilities
) -> NestedBatchResult:
    ok = out.status == STATUS_OK
    pf = out.status == STATUS_PF
    user_mode = (cpls == 3) & ~impl
    code = np.zeros(va.size, dtype=np.uint32)
    code |= np.where(out.cause != _C_NOT_PRESENT, int(PfErrorCode.P), 0).astype(np.uint32)
    code |= np.where(k == KIND_WRITE, int(PfErrorCode.W), 0).astype(np.uint32)
    code |= np.where(user_mode, int(PfErrorCode.U), 0).astype(np.uint32)
    code |= np.where(out.cause == _C_RESERVED, int(PfErrorCode.RSVD), 0).astype(np.uint32)
    if fetch_reports_id(ctx.cr4, ctx.efer):
        code |= np.where(k == KIND_FETCH, int(PfErrorCode.I), 0).astype(np.uint32)
    d0 = (out.leaf_entry & _D) != 0
    return NestedBatchResult(
        va=va, kind=k, cpl=cpls, implicit=impl, status=out.status,
        mpa=out.mpa, gpa=out.gpa, size=out.size,
        writable=ok & ((out.and_bits & np.uint64(int(PteFlag.RW))) != 0),
        user=ok & ((out.and_bits & np.uint64(int(PteFlag.US))) != 0),
        execute_disable=ok & ((out.or_bits & _XD) != 0),
        global_page=ok & ((out.leaf_entry & _G) != 0) & ctx.pge,
        dirty=_dirty_after(ok, out.d_written, out.leaf_flat, d0),
        ept_rights=out.ept_rights, leaf_addr=np.where(ok, out.leaf_addr, _ZERO),
        entry_addrs=out.entry_addrs, guest_refs=out.guest_refs, ept_refs=out.ept_refs,
        cr2=np.where(pf, va, _ZERO), error_code=np.where(pf, code, np.uint32(0)).astype(np.uint32),
        cause=np.where(pf, out.cause, np.uint8(0)).astype(np.uint8),
        exit_gpa=out.exit_gpa, exit_kind=out.exit_kind, exit_final=out.exit_final, exit_rights=out.exit_rights,
        misconfig_level=out.misconfig_level, misconfig_entry=out.misconfig_entry,
        maxphyaddr=maxphyaddr, caps=caps, sequential=False,
    )


def _access_arrays(
    kind: AccessKind | Sequence[AccessKind] | ArrayLike, cpl: ArrayLike, implicit: ArrayLike, n: int
) -> tuple[U8, U8, Bools]:
    codes: ArrayLike
    if isinstance(kind, AccessKind):
        codes = int(KINDS.index(kind))
    elif isinstance(kind, (list, tuple)) and all(isinstance(x, AccessKind) for x in kind):
        codes = kind_codes(kind)
    else:
        codes = np.asarray(kind)
    k = np.asarray(_per_address(codes, n, np.uint8, "kind"), dtype=np.uint8)
    cpls = np.asarray(_per_address(cpl, n, np.uint8, "cpl"), dtype=np.uint8)
    impl = np.asarray(_per_address(implicit, n, np.bool_, "implicit"), dtype=np.bool_)
    if n and (int(k.max()) > KIND_FETCH or int(cpls.max()) > 3):
        raise RefmodelError("batch 2-D translate: kind codes must be 0..2 and CPLs 0..3")
    return k, cpls, impl


# -- the order-dependent case: the slow path, address by address ------------------------------


def _sequential(
    snap: FrameSnapshot, eptp: Eptp, ctx: PagingContext, va: U64, k: U8, cpls: U8, impl: Bools,
    caps: EptCapabilities,
) -> NestedBatchResult:
    """Run :func:`nested_walk` on each address in order, on a memory made of the
    snapshot's frames; store the frames it changed back into the snapshot."""
    mem = PhysicalMemory(snap.maxphyaddr)
    for row, frame in enumerate(snap.frames.tolist()):
        mem.load_frame(int(frame), snap.words[row].astype("<u8").tobytes())
    n = int(va.size)
    out = _Lanes(n)
    dirty = np.zeros(n, dtype=np.bool_)
    writable, user, xd, glob = (np.zeros(n, dtype=np.bool_) for _ in range(4))
    code = np.zeros(n, dtype=np.uint32)
    cr2 = np.zeros(n, dtype=np.uint64)
    for i, v in enumerate(int(x) for x in va.tolist()):
        if not is_canonical(v):
            out.status[i] = STATUS_GP
            continue
        r = nested_walk(mem, eptp, ctx, v, Access(KINDS[int(k[i])], int(cpls[i]), bool(impl[i])), caps)
        _store(out, i, r)
        o = r.outcome
        if isinstance(o, CombinedTranslation):
            dirty[i], glob[i] = o.dirty, o.global_page
            writable[i], user[i], xd[i] = o.rights.writable, o.rights.user, o.rights.execute_disable
        elif isinstance(o, PageFault):
            code[i], cr2[i] = int(o.error_code), o.cr2
    for row, frame in enumerate(snap.frames.tolist()):
        now = np.frombuffer(mem.frame_bytes(int(frame)), dtype="<u8")
        if not np.array_equal(now, snap.words[row]):
            snap.words[row] = now
            snap.touched[row] = True
    return NestedBatchResult(
        va=va, kind=k, cpl=cpls, implicit=impl, status=out.status, mpa=out.mpa, gpa=out.gpa, size=out.size,
        writable=writable, user=user, execute_disable=xd, global_page=glob, dirty=dirty,
        ept_rights=out.ept_rights, leaf_addr=out.leaf_addr, entry_addrs=out.entry_addrs,
        guest_refs=out.guest_refs, ept_refs=out.ept_refs, cr2=cr2, error_code=code, cause=out.cause,
        exit_gpa=out.exit_gpa, exit_kind=out.exit_kind, exit_final=out.exit_final, exit_rights=out.exit_rights,
        misconfig_level=out.misconfig_level, misconfig_entry=out.misconfig_entry,
        maxphyaddr=snap.maxphyaddr, caps=caps, sequential=True,
    )


def _store(out: _Lanes, i: int, r: NestedWalkResult) -> None:
    """One slow-path result into the arrays."""
    out.guest_refs[i], out.ept_refs[i] = r.guest_refs, r.ept_refs
    o = r.outcome
    if isinstance(o, CombinedTranslation):
        out.mpa[i], out.gpa[i], out.size[i] = o.pa, o.gpa, o.size.value
        out.ept_rights[i], out.leaf_addr[i] = _rights_bits(o.ept), o.leaf_addr
        out.entry_addrs[i, : len(o.entry_addrs)] = o.entry_addrs
    elif isinstance(o, PageFault):
        out.status[i], out.cause[i] = STATUS_PF, _C[o.cause]
    elif isinstance(o, EptViolation):
        q = o.qualification
        out.status[i], out.exit_gpa[i], out.exit_final[i] = STATUS_EPT_VIOLATION, o.gpa, q.final
        out.exit_kind[i] = KIND_WRITE if q.write else KIND_FETCH if q.fetch else KIND_READ
        out.exit_rights[i] = _rights_bits(EptRights(q.readable, q.writable, q.executable))
    else:
        out.status[i], out.exit_gpa[i] = STATUS_EPT_MISCONFIG, o.gpa
        out.misconfig_level[i], out.misconfig_entry[i] = int(o.level), o.entry


# -- whole-memory convenience ------------------------------------------------------------------


def nested_structure_frames(
    mem: PhysicalMemory, eptp: Eptp, ctx: PagingContext, caps: EptCapabilities = EptCapabilities()
) -> list[int]:
    """Every populated frame a 2-D walk under ``eptp`` and ``ctx`` may read: the EPT
    tables (from the EPT PML4, every frame a present EPT PML4E, PDPTE or PDE
    references — a superset of the tables an EPT walk follows), and, level by level,
    the machine frame of every guest table: the guest PML4 at CR3, then every frame
    a present guest entry references, each located through EPT as the walk would
    read it (a data read; a table the read is refused for is never read)."""
    populated = set(mem.populated_frames())
    emask = phys_addr_mask(mem.maxphyaddr)
    found: set[int] = set()
    level_frames: set[int] = {int(eptp.pml4)} & populated
    for _ in range(4):  # EPT PML4 -> PDPT -> PD -> PT
        found |= level_frames
        children: set[int] = set()
        for frame in sorted(level_frames):
            e = np.frombuffer(mem.frame_bytes(frame), dtype="<u8")
            kids = (e[(e & _EPT_RWX) != 0] & np.uint64(emask)) >> np.uint64(PAGE_SHIFT)
            children.update(int(x) for x in np.unique(kids).tolist())
        level_frames = children & populated
    gmask = np.uint64(phys_addr_mask(ctx.maxphyaddr))
    tables: set[int] = {ctx.pml4_base >> PAGE_SHIFT}
    for _ in range(4):  # guest PML4 -> PDPT -> PD -> PT
        children = set()
        for gfn in sorted(tables):
            located = _located(mem, eptp, gfn, caps)
            if located is None or located not in populated:
                continue
            found.add(located)
            e = np.frombuffer(mem.frame_bytes(located), dtype="<u8")
            kids = (e[(e & _P) != 0] & gmask) >> np.uint64(PAGE_SHIFT)
            children.update(int(x) for x in np.unique(kids).tolist())
        tables = children
    return sorted(found)


def _located(mem: PhysicalMemory, eptp: Eptp, gfn: int, caps: EptCapabilities) -> int | None:
    if gfn >= 1 << 36:
        return None
    r = ept_walk(mem, eptp, gfn << PAGE_SHIFT, EptAccess(AccessKind.READ), caps)
    return r.outcome.mfn if isinstance(r.outcome, EptTranslation) else None


def translate_nested(
    mem: PhysicalMemory,
    eptp: Eptp,
    ctx: PagingContext,
    vas: ArrayLike,
    kind: AccessKind | Sequence[AccessKind] | ArrayLike = AccessKind.READ,
    cpl: ArrayLike = 0,
    implicit: ArrayLike = False,
    caps: EptCapabilities = EptCapabilities(),
    frames: Iterable[int] | None = None,
) -> NestedBatchResult:
    """Snapshot what a 2-D walk can read (``frames``, default
    :func:`nested_structure_frames`), translate the batch, write the guest A/D updates
    back: the whole effect of N sequential slow-path 2-D walks."""
    snap = FrameSnapshot.take(mem, nested_structure_frames(mem, eptp, ctx, caps) if frames is None else frames)
    result = translate_nested_batch(snap, eptp, ctx, vas, kind, cpl, implicit, caps)
    snap.write_back(mem)
    return result
