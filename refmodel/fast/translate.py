"""Batch 4-level translation: N linear addresses of one address space at once.

:func:`translate_batch` computes, for every address, exactly what the slow path
(:func:`refmodel.arch.walk.walk`, preceded by the canonical-address check of
:meth:`refmodel.arch.mmu.Mmu.translate`, no TLB) computes when called on the
addresses one after another, in array order: the physical address, page size,
combined rights, G and D flags, the #PF (CR2, error code, cause) or #GP, the
entries read — and it leaves the Accessed/Dirty flags in memory as those N walks
leave them.

Why a batch may ignore the order (the argument :mod:`tests.test_fast_translate`
checks by permuting batches):

1. A walk *reads* entries and *decides* from their P, PS, R/W, U/S, XD, address and
   reserved bits (SDM 4.5, 4.6; :func:`~refmodel.arch.walk.reserved_bits`). It
   never decides from bit 5 (A) or bit 6 (D): neither is reserved in any entry
   format, neither is an address bit, neither is a right.
2. A walk *writes* only by OR-ing A (and D, at a leaf, for a write) into an entry
   it has read (SDM 4.8; :func:`~refmodel.arch.walk.set_accessed`,
   :func:`~refmodel.arch.walk.set_leaf_flags`). This holds even when tables
   alias (an entry used as a PML4E by one walk and as a PDE by another).
3. So no walk's decisions depend on another walk's writes: every decision can be
   computed from the memory as it was before the batch. And OR is idempotent and
   commutative, so the final memory is the initial memory OR the A/D bits of every
   walk, whatever the order.
4. The one output that *does* depend on the order is the D flag a translation
   reports (``Translation.dirty``: "the leaf's D flag after this access"): a read
   through a clean page reports D = 1 if and only if some *earlier* write of the
   batch went through the same leaf entry. The batch computes that prefix
   exactly (a per-leaf "first successful write" index).

A TLB breaks the argument: whether an access walks at all depends on what earlier
accesses filled and evicted, and a hit may return a translation that memory no
longer holds (SDM 4.10.2.3, 4.10.4.3). That is why :mod:`refmodel.fast.tlb` is a
separate, explicitly sequential-equivalent structure.

Access kinds are small integer codes (:data:`KIND_READ`, :data:`KIND_WRITE`,
:data:`KIND_FETCH`), one for the batch or one per address; so are CPL and the
"implicit supervisor access" flag.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..arch.access import Access, AccessKind
from ..arch.fault import FaultCause, GeneralProtection, PageFault, PfErrorCode, fetch_reports_id
from ..arch.physmem import PhysicalMemory
from ..arch.pte import PageSize, PteFlag, phys_addr_mask
from ..arch.types import PA, PAGE_SHIFT, VA
from ..arch.walk import PagingContext, Rights, Translation
from ..errors import RefmodelError
from .snapshot import WORDS_PER_FRAME, FrameSnapshot

U64 = NDArray[np.uint64]
U8 = NDArray[np.uint8]
Bools = NDArray[np.bool_]

KIND_READ = 0
KIND_WRITE = 1
KIND_FETCH = 2
KIND_CODES: dict[AccessKind, int] = {AccessKind.READ: KIND_READ, AccessKind.WRITE: KIND_WRITE, AccessKind.FETCH: KIND_FETCH}
KINDS: tuple[AccessKind, ...] = (AccessKind.READ, AccessKind.WRITE, AccessKind.FETCH)

#: ``vector`` values: 0 for a translation, else the exception vector.
VECTOR_OK = 0
VECTOR_GP = GeneralProtection.VECTOR
VECTOR_PF = PageFault.VECTOR

#: ``cause`` codes: 0 for "no #PF", else 1 + the index in this tuple.
CAUSES: tuple[FaultCause, ...] = tuple(FaultCause)
CAUSE_NONE = 0
_C = {c: i + 1 for i, c in enumerate(CAUSES)}
C_NOT_PRESENT = _C[FaultCause.NOT_PRESENT]
C_RESERVED = _C[FaultCause.RESERVED_BIT]
C_WP = _C[FaultCause.WRITE_PROTECT]
C_US = _C[FaultCause.USER_SUPERVISOR]
C_XD = _C[FaultCause.EXECUTE_DISABLE]
C_SMEP = _C[FaultCause.SMEP]
C_SMAP = _C[FaultCause.SMAP]

_P = np.uint64(int(PteFlag.P))
_RW = np.uint64(int(PteFlag.RW))
_US = np.uint64(int(PteFlag.US))
_A = np.uint64(int(PteFlag.A))
_D = np.uint64(int(PteFlag.D))
_PS = np.uint64(int(PteFlag.PS))
_G = np.uint64(int(PteFlag.G))
_XD = np.uint64(int(PteFlag.XD))
#: Reserved bits of a 1 GiB PDPTE (29:13) and of a 2 MiB PDE (20:13), SDM Tables 4-17, 4-19.
_RSVD_1G = np.uint64(((1 << 30) - 1) & ~((1 << 13) - 1))
_RSVD_2M = np.uint64(((1 << 21) - 1) & ~((1 << 13) - 1))
_SLOT = np.uint64(WORDS_PER_FRAME - 1)


def kind_codes(kinds: Sequence[AccessKind]) -> U8:
    """Access kinds as the batch's integer codes."""
    return np.array([KIND_CODES[k] for k in kinds], dtype=np.uint8)


