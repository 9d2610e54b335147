"""The specs and the Python model cannot drift apart: Hypothesis draws concrete
states and inputs, each Z3 transition is evaluated on the abstraction of the state
(concrete values substituted, simplified), and its decision and post-state are
compared with what the model did for the same step."""

from collections.abc import Callable
from dataclasses import replace

import z3
from hypothesis import event, given, settings
from hypothesis import strategies as st

from refmodel.arch.access import Access, AccessKind
from refmodel.arch.control import Cr4
from refmodel.arch.pte import PageSize
from refmodel.arch.tlb import TlbEntry
from refmodel.arch.types import GFN, MFN, PAGE_SHIFT
from refmodel.arch.walk import Rights, Translation
from refmodel.errors import RefmodelError
from refmodel.guest.kernel import GuestKernel
from refmodel.guest.ops import MmuBackend, Mode
from refmodel.hv import invariants as twins
from refmodel.hv.hap.ept import EptFlag
from refmodel.hv.machine import Machine
from refmodel.hv.modes import ModeSpec, build_backend
from refmodel.hv.pv.pagetype import PageType as PvType
from refmodel.hv.pv.pagetype import frame_table_of
from refmodel.hv.shadow.guest import hardware_state
from specs import concrete as C
from specs import pv, shadow, tlb, vcpu
from specs import words as w
from specs.invariants import all_core, config
from specs.negative import PV_TREE, pv_setup, shadow_guest_tree
from specs.p2m import ept_update
from specs.replay import Replay, op, replay
from specs.state import State
from specs.words import Expr

#: Few examples in CI (each builds a machine and simplifies Z3 terms over it); many
#: with HYPOTHESIS_PROFILE=long.
LONG = (settings.default.max_examples if settings.default is not None else 100) > 1000
TIE = settings(max_examples=300 if LONG else 12, deadline=None)


def bv(v: int, bits: int) -> Expr:
    return z3.BitVecVal(v, bits)


def slots_alive(s: State, n: int) -> list[bool]:
    return [C.truth(s.tlb_valid[bv(i, w.SLOT_BITS)]) for i in range(n)]


def survivors(entries: list[TlbEntry], alive: list[bool]) -> set[TlbEntry]:
    return {e for e, a in zip(entries, alive) if a}


def keep_array(entries: list[TlbEntry], after: set[TlbEntry]) -> Expr:
    return C.store_chain(w.SlotS, z3.BoolVal(False), ((i, z3.BoolVal(e in after)) for i, e in enumerate(entries)))


# -- reachable states satisfy the cores ------------------------------------------------------------------

workload = st.lists(
    st.tuples(st.sampled_from(["map", "unmap", "protect", "touch", "fork"]), st.integers(0, 5), st.booleans()),
    min_size=1, max_size=6,
)


@TIE
@given(workload)
def test_reachable_states_satisfy_every_core_clause(ops: list[tuple[str, int, bool]]) -> None:
    """A PV, a shadow and a HAP guest run a drawn workload; the abstraction of the
    machine they reach satisfies the configuration and every invariant's core (so
    the Z3 invariants describe states the model really reaches), and so do the
    concrete twins."""
    m = Machine(nr_frames=384, hypervisor_frames=64)
    backends: list[MmuBackend] = []
    for domid, mode in ((1, Mode.PV), (2, Mode.SHADOW), (3, Mode.HAP)):
        b = build_backend(ModeSpec(mode), m, domid=domid, nr_frames=48)
        k = GuestKernel(b, 48)
        pid = k.create_process()
        k.switch_to(pid)
        base = 0x400000
        for kind, page, flag in ops:
            va = base + page * 4096
            if kind == "map" and k.process(pid).vma_for(va) is None:
                k.map_range(pid, va, 1, writable=flag, populate=True)
            elif kind == "unmap" and k.process(pid).vma_for(va) is not None:
                k.unmap_range(pid, va, 1)
            elif kind == "protect" and k.process(pid).vma_for(va) is not None:
                k.protect(pid, va, 1, flag)
            elif kind == "touch" and k.process(pid).vma_for(va) is not None:
                k.touch(va, AccessKind.WRITE if flag else AccessKind.READ, page)
            elif kind == "fork":
                child = k.fork(pid)
                k.switch_to(child)
                pid = child
        backends.append(b)
    assert twins.all_violations(m, backends, backends[2]) == []
    s = C.abstract(C.World(m, backends, running=2))
    for name, clause in config(s) + all_core(s):
        assert C.truth(clause), name


# -- TLB invalidations ---------------------------------------------------------------------------------

entry_fields = st.tuples(st.sampled_from([0, 2, 3]), st.integers(0, 2), st.integers(0, 3), st.booleans())


def hap_world(tagged: bool = True) -> tuple[Machine, list[MmuBackend]]:
    r = replay([
        op("machine", frames=96, xen_frames=32),
        op("domain", domid=1, mode="hap", pages=10, tagged=tagged),
        op("domain", domid=2, mode="hap", pages=10, tagged=tagged),
        *shadow_guest_tree(1), *shadow_guest_tree(2),
    ])
    assert r.machine is not None
    return r.machine, list(r.world().backends)


@TIE
@given(
    st.lists(entry_fields, min_size=1, max_size=10, unique_by=lambda f: (f[0], f[1], f[2])),
    st.sampled_from(["invlpg", "invpcid", "mov_cr3", "invvpid"]),
    st.integers(0, 3), st.integers(0, 2), st.integers(0, 3), st.booleans(),
)
def test_tlb_invalidations_keep_exactly_the_model_survivors(
    fields: list[tuple[int, int, int, bool]], kind: str, vpn: int, pcid: int, sub: int, flag: bool
) -> None:
    """INVLPG, INVPCID (every type), MOV CR3 (with and without the no-flush bit)
    and INVVPID: the entries the Z3 transition keeps are the entries the model's TLB
    keeps."""
    m, backends = hap_world()
    b = backends[0]
    mmu = getattr(b, "mmu")
    mmu.state = replace(mmu.state, cr4=int(Cr4.PAE | Cr4.PCIDE | Cr4.PGE), cr3=(0 << PAGE_SHIFT) | 1)
    frame = int(m.domain(1).mfn_of(4) or 0) << PAGE_SHIFT
    for vpid, p, page, glob in fields:
        m.tlb.fill(TlbEntry(vpid, p, page, PageSize.SIZE_4K, frame, Rights(), glob, True))
    entries = m.tlb.entries()
    pre = C.abstract(C.World(m, backends, running=0), tlb=entries)
    if kind == "invlpg":
        mmu.invlpg(vpn << PAGE_SHIFT)
        step = tlb.invlpg(pre, {"vpn": bv(vpn, w.VPN_BITS)})
    elif kind == "invpcid":
        if mmu.invpcid(sub, pcid, vpn << PAGE_SHIFT) is not None:
            return  # #GP: no invalidation
        step = tlb.invpcid(pre, {"kind": bv(sub, 2), "pcid": bv(pcid, w.PCID_BITS), "vpn": bv(vpn, w.VPN_BITS)})
    elif kind == "mov_cr3":
        assert mmu.mov_cr3((2 << PAGE_SHIFT) | pcid | ((1 << 63) if flag else 0)) is None
        step = tlb.mov_cr3(pre, {"gfn": bv(2, w.FRAME_BITS), "pcid": bv(pcid, w.PCID_BITS), "noflush": z3.BoolVal(flag)})
        post = C.abstract(C.World(m, backends, running=0), tlb=[e for e in entries if e in m.tlb.entries()])
        assert C.value(step.post.regs[bv(tlb.REG_CR3, w.REG_BITS)]) == C.value(post.regs[bv(tlb.REG_CR3, w.REG_BITS)])
        assert C.value(step.post.vcpu_pcid[bv(0, w.VCPU_BITS)]) == pcid
    else:
        vpid = [0, 2, 3][sub % 3]
        m.tlb.flush_everything() if flag else m.tlb.invalidate_vpid(vpid)
        step = tlb.invvpid(pre, {"all": z3.BoolVal(flag), "vpid": bv(vpid, w.VPID_BITS)})
    assert C.truth(step.ok)
    assert survivors(entries, slots_alive(step.post, len(entries))) == set(m.tlb.entries())


# -- TLB fills --------------------------------------------------------------------------------------------