@dataclass(frozen=True, eq=False)
class BatchResult:
    """Per-address outcome of a batch translation (arrays of length N).

    ``vector`` is 0 (translated), 13 (#GP: non-canonical) or 14 (#PF). Fields that
    only a translation has (``pa``, ``size``, ``writable``, ``user``,
    ``execute_disable``, ``global_page``, ``dirty``, ``leaf_addr``) are 0/False
    elsewhere; ``cr2`` and ``error_code`` are 0 except for a #PF. ``refs`` counts
    the entries read, ``entry_addrs[i, :refs[i]]`` are their addresses, top level
    first (a #GP reads none).
    """

    va: U64
    kind: U8
    cpl: U8
    implicit: Bools
    vector: U8
    pa: U64
    size: U64
    error_code: NDArray[np.uint32]
    cr2: U64
    cause: U8
    refs: U8
    entry_addrs: NDArray[np.uint64]
    leaf_addr: U64
    writable: Bools
    user: Bools
    execute_disable: Bools
    global_page: Bools
    dirty: Bools

    def __len__(self) -> int:
        return int(self.va.size)

    @property
    def ok(self) -> Bools:
        return np.asarray(self.vector == VECTOR_OK, dtype=np.bool_)

    @property
    def page_fault(self) -> Bools:
        return np.asarray(self.vector == VECTOR_PF, dtype=np.bool_)

    @property
    def general_protection(self) -> Bools:
        return np.asarray(self.vector == VECTOR_GP, dtype=np.bool_)

    def final_cr2(self, initial: int = 0) -> int:
        """CR2 after delivering the batch's faults in order: the linear address of
        the last #PF (SDM 4.7), or ``initial`` if none faulted."""
        hits = np.flatnonzero(self.vector == VECTOR_PF)
        return int(self.cr2[hits[-1]]) if hits.size else initial

    def access(self, i: int) -> Access:
        return Access(KINDS[int(self.kind[i])], int(self.cpl[i]), bool(self.implicit[i]))

    def outcome(self, i: int) -> Translation | PageFault | GeneralProtection:
        """Address ``i``'s outcome as the slow path's value types."""
        va = int(self.va[i])
        vec = int(self.vector[i])
        if vec == VECTOR_GP:
            return GeneralProtection(f"non-canonical linear address {va:#x}")
        if vec == VECTOR_PF:
            return PageFault(
                cr2=int(self.cr2[i]), error_code=PfErrorCode(int(self.error_code[i])),
                cause=CAUSES[int(self.cause[i]) - 1],
            )
        refs = int(self.refs[i])
        return Translation(
            va=VA(va),
            pa=PA(int(self.pa[i])),
            size=PageSize(int(self.size[i])),
            rights=Rights(bool(self.writable[i]), bool(self.user[i]), bool(self.execute_disable[i])),
            global_page=bool(self.global_page[i]),
            dirty=bool(self.dirty[i]),
            leaf_addr=int(self.leaf_addr[i]),
            entry_addrs=tuple(int(a) for a in self.entry_addrs[i, :refs].tolist()),
        )

    def entry_addr_list(self, i: int) -> list[int]:
        return [int(a) for a in self.entry_addrs[i, : int(self.refs[i])].tolist()]