@TIE
@given(st.sampled_from(["pv", "hap", "shadow"]), st.integers(0, 7), st.booleans(), st.booleans())
def test_tlb_fill_caches_what_the_model_caches(mode: str, page: int, write: bool, user: bool) -> None:
    """A TLB miss: the Z3 fill succeeds exactly when the model's walk does, and
    caches the same frame, rights, tag and PCID; the walk changes memory only in
    A/D flags of present entries (the ad_update transition)."""
    if mode == "pv":
        r = replay(pv_setup())
        b = r.backends[1]
        fill = tlb.tlb_fill_pv
    else:
        r = replay([op("machine", frames=96, xen_frames=32), op("domain", domid=1, mode=mode, pages=10, tagged=True),
                    *shadow_guest_tree(1), op("touch", domid=1, va=0, write=False, value=0)])
        b = r.backends[1]
        fill = tlb.tlb_fill_hap if mode == "hap" else tlb.tlb_fill_shadow
    assert r.machine is not None
    m = r.machine
    mmu = getattr(b, "mmu")
    if mode == "shadow":
        mmu.state = hardware_state(getattr(b, "guest_state"), getattr(b, "root").smfn)
    va = page << PAGE_SHIFT
    m.tlb.invalidate_page(va, mmu.vpid, mmu.state.pcid)
    entries = m.tlb.entries()
    pre = C.abstract(r.world(), tlb=entries)
    before = C.nonzero_words(m)
    keep_all = z3.K(w.SlotS, z3.BoolVal(True))
    args = {"vpn": bv(page, w.VPN_BITS), "slot": bv(len(entries), w.SLOT_BITS), "write": z3.BoolVal(write),
            "user": z3.BoolVal(user), "keep": keep_all}
    step = fill(pre, args)
    access = Access(AccessKind.WRITE if write else AccessKind.READ, 3 if user else 0)
    try:
        out = mmu.translate(va, access)
    except Exception:  # an EPT exit: no fill
        out = None
    filled = isinstance(out, Translation)
    assert C.truth(step.ok) == filled
    if filled:
        new = [e for e in m.tlb.entries() if e not in entries]
        assert len(new) == 1
        slot = bv(len(entries), w.SLOT_BITS)
        e = new[0]
        assert C.value(step.post.tlb_frame[slot]) == e.frame >> PAGE_SHIFT
        assert C.truth(step.post.tlb_w[slot]) == twins.tlb_writable(e)
        assert C.truth(step.post.tlb_u[slot]) == e.rights.user
        assert C.value(step.post.tlb_vpid[slot]) == e.vpid and C.value(step.post.tlb_pcid[slot]) == e.pcid
    after = C.nonzero_words(m)
    for k in set(before) | set(after):
        old, new_word = before.get(k, 0), after.get(k, 0)
        if old != new_word:
            if mode == "shadow" and not filled:
                continue  # the hypervisor's own fault handling (a shadow fill), not the walk
            assert old & 1 and (old ^ new_word) & ~((1 << w.A) | (1 << w.D)) == 0


# -- the context switch ------------------------------------------------------------------------------------


@TIE
@given(st.booleans(), st.lists(st.integers(0, (1 << 64) - 1), min_size=2, max_size=2), st.integers(0, 15))
def test_context_switch_matches_the_scheduler(tagged: bool, values: list[int], reg: int) -> None:
    """Save, restore and the TLB: the Z3 switch's registers, save areas and
    surviving entries are the scheduler's."""
    r = replay([
        op("machine", frames=96, xen_frames=32),
        op("domain", domid=1, mode="hap", pages=10, tagged=tagged),
        op("domain", domid=2, mode="hap", pages=10, tagged=tagged),
        op("scheduler", tagged=tagged),
        op("switch", domid=2), *shadow_guest_tree(2), op("set_gpr", index=reg, value=values[1]),
        op("switch", domid=1), *shadow_guest_tree(1), op("set_gpr", index=reg, value=values[0]),
        op("touch", domid=1, va=0, write=True, value=7),
    ])
    assert r.machine is not None and r.sched is not None
    entries = r.machine.tlb.entries()
    pre = C.abstract(r.world(), tlb=entries)
    step = vcpu.context_switch(pre, {"vcpu": bv(1, w.VCPU_BITS)})
    assert C.truth(step.ok)
    r.apply(op("switch", domid=2))
    post = C.abstract(r.world(), tlb=[e for e in entries if e in r.machine.tlb.entries()])
    for i in range(24):
        ri = bv(i, w.REG_BITS)
        assert C.value(step.post.regs[ri]) == C.value(post.regs[ri])
        assert C.value(step.post.saved[bv(0, w.VCPU_BITS)][ri]) == C.value(post.saved[bv(0, w.VCPU_BITS)][ri])
    assert C.value(step.post.cur) == 1
    assert survivors(entries, slots_alive(step.post, len(entries))) == set(r.machine.tlb.entries())


# -- PV hypercalls -----------------------------------------------------------------------------------------