def _per_address(value: ArrayLike, n: int, dtype: type[np.generic], name: str) -> NDArray[np.generic]:
    arr = np.asarray(value)
    if arr.ndim == 0:
        return np.full(n, arr, dtype=dtype)
    if arr.shape != (n,):
        raise RefmodelError(f"batch translate: {name} has shape {arr.shape}, need () or ({n},)")
    return arr.astype(dtype, copy=False)


def translate_batch(
    snap: FrameSnapshot,
    ctx: PagingContext,
    vas: ArrayLike,
    kind: AccessKind | Sequence[AccessKind] | ArrayLike = AccessKind.READ,
    cpl: ArrayLike = 0,
    implicit: ArrayLike = False,
) -> BatchResult:
    """Translate every address of ``vas`` (uint64) under ``ctx``, setting A/D flags
    in ``snap`` as the sequential slow-path walks would (call
    :meth:`FrameSnapshot.write_back` to store them). ``kind`` is an
    :class:`AccessKind`, a sequence of them, or a code / array of codes
    (:data:`KIND_READ` ...); ``cpl``
    and ``implicit`` are scalars or arrays, as for :class:`~refmodel.arch.access.Access`."""
    if ctx.maxphyaddr > snap.maxphyaddr:
        raise RefmodelError(
            f"batch translate: context MAXPHYADDR {ctx.maxphyaddr} exceeds the memory's {snap.maxphyaddr}"
        )
    va = np.asarray(vas, dtype=np.uint64)
    if va.ndim != 1:
        raise RefmodelError(f"batch translate: addresses must be one-dimensional, got shape {va.shape}")
    n = int(va.size)
    codes: ArrayLike
    if isinstance(kind, AccessKind):
        codes = KIND_CODES[kind]
    elif isinstance(kind, (list, tuple)) and all(isinstance(x, AccessKind) for x in kind):
        codes = kind_codes(kind)
    else:
        codes = cast(ArrayLike, kind)
    k: U8 = np.asarray(_per_address(codes, n, np.uint8, "kind"), dtype=np.uint8)
    cpls: U8 = np.asarray(_per_address(cpl, n, np.uint8, "cpl"), dtype=np.uint8)
    impl: Bools = np.asarray(_per_address(implicit, n, np.bool_, "implicit"), dtype=np.bool_)
    if n and (int(k.max()) > KIND_FETCH or int(cpls.max()) > 3):
        raise RefmodelError("batch translate: kind codes must be 0..2 and CPLs 0..3")

    is_write = k == KIND_WRITE
    is_fetch = k == KIND_FETCH
    user_mode = (cpls == 3) & ~impl
    top = va >> np.uint64(47)
    canonical = (top == 0) | (top == np.uint64((1 << 17) - 1))

    m = ctx.maxphyaddr
    addr_mask = np.uint64(phys_addr_mask(m))
    high_rsvd = np.uint64((((1 << 52) - 1) & ~((1 << m) - 1)) | (0 if ctx.nxe else int(PteFlag.XD)))
    words = snap.words.reshape(-1)
    nrows = snap.frames.size + 1

    row = np.full(n, snap.row(ctx.pml4_base >> PAGE_SHIFT), dtype=np.intp)
    table = np.full(n, ctx.pml4_base, dtype=np.uint64)
    alive = canonical.copy()
    refs = np.zeros(n, dtype=np.uint8)
    cause = np.zeros(n, dtype=np.uint8)
    entry_addrs = np.zeros((n, 4), dtype=np.uint64)
    leaf_level = np.zeros(n, dtype=np.uint8)
    leaf_flat = np.zeros(n, dtype=np.intp)
    # Rights combine over the entries a walk uses (SDM 4.6.1): AND of the entries
    # for R/W and U/S, OR for XD; a lane stops combining when it leaves the walk.
    and_bits = np.full(n, _RW | _US, dtype=np.uint64)
    or_bits = np.zeros(n, dtype=np.uint64)
    accessed: list[NDArray[np.intp]] = []  # flat indices of non-leaf entries used
    zero = np.uint64(0)

    for depth, level in enumerate((4, 3, 2, 1)):
        slot = (va >> np.uint64(PAGE_SHIFT + 9 * (level - 1))) & _SLOT
        flat = (row << 9) | slot.astype(np.intp)
        e = words[flat]
        entry_addrs[:, depth] = table | (slot << np.uint64(3))
        refs += alive
        present = (e & _P) != 0
        np.copyto(cause, C_NOT_PRESENT, where=alive & ~present)
        alive &= present
        rs = e & high_rsvd
        if level == 4 or (level == 3 and not ctx.page1gb):
            rs |= e & _PS
            leaf = None
        else:
            ps = (e & _PS) != 0
            if level != 1:
                rs |= np.where(ps, e & (_RSVD_1G if level == 3 else _RSVD_2M), zero)
        bad = alive & (rs != 0)
        np.copyto(cause, C_RESERVED, where=bad)
        alive &= ~bad
        and_bits &= np.where(alive, e, _RW | _US)
        or_bits |= np.where(alive, e, zero)
        if level == 1:
            leaf = alive
        elif not (level == 4 or (level == 3 and not ctx.page1gb)):
            leaf = alive & ps
        if leaf is not None:
            np.copyto(leaf_level, np.uint8(level), where=leaf)
            np.copyto(leaf_flat, flat, where=leaf)
            alive &= ~leaf
        if level == 1:
            break
        accessed.append(flat[alive])
        table = e & addr_mask
        in_use = np.flatnonzero(np.bincount(row, minlength=nrows))
        row = snap.child_rows(in_use, int(addr_mask))[flat]

    # -- access rights at the leaf (SDM 4.6.1) ----------------------------------------
    walked = leaf_level != 0
    writable = (and_bits & _RW) != 0
    user_addr = (and_bits & _US) != 0
    any_xd = (or_bits & _XD) != 0
    denied = denial_codes(ctx, writable, user_addr, any_xd, k, user_mode, impl)
    np.copyto(cause, denied, where=walked)
    ok = walked & (cause == CAUSE_NONE)
    # the leaf entries as read, before this batch's A/D updates (for D and G)
    leaf_entry = np.where(ok, words[leaf_flat], zero)
    leaf_addr = np.where(ok, entry_addrs[np.arange(n), refs.astype(np.intp) - 1], zero)

    # -- A/D updates (SDM 4.8): idempotent ORs, order-free -------------------------------
    ok_write = ok & is_write
    accessed.append(leaf_flat[ok])
    _or_bits(snap, np.concatenate(accessed), _A)
    _or_bits(snap, leaf_flat[ok_write], _D)

    # -- outputs ---------------------------------------------------------------------------
    shift = np.where(ok, PAGE_SHIFT + 9 * (leaf_level.astype(np.uint64) - np.uint64(1)), np.uint64(0))
    size = np.where(ok, np.uint64(1) << shift, np.uint64(0))
    off_mask = size - np.uint64(1)
    pa = np.where(ok, (leaf_entry & addr_mask & ~off_mask) | (va & off_mask), np.uint64(0))
    pf = canonical & ~ok
    vector = np.where(ok, VECTOR_OK, np.where(pf, VECTOR_PF, VECTOR_GP)).astype(np.uint8)
    code = np.zeros(n, dtype=np.uint32)
    code |= np.where(cause != C_NOT_PRESENT, int(PfErrorCode.P), 0).astype(np.uint32)
    code |= np.where(is_write, int(PfErrorCode.W), 0).astype(np.uint32)
    code |= np.where(user_mode, int(PfErrorCode.U), 0).astype(np.uint32)
    code |= np.where(cause == C_RESERVED, int(PfErrorCode.RSVD), 0).astype(np.uint32)
    if fetch_reports_id(ctx.cr4, ctx.efer):
        code |= np.where(is_fetch, int(PfErrorCode.I), 0).astype(np.uint32)
    code = np.where(pf, code, np.uint32(0)).astype(np.uint32)

    return BatchResult(
        va=va, kind=k, cpl=cpls, implicit=impl,
        vector=vector,
        pa=pa.astype(np.uint64),
        size=size.astype(np.uint64),
        error_code=code,
        cr2=np.where(pf, va, np.uint64(0)).astype(np.uint64),
        cause=cause,
        refs=refs,
        entry_addrs=entry_addrs,
        leaf_addr=leaf_addr.astype(np.uint64),
        writable=ok & writable,
        user=ok & user_addr,
        execute_disable=ok & any_xd,
        global_page=ok & ((leaf_entry & _G) != 0) & ctx.pge,
        dirty=_dirty_after(ok, ok_write, leaf_flat, (leaf_entry & _D) != 0),
    )