FLAG_BITS = [1 << w.P, 1 << w.RW, 1 << w.US, 1 << w.A, 1 << w.D, 1 << w.PS, 1 << w.G, 1 << w.PCD, 1 << 63]
targets = st.sampled_from([("frame", 1, g) for g in range(10)] + [("frame", 2, 0), ("frame", 2, 1), ("xen", 5), ("free", 0)])
TREE = [("frame", 1, g) for g in PV_TREE.values()]
requests = st.tuples(
    st.one_of(st.sampled_from(TREE), st.sampled_from([("frame", 1, g) for g in range(10)] + [("frame", 2, 0)])),
    st.sampled_from([0, 1, 4, 256, 300]),
    targets,
    st.one_of(
        st.lists(st.sampled_from(FLAG_BITS), max_size=5).map(lambda bits: sum(set(bits))),
        st.lists(st.sampled_from(FLAG_BITS[1:5]), max_size=3).map(lambda bits: 1 | sum(set(bits))),
    ),
)


def pv_state(r: Replay, entries: list[TlbEntry]) -> State:
    assert r.machine is not None
    owned = [int(f) for f, d in r.machine.owner.items() if d in (1, 2)]
    return C.abstract(r.world(), frames=owned, tlb=entries)


def type_diff(r: Replay, before: dict[int, tuple[PvType, bool]]) -> tuple[Expr, Expr, Expr]:
    """N, W and D as the model chose them: newly validated tables (by level), frames
    newly typed writable, de-validated tables."""
    assert r.machine is not None
    ft = frame_table_of(r.machine)
    n, wr, dv = {}, set(), set()
    for f, p in ft.pages.items():
        was_type, was_valid = before.get(int(f), (PvType.NONE, False))
        now_valid = p.validated and p.count > 0 and p.type.is_page_table
        if now_valid and not was_valid:
            n[int(f)] = int(p.type.level or 0)
        if p.type is PvType.WRITABLE and was_type is not PvType.WRITABLE:
            wr.add(int(f))
        if was_valid and not now_valid:
            dv.add(int(f))
    return (
        C.store_chain(w.FrameS, bv(0, w.PTYPE_BITS), ((f, bv(lvl, w.PTYPE_BITS)) for f, lvl in n.items())),
        C.store_chain(w.FrameS, z3.BoolVal(False), ((f, z3.BoolVal(True)) for f in wr)),
        C.store_chain(w.FrameS, z3.BoolVal(False), ((f, z3.BoolVal(True)) for f in dv)),
    )


def types_before(r: Replay) -> dict[int, tuple[PvType, bool]]:
    assert r.machine is not None
    return {int(f): (p.type, p.validated and p.count > 0 and p.type.is_page_table)
            for f, p in frame_table_of(r.machine).pages.items()}


def same_state(z: State, post: State, frames: list[int], keys: set[int], nslots: int) -> None:
    for k in keys:
        kk = bv(k, w.KEY_BITS)
        assert C.value(z.mem[kk]) == C.value(post.mem[kk]), hex(k)
    for f in frames:
        ff = bv(f, w.FRAME_BITS)
        assert C.value(z.ptype[ff]) == C.value(post.ptype[ff]), hex(f)
        assert C.truth(z.validated[ff]) == C.truth(post.validated[ff]), hex(f)
        assert C.truth(z.pinned[ff]) == C.truth(post.pinned[ff]), hex(f)
    assert slots_alive(z, nslots) == slots_alive(post, nslots)


#: Z3 work (``rlimit`` units, about 4 s of one core) allowed for :func:`exists_choice`:
#: a count that load does not shrink, unlike the 20 s timeout it replaces; the
#: queries drawn here need about 10,000 units each.
CHOICE_RLIMIT = 20_000_000


def exists_choice(step_of: Callable[[Expr, Expr, Expr], Expr]) -> bool:
    """Is there a choice (N, W, TLB) for which the composite step succeeds? An
    "unknown" is a failure of the test, never read as "no"."""
    n = z3.Array("n", w.FrameS, w.PtypeS)
    wr = z3.Array("wr", w.FrameS, z3.BoolSort())
    keep = z3.Array("keep", w.SlotS, z3.BoolSort())
    solver = z3.Solver()
    solver.set("rlimit", CHOICE_RLIMIT)
    solver.set("random_seed", 0)
    solver.add(step_of(n, wr, keep))
    answer = solver.check()
    assert answer != z3.unknown, f"Z3 could not decide the composite step: {solver.reason_unknown()}"
    return bool(answer == z3.sat)


@settings(max_examples=1000 if LONG else 25, deadline=None)
@given(st.lists(requests, min_size=1, max_size=3))
def test_pv_mmu_update_decides_and_updates_as_the_model(reqs: list[tuple[tuple[str, int, int], int, tuple[str, int] | tuple[str, int, int], int]]) -> None:
    """One MMU_NORMAL_PT_UPDATE at a time on a PV domain with a pinned, loaded tree:
    the Z3 decision (for some choice of the tables to validate) is the model's
    (0 or an error), and with the model's choices the Z3 post-state — memory, page
    types, validation, pins, the TLB — is the model's."""
    r = replay(pv_setup())
    assert r.machine is not None
    for table, index, target, flags in reqs:
        entries = r.machine.tlb.entries()
        pre = pv_state(r, entries)
        owned = [int(f) for f, d in r.machine.owner.items() if d in (1, 2)]
        tmfn, value = r.mfn(table), (r.mfn(target) << PAGE_SHIFT) | flags if flags else 0
        ft = frame_table_of(r.machine)
        info = ft.info(tmfn)
        validated = info.validated and info.count > 0 and info.type.is_page_table
        level = int(info.type.level or 0) if validated else 0
        before = types_before(r)
        old_words = C.nonzero_words(r.machine)
        args: dict[str, Expr] = {"table": bv(tmfn, w.FRAME_BITS), "index": bv(index, w.INDEX_BITS), "value": w.word(value)}
        rc = r.apply(op("pv_mmu_update", domid=1, table=table, index=index, target=target, flags=flags))
        post = pv_state(r, [e for e in entries if e in r.machine.tlb.entries()])
        keys = set(old_words) | set(C.nonzero_words(r.machine))
        n, wr, dv = type_diff(r, before)
        keep = keep_array(entries, set(r.machine.tlb.entries()))
        event(f"{'plain' if not validated else f'L{level}'} {'ok' if rc == 0 else 'refused'}")
        if not validated or level == 1:
            fn = pv.pv_mmu_update_plain if not validated else pv.pv_mmu_update_l1
            step = fn(pre, {**args, "wr": wr, "keep": keep})
            assert C.truth(step.ok) == (rc == 0), (table, index, target, hex(flags), rc)
            if rc == 0:
                assert C.truth(step.choice)
                same_state(step.post, post, owned, keys, len(entries))
            continue
        # an L2..L4 entry: take the new reference (validating), store, drop the old
        tgt = bv(r.mfn(target), w.FRAME_BITS)
        direct = pv.pv_mmu_update_upper(pre, {**args, "keep": z3.K(w.SlotS, z3.BoolVal(True))})

        def composite(nn: Expr, ww: Expr, kk: Expr) -> Expr:
            got = pv.pv_get_type(pre, {"frame": tgt, "level": bv(level - 1, w.PTYPE_BITS), "n": nn, "wr": ww, "keep": kk})
            up = pv.pv_mmu_update_upper(got.post, {**args, "keep": z3.K(w.SlotS, z3.BoolVal(True))})
            return z3.And(got.ok, got.choice, up.ok)

        z3_ok = C.truth(direct.ok) or exists_choice(composite)
        if rc != 0 and z3_ok:
            # the spec allows linear page tables at any depth; Xen (and the model)
            # only one level deep — the one place the spec is a strict superset
            assert value & 1 and not value & 2 and r.mfn(target) != tmfn
            event("linear entry Xen refuses (one level deep only)")
            continue
        assert z3_ok == (rc == 0), (table, index, target, hex(flags), rc)
        if rc != 0:
            continue
        got = pv.pv_get_type(pre, {"frame": tgt, "level": bv(level - 1, w.PTYPE_BITS), "n": n, "wr": wr, "keep": keep})
        fresh = C.truth(z3.Not(z3.And(pre.validated[tgt], pre.ptype[tgt] == level - 1)))
        mid = got.post if (C.truth(n[tgt] != 0) and fresh) else pre
        if mid is got.post:
            assert C.truth(got.ok) and C.truth(got.choice)
        up = pv.pv_mmu_update_upper(mid, {**args, "keep": keep})
        assert C.truth(up.ok)
        put = pv.pv_put_type(up.post, {"dv": dv})
        assert C.truth(put.choice)
        same_state(put.post, post, owned, keys, len(entries))