def denial_codes(
    ctx: PagingContext, writable: Bools, user_addr: Bools, execute_disable: Bools, kind: U8, user_mode: Bools,
    implicit: Bools,
) -> U8:
    """:func:`refmodel.arch.walk.access_denial`, vectorized: the cause code of the
    refusal (0: allowed) of each access given combined rights (SDM 4.6.1).

    Supervisor: fetch -> SMEP (user-mode address, CR4.SMEP), then XD (NXE);
    read/write -> SMAP (user-mode address, CR4.SMAP, implicit or RFLAGS.AC = 0),
    then WP (write, CR0.WP, R/W = 0 somewhere). User: U/S, then WP (whatever
    CR0.WP says), then XD."""
    is_write = kind == KIND_WRITE
    is_fetch = kind == KIND_FETCH
    xd_on = execute_disable & ctx.nxe
    sup = ~user_mode
    smep = sup & is_fetch & user_addr & ctx.smep
    sup_xd = sup & is_fetch & ~smep & xd_on
    smap = sup & ~is_fetch & user_addr & ctx.smap & (implicit | (not ctx.ac))
    sup_wp = sup & is_write & ~smap & ctx.wp & ~writable
    usr_us = user_mode & ~user_addr
    usr_wp = user_mode & user_addr & is_write & ~writable
    usr_xd = user_mode & user_addr & is_fetch & xd_on
    codes = np.zeros(kind.shape, dtype=np.uint8)
    for mask, code in (
        (smep, C_SMEP), (sup_xd, C_XD), (smap, C_SMAP), (sup_wp, C_WP), (usr_us, C_US), (usr_wp, C_WP), (usr_xd, C_XD),
    ):
        np.copyto(codes, code, where=mask)  # the masks are disjoint
    return codes