# -- the EPT update -------------------------------------------------------------------------------------------


@TIE
@given(st.integers(0, 9), st.sampled_from(["own", "other", "xen", "remove", "rights"]), st.integers(0, 9), st.sampled_from([1, 3, 5, 7]))
def test_ept_update_matches_the_hap_backend(gfn: int, kind: str, tgfn: int, perms: int) -> None:
    """A hypervisor EPT update: refused exactly when the frame is not the domain's;
    the P2M entry afterwards is the EPT's; no TLB entry of the old frame survives."""
    m, backends = hap_world()
    b = backends[0]
    for page in range(4):
        getattr(b, "access")(page << PAGE_SHIFT, AccessKind.WRITE, 3, page)
    entries = m.tlb.entries()
    pre = C.abstract(C.World(m, backends, running=0), tlb=entries)
    dom = m.domain(1)
    target = {"own": int(dom.mfn_of(tgfn) or 0), "other": int(m.domain(2).mfn_of(tgfn) or 0), "xen": 5}.get(kind, 0)
    old_mfn = dom.mfn_of(gfn)
    if kind == "remove":
        entry = 0
        getattr(b, "ept_remove")(GFN(gfn))
        refused = False
    elif kind == "rights":
        entry = (int(old_mfn or 0) << PAGE_SHIFT) | perms
        getattr(b, "ept_set_rights")(GFN(gfn), EptFlag(perms))
        refused = False
    else:
        entry = (target << PAGE_SHIFT) | 7
        try:
            getattr(b, "ept_remap")(GFN(gfn), MFN(target))
            refused = False
        except RefmodelError:
            refused = True
    args = {"dom": w.dom_val(1), "gfn": bv(gfn, w.FRAME_BITS), "entry": w.word(entry),
            "keep": keep_array(entries, set(m.tlb.entries()))}
    step = ept_update(pre, args)
    assert C.truth(step.ok) == (not refused)
    if refused:
        return
    post = C.abstract(C.World(m, backends, running=0), tlb=[e for e in entries if e in m.tlb.entries()])
    key = bv((1 << w.FRAME_BITS) | gfn, w.DOM_BITS + w.FRAME_BITS)
    assert C.value(step.post.p2m[key]) == C.value(post.p2m[key])
    assert C.truth(step.choice)
    assert slots_alive(step.post, len(entries)) == slots_alive(post, len(entries))


# -- shadow trap-and-emulate --------------------------------------------------------------------------------


@TIE
@given(st.sampled_from([("l1", i) for i in (4, 5, 6)] + [("l2", 1)]), st.integers(0, 9),
       st.lists(st.sampled_from(FLAG_BITS[:5] + [1 << 63, 1 << w.G]), max_size=5).map(lambda b: sum(set(b))))
def test_shadow_emulated_write_matches_the_shadow_code(where: tuple[str, int], tgfn: int, flags: int) -> None:
    """A guest store into its shadowed L1 (or, linking an already shadowed L1, its
    L2): the guest entry and every shadow entry afterwards are the model's."""
    r = replay([op("machine", frames=96, xen_frames=32), op("domain", domid=1, mode="shadow", pages=12, tagged=True),
                *shadow_guest_tree(1), op("touch", domid=1, va=0, write=True, value=3)])
    assert r.machine is not None
    level, index = where
    gfn = PV_TREE[level]
    if level == "l2":
        tgfn = PV_TREE["l1"]
    value = (tgfn << PAGE_SHIFT) | flags if flags else 0
    entries = r.machine.tlb.entries()
    pre = C.abstract(r.world(), tlb=entries)
    old = C.nonzero_words(r.machine)
    r.apply(op("write_pte", domid=1, gfn=gfn, index=index, level=int(level[1]), target_gfn=tgfn, flags=flags))
    args = {"gfn": bv(gfn, w.FRAME_BITS), "index": bv(index, w.INDEX_BITS), "value": w.word(value),
            "keep": keep_array(entries, set(r.machine.tlb.entries()))}
    step = shadow.shadow_emulate_write(pre, args)
    assert C.truth(step.ok)
    post = C.abstract(r.world(), tlb=[e for e in entries if e in r.machine.tlb.entries()])
    for k in set(old) | set(C.nonzero_words(r.machine)):
        kk = bv(k, w.KEY_BITS)
        assert C.value(step.post.mem[kk]) == C.value(post.mem[kk]), hex(k)
    assert twins.shadow_soundness(r.machine, list(r.world().backends)) == []