def _or_bits(snap: FrameSnapshot, flat: NDArray[np.intp], bit: np.uint64) -> None:
    """OR ``bit`` into the entries at flat word indices ``flat`` (duplicates allowed),
    marking the rows that change."""
    words = snap.words.reshape(-1)
    if not flat.size:
        return
    need = flat[(words[flat] & bit) == 0]
    if not need.size:
        return
    words[need] |= bit  # duplicates all store the same value
    snap.touched[need // WORDS_PER_FRAME] = True


def _dirty_after(ok: Bools, ok_write: Bools, leaf_flat: NDArray[np.intp], d0: Bools) -> Bools:
    """The leaf's D flag after each access, in batch order: set before the batch,
    set by this access (a write), or set by an *earlier* successful write through
    the same leaf entry."""
    dirty = ok & (d0 | ok_write)
    writers = np.flatnonzero(ok_write)
    if not writers.size:
        return dirty
    cand = np.flatnonzero(ok & ~dirty)
    if not cand.size:
        return dirty
    # first (lowest-index) successful write through each leaf entry
    leaves, first = np.unique(leaf_flat[writers], return_index=True)
    first_writer = writers[first]
    pos = np.searchsorted(leaves, leaf_flat[cand])
    pos_c = np.minimum(pos, leaves.size - 1)
    hit = (leaves[pos_c] == leaf_flat[cand]) & (first_writer[pos_c] < cand)
    dirty[cand[hit]] = True
    return dirty


def translate(
    mem: PhysicalMemory,
    ctx: PagingContext,
    vas: ArrayLike,
    kind: AccessKind | Sequence[AccessKind] | ArrayLike = AccessKind.READ,
    cpl: ArrayLike = 0,
    implicit: ArrayLike = False,
) -> BatchResult:
    """Snapshot the paging structures of ``mem``, translate the batch, and write the
    A/D updates back: the whole effect of N sequential slow-path walks."""
    snap = FrameSnapshot.for_walks(mem, ctx)
    result = translate_batch(snap, ctx, vas, kind, cpl, implicit)
    snap.write_back(mem)
    return result
