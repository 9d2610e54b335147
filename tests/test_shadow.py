"""Shadow paging (refmodel.hv.shadow): what traps, what it costs, and that the guest
cannot tell — fixed scenarios. The Hypothesis equivalence lives in
test_shadow_equivalence.py."""

from collections.abc import Callable
from dataclasses import replace

import pytest

from refmodel.account.events import Event, ExitReason
from refmodel.arch.access import AccessKind
from refmodel.arch.control import Cr0
from refmodel.arch.fault import PageFault, PfErrorCode
from refmodel.arch.pte import Level, PteFlag, entry_frame_address
from refmodel.arch.types import GFN, MFN, PAGE_SHIFT
from refmodel.guest.kernel import GuestKernel, PteFlavour
from refmodel.guest.ops import MmuBackend, Mode
from refmodel.hv.modes import ModeSpec, build_backend
from refmodel.hv.native import NativeBackend
from refmodel.hv.shadow import ShadowBackend, shadow_sound
from refmodel.hv.shadow.oos import OosPage, OosTable
from refmodel.hv.shadow.propagate import perms_strictly_increased, shadow_leaf_entry, shadow_upper_entry
from test_shadow_support import (
    BUFFER_VA,
    GUEST_FRAMES,
    PAGE,
    USER_RW,
    HandGuest,
    assert_sound,
    native_record,
    new_shadow,
    outcome,
    populate_and_touch,
    record,
    run_kernel,
)

A, D, RW, US, XD, P, G = (int(f) for f in (PteFlag.A, PteFlag.D, PteFlag.RW, PteFlag.US, PteFlag.XD, PteFlag.P, PteFlag.G))


# -- propagation rules ---------------------------------------------------------------------------------
def test_leaf_needs_guest_d_to_be_writable_and_never_maps_a_page_table_writable() -> None:
    target = MFN(0x1234)
    assert shadow_leaf_entry(USER_RW | A | D, target, write_protect=False) & RW
    assert not shadow_leaf_entry(USER_RW | A, target, write_protect=False) & RW
    assert not shadow_leaf_entry(USER_RW | A | D, target, write_protect=True) & RW
    entry = shadow_leaf_entry(USER_RW | A | XD | G, target, write_protect=False)
    assert entry_frame_address(entry, 40) >> PAGE_SHIFT == target
    assert entry & XD and entry & G and entry & US and entry & A and not entry & D


def test_upper_entry_copies_rights_and_presets_a_d() -> None:
    entry = shadow_upper_entry(P | US | A, MFN(7))
    assert entry & ~0xFFF & ((1 << 52) - 1) == 7 << PAGE_SHIFT
    assert entry & (A | D | US | P) == A | D | US | P and not entry & RW


def test_perms_strictly_increased_is_xens_rule() -> None:
    assert perms_strictly_increased(P | US, P | US | RW)
    assert perms_strictly_increased(P | XD, P)  # losing XD gains execute
    assert not perms_strictly_increased(P | RW, P)
    assert not perms_strictly_increased(P, P | XD)
    assert not perms_strictly_increased(P | US, 0)


# -- the out-of-sync hash ---------------------------------------------------------------------------------
def test_oos_hash_has_three_slots_and_evicts_like_xen() -> None:
    table = OosTable()
    pages = [OosPage(GFN(g), MFN(m), []) for g, m in ((1, 3), (2, 6), (3, 4), (4, 9))]
    assert table.add(pages[0]) is None  # home slot 0
    assert table.add(pages[1]) is None  # home slot 0 taken by a page at home: it is punted to slot 1
    assert [p.gfn for p in table.pages()] == [2, 1]
    # mfn 4 % 3 == 1: slot 1 holds gfn 1 (mfn 3, home slot 0), which is not at home: crushed
    evicted = table.add(pages[2])
    assert evicted is not None and evicted.gfn == 1 and 3 in table and 1 not in table
    # mfn 9 % 3 == 0: gfn 2 is at home there, punted to slot 1, crushing gfn 3
    evicted = table.add(pages[3])
    assert evicted is not None and evicted.gfn == 3
    assert sorted(p.gfn for p in table.pages()) == [2, 4]


# -- the seed scenario ---------------------------------------------------------------------------------
def counted(
    backend: ShadowBackend,
    workload: Callable[[GuestKernel, int], None],
    setup: Callable[[GuestKernel, int], None] | None = None,
    flavour: PteFlavour = PteFlavour.LINUX,
) -> tuple[GuestKernel, dict[str, int]]:
    """Run ``workload`` (after an uncounted ``setup``) on a guest writing ``flavour``'s
    A/D flags; returns the kernel and what was counted."""
    kernel = GuestKernel(backend, GUEST_FRAMES, flavour=flavour)
    pid = kernel.create_process()
    if setup is not None:
        setup(kernel, pid)
    kernel.observations.clear()
    before = backend.counters.copy()
    workload(kernel, pid)
    return kernel, backend.counters.since(before).as_dict()


def test_seed_shadow_traps_every_page_table_write() -> None:
    """Linux's flags: the 1024 leaves and 4 table links trap, and each write is
    propagated whole (A set: the shadow entry is present; D set: it is writable), so
    first touches find the shadow ready: no hidden faults."""
    backend = new_shadow(oos=False)
    kernel, c = counted(backend, populate_and_touch(1024))
    assert_sound(backend)
    assert record(kernel) == native_record(populate_and_touch(1024))
    assert c["exit.pt_write"] == 1028 and c["emulated_pt_write"] == c["exit.pt_write"]
    assert "shadow_fill" not in c and "exit.page_fault" not in c
    assert "guest_page_fault" not in c and "shadow_resync" not in c


def test_seed_shadow_with_a_d_clear_pays_a_hidden_fault_per_first_touch() -> None:
    """The A/D-clear guest: every page's first access finds the guest's A (and D)
    clear, so the shadow cannot map it yet: one hidden fault each."""
    backend = new_shadow(oos=False)
    kernel, c = counted(backend, populate_and_touch(1024), flavour=PteFlavour.AD_CLEAR)
    assert_sound(backend)
    assert record(kernel) == native_record(populate_and_touch(1024), PteFlavour.AD_CLEAR)
    assert c["exit.pt_write"] == 1028 and c["emulated_pt_write"] == c["exit.pt_write"]
    assert c["shadow_fill"] == 1024 and c["exit.page_fault"] == 1024
    assert "guest_page_fault" not in c and "shadow_resync" not in c


@pytest.mark.parametrize("flavour", list(PteFlavour))
def test_seed_shadow_oos_traps_once_per_table(flavour: PteFlavour) -> None:
    """Out of sync, an L1's entries reach the shadow one hidden fault at a time,
    whatever flags the guest wrote."""
    backend = new_shadow(oos=True)
    kernel, c = counted(backend, populate_and_touch(1024), flavour=flavour)
    assert_sound(backend)
    assert record(kernel) == native_record(populate_and_touch(1024), flavour)
    l1_tables = 2  # 1024 pages / 512 entries
    assert c["exit.pt_write"] <= 4 * l1_tables
    assert c.get("shadow_resync", 0) <= l1_tables
    if flavour is PteFlavour.AD_CLEAR:
        assert c["shadow_resync"] >= 1
    assert c["emulated_pt_write"] < c["exit.pt_write"]  # the unsyncing writes are not emulated
    assert c["shadow_fill"] == 1024


def remap_setup(kernel: GuestKernel, pid: int) -> None:
    populate_and_touch(1024)(kernel, pid)


def remap_workload(kernel: GuestKernel, pid: int) -> None:
    kernel.remap(pid, BUFFER_VA, 1024)
    for i in range(1024):
        kernel.touch(BUFFER_VA + i * PAGE, AccessKind.READ)


@pytest.mark.parametrize("oos", [False, True])
def test_remap_pays_an_invlpg_exit_per_page(oos: bool) -> None:
    backend = new_shadow(oos=oos)
    kernel, c = counted(backend, remap_workload, remap_setup)
    assert_sound(backend)

    def native(k: GuestKernel, pid: int) -> None:
        remap_setup(k, pid)
        k.observations.clear()
        remap_workload(k, pid)

    assert record(kernel) == native_record(native)
    assert c["exit.invlpg"] == 1024
    if oos:
        assert c.get("exit.pt_write", 0) <= 4  # the L1s went out of sync during the set-up
    else:
        assert c["exit.pt_write"] >= 1024 and c["emulated_pt_write"] >= 1024


# -- hidden and reflected faults ---------------------------------------------------------------------------
@pytest.mark.parametrize("flavour", list(PteFlavour))
def test_demand_paging_reflects_the_guest_fault_then_fills_the_shadow(flavour: PteFlavour) -> None:
    backend = new_shadow(oos=False)

    def workload(kernel: GuestKernel, pid: int) -> None:
        kernel.map_range(pid, BUFFER_VA, 10, writable=True)
        for i in range(10):
            kernel.touch(BUFFER_VA + i * PAGE, AccessKind.READ)
        kernel.touch(BUFFER_VA + 20 * PAGE, AccessKind.READ)  # no mapping: SIGSEGV

    kernel, c = counted(backend, workload, flavour=flavour)
    assert_sound(backend)
    assert record(kernel) == native_record(workload, flavour)
    faults = [o for o in kernel.observations if o.event == "fault"]
    assert len(faults) == 11 == c["guest_page_fault"]
    # the handler's entry is propagated when it is written; with A clear the shadow
    # must wait for the retry's hidden fault to learn the page was accessed
    fills = 10 if flavour is PteFlavour.AD_CLEAR else 0
    assert c.get("shadow_fill", 0) == fills
    assert c["exit.page_fault"] == c["guest_page_fault"] + fills


def test_protect_then_write_is_a_guest_visible_fault() -> None:
    backend = new_shadow(oos=True)

    def workload(kernel: GuestKernel, pid: int) -> None:
        kernel.map_range(pid, BUFFER_VA, 4, writable=True, populate=True)
        kernel.touch(BUFFER_VA, AccessKind.WRITE, 1)
        kernel.protect(pid, BUFFER_VA, 4, writable=False)
        kernel.touch(BUFFER_VA, AccessKind.WRITE, 2)
        kernel.touch(BUFFER_VA, AccessKind.READ)

    kernel, c = counted(backend, workload)
    assert_sound(backend)
    assert record(kernel) == native_record(workload)
    fault = next(o for o in kernel.observations if o.event == "fault")
    assert fault.error_code == int(PfErrorCode.P | PfErrorCode.W | PfErrorCode.U)
    assert c["guest_page_fault"] == 1


def test_fork_copy_on_write_under_both_variants() -> None:
    def workload(kernel: GuestKernel, pid: int) -> None:
        kernel.map_range(pid, BUFFER_VA, 40, writable=True, populate=True)
        for i in range(40):
            kernel.touch(BUFFER_VA + i * PAGE, AccessKind.WRITE, i)
        child = kernel.fork(pid)
        kernel.touch(BUFFER_VA, AccessKind.WRITE, 100)
        kernel.switch_to(child)
        kernel.touch(BUFFER_VA, AccessKind.READ)
        kernel.touch(BUFFER_VA + PAGE, AccessKind.WRITE, 200)
        kernel.switch_to(pid)
        kernel.touch(BUFFER_VA + PAGE, AccessKind.READ)
        kernel.unmap_range(pid, BUFFER_VA, 2)
        kernel.touch(BUFFER_VA, AccessKind.READ)

    want = native_record(workload)
    for oos in (False, True):
        backend = new_shadow(oos=oos)
        assert record(run_kernel(backend, workload)) == want
        assert_sound(backend)


# -- write protection -------------------------------------------------------------------------------------
def test_a_frame_that_becomes_a_page_table_loses_its_writable_mappings() -> None:
    backend = new_shadow(oos=False)
    guest = HandGuest(backend)
    data = guest.alloc()
    guest.map(BUFFER_VA, data)
    assert backend.access(BUFFER_VA, AccessKind.WRITE, 3, 0x55) == 0  # shadow leaf now writable, TLB warm
    assert_sound(backend)
    flushes = backend.counters[Event.TLB_FLUSH_VPID]
    # the guest turns the data frame into a page table for another range
    guest.set(BUFFER_VA + (1 << 21), Level.L2, (data << PAGE_SHIFT) | USER_RW)
    assert backend.shadows.is_shadowed(data)
    assert backend.counters[Event.TLB_FLUSH_VPID] == flushes + 1
    assert_sound(backend)
    # a write through the old mapping now traps and is emulated into the new table
    exits = backend.counters.exits[ExitReason.PT_WRITE]
    target = guest.alloc()
    assert backend.access(BUFFER_VA, AccessKind.WRITE, 3, (target << PAGE_SHIFT) | USER_RW) == 0
    assert backend.counters.exits[ExitReason.PT_WRITE] == exits + 1
    assert backend.read_frame_u64(data, 0) == (target << PAGE_SHIFT) | USER_RW
    assert_sound(backend)
    assert backend.access(BUFFER_VA + (1 << 21), AccessKind.READ, 3) == 0
    assert_sound(backend)


def hand_scenario(build: Callable[[HandGuest], list[int | PageFault]], oos: bool = False) -> tuple[list[tuple[str, int]], list[tuple[str, int]], ShadowBackend]:
    """Run a hand-built scenario natively and under shadow paging."""
    native = [outcome(r) for r in build(HandGuest(NativeBackend(GUEST_FRAMES)))]
    backend = new_shadow(oos=oos)
    shadow = [outcome(r) for r in build(HandGuest(backend))]
    return native, shadow, backend


@pytest.mark.parametrize("oos", [False, True])
def test_user_writes_to_its_own_page_table_through_a_mapping(oos: bool) -> None:
    """The guest maps its own L1 table into user space and writes a PTE through it."""

    def build(g: HandGuest) -> list[int | PageFault]:
        data, other = g.alloc(), g.alloc()
        g.map(BUFFER_VA, data)
        l1 = g.table(BUFFER_VA, Level.L1)
        window = BUFFER_VA + 8 * PAGE
        g.map(window, l1, USER_RW | D)
        out = [g.mmu.access(BUFFER_VA, AccessKind.WRITE, 3, 7), g.mmu.access(BUFFER_VA, AccessKind.READ, 3)]
        out.append(g.mmu.access(window, AccessKind.WRITE, 3, (other << PAGE_SHIFT) | USER_RW))  # retarget BUFFER_VA
        g.mmu.invlpg(BUFFER_VA)
        out += [g.mmu.access(BUFFER_VA, AccessKind.READ, 3), g.mmu.access(window, AccessKind.READ, 3)]
        out += [g.read_entry(BUFFER_VA, Level.L1), g.read_entry(window, Level.L1)]
        return out

    native, shadow, backend = hand_scenario(build, oos)
    assert shadow == native
    assert backend.counters.exits[ExitReason.PT_WRITE] >= 1
    assert_sound(backend)


def test_a_reserved_bit_fault_is_reflected_with_rsvd() -> None:
    def build(g: HandGuest) -> list[int | PageFault]:
        g.map(BUFFER_VA, g.alloc(), USER_RW | (1 << 45))  # above MAXPHYADDR 40
        return [g.mmu.access(BUFFER_VA, AccessKind.READ, 3), g.read_entry(BUFFER_VA, Level.L2)]

    native, shadow, backend = hand_scenario(build)
    assert shadow == native
    assert native[0][0] == "fault" and native[0][1] & PfErrorCode.RSVD
    assert backend.counters.exits[ExitReason.PAGE_FAULT] == 1 and backend.counters[Event.SHADOW_FILL] == 0
    assert_sound(backend)


def test_a_guest_2mib_page_is_emulated_not_shadowed() -> None:
    def build(g: HandGuest) -> list[int | PageFault]:
        base = 512  # gfn 512..1023, 2 MiB aligned
        g.set(BUFFER_VA, Level.L2, (base << PAGE_SHIFT) | USER_RW | int(PteFlag.PS))
        va = BUFFER_VA + 5 * PAGE + 16
        return [
            g.mmu.access(va, AccessKind.WRITE, 3, 0xABC),
            g.mmu.access(va, AccessKind.READ, 3),
            g.mmu.access(va + (1 << 21), AccessKind.READ, 3),
            g.read_entry(BUFFER_VA, Level.L2),
            g.mmu.read_frame_u64(GFN(517), 16),
        ]

    native, shadow, backend = hand_scenario(build)
    assert shadow == native
    assert native[1] == ("ok", 0xABC)
    assert backend.counters.exits[ExitReason.PAGE_FAULT] >= 2
    assert_sound(backend)


def test_supervisor_write_with_guest_cr0_wp_clear_is_emulated() -> None:
    def build(g: HandGuest) -> list[int | PageFault]:
        g.map(BUFFER_VA, g.alloc(), int(PteFlag.P | PteFlag.US))  # read-only
        if isinstance(g.mmu, NativeBackend):
            g.mmu.mmu.state = replace(g.mmu.mmu.state, cr0=g.mmu.mmu.state.cr0 & ~int(Cr0.WP))
        else:
            assert isinstance(g.mmu, ShadowBackend)
            g.mmu.guest_state = replace(g.mmu.guest_state, cr0=g.mmu.guest_state.cr0 & ~int(Cr0.WP))
        return [
            g.mmu.access(BUFFER_VA, AccessKind.WRITE, 0, 9),
            g.mmu.access(BUFFER_VA, AccessKind.READ, 3),
            g.mmu.access(BUFFER_VA, AccessKind.WRITE, 3, 1),  # user: still refused
            g.read_entry(BUFFER_VA, Level.L1),
        ]

    native, shadow, backend = hand_scenario(build)
    assert shadow == native
    assert native[0] == ("ok", 0) and native[1] == ("ok", 9) and native[2][0] == "fault"
    assert_sound(backend)


# -- out of sync ----------------------------------------------------------------------------------------------
def test_oos_shadow_is_stale_until_the_guest_invalidates() -> None:
    backend = new_shadow(oos=True)
    guest = HandGuest(backend)
    old, new = guest.alloc(), guest.alloc()
    backend.write_frame_u64(old, 0, 111)
    backend.write_frame_u64(new, 0, 222)
    guest.map(BUFFER_VA, old)
    assert backend.access(BUFFER_VA, AccessKind.READ, 3) == 111
    l1 = guest.table(BUFFER_VA, Level.L1)
    guest.map(BUFFER_VA + PAGE, guest.alloc())  # a trapped write unsyncs the L1
    assert l1 in backend.oos and not backend.write_protected(l1)
    exits = backend.counters[Event.VM_EXIT]
    guest.map(BUFFER_VA, new)  # no trap now
    assert backend.counters[Event.VM_EXIT] == exits
    assert_sound(backend)  # judged against the snapshot
    assert backend.access(BUFFER_VA, AccessKind.READ, 3) == 111  # stale, as a TLB may be
    backend.invlpg(BUFFER_VA)
    assert backend.access(BUFFER_VA, AccessKind.READ, 3) == 222
    assert l1 in backend.oos  # INVLPG synced one entry, not the table
    resyncs = backend.counters[Event.SHADOW_RESYNC]
    backend.flush_tlb()
    assert l1 not in backend.oos and backend.write_protected(l1)
    assert backend.counters[Event.SHADOW_RESYNC] == resyncs + 1
    assert_sound(backend)


def test_at_most_three_tables_are_out_of_sync() -> None:
    backend = new_shadow(oos=True)
    guest = HandGuest(backend)
    for i in range(5):
        guest.map(BUFFER_VA + i * (1 << 21), guest.alloc())  # a new L1 each
        guest.map(BUFFER_VA + i * (1 << 21) + PAGE, guest.alloc())  # traps, unsyncs it
        assert len(backend.oos.pages()) <= 3
        assert_sound(backend)
    # five tables were unsynced; each one no longer out of sync was evicted and resynced
    assert backend.counters[Event.SHADOW_RESYNC] == 5 - len(backend.oos.pages()) >= 2


# -- the TLB without VPIDs -------------------------------------------------------------------------------------
def test_untagged_every_exit_flushes_the_whole_tlb() -> None:
    backend = new_shadow(oos=False, tagged=False)
    kernel, c = counted(backend, populate_and_touch(64))
    assert_sound(backend)
    assert record(kernel) == native_record(populate_and_touch(64))
    assert c["tlb_flush_global"] == c["vm_exit"] > 0
    assert backend.mmu.vpid == 0 and backend.vpid == 2


def test_tagged_exits_do_not_flush() -> None:
    backend = new_shadow(oos=False, tagged=True)
    _, c = counted(backend, populate_and_touch(64))
    assert "tlb_flush_global" not in c and c["vm_exit"] > 0


# -- interface details ------------------------------------------------------------------------------------------
def test_mode_registry_builds_both_variants() -> None:
    for mode in (Mode.SHADOW, Mode.SHADOW_OOS):
        backend = build_backend(ModeSpec(mode, tagged=False))
        assert isinstance(backend, ShadowBackend) and backend.mode is mode and not backend.tagged


def test_guest_state_holds_the_guests_cr3_and_cr2() -> None:
    backend = new_shadow(oos=False)
    guest = HandGuest(backend)
    assert backend.guest_state.cr3 == guest.root << PAGE_SHIFT
    assert backend.root is not None and backend.mmu.state.cr3 == backend.root.smfn << PAGE_SHIFT
    fault = backend.access(BUFFER_VA, AccessKind.READ, 3)
    assert isinstance(fault, PageFault) and backend.guest_state.cr2 == BUFFER_VA
    assert backend.counters.exits[ExitReason.CR3_WRITE] == 1


def test_user_mistakes_raise_refmodel_error() -> None:
    from refmodel.errors import RefmodelError

    backend: MmuBackend = new_shadow(oos=False)
    with pytest.raises(RefmodelError):
        backend.write_pte(GFN(GUEST_FRAMES + 5), 0, Level.L1, 0)
    with pytest.raises(RefmodelError):
        backend.read_pte(GFN(1), 512)
    with pytest.raises(RefmodelError):
        backend.load_cr3(GFN(1 << 30))


def test_shadow_sound_reports_a_corrupted_shadow() -> None:
    backend = new_shadow(oos=False)
    kernel = run_kernel(backend, populate_and_touch(8))
    assert kernel.observations and not shadow_sound(backend)
    leaf = next(p for p in backend.shadows.pages() if p.level is Level.L1)
    index = next(i for i, e in enumerate(backend.shadows.entries(leaf)) if e & P)
    entry = backend.shadows.read(leaf, index)
    foreign = MFN(next(iter(backend.machine.frames_of(0x7FF2))) + 1)  # a hypervisor frame
    backend.machine.mem.write_u64(leaf.entry_address(index), (entry & 0xFFF) | (foreign << PAGE_SHIFT))
    assert any("does not own" in p for p in shadow_sound(backend))
    backend.machine.mem.write_u64(leaf.entry_address(index), entry | US | RW | D)
    root_table = backend.shadows.lookup(GFN(backend.guest_state.cr3 >> PAGE_SHIFT), Level.L4)
    assert root_table is not None
    l1_gfn = leaf.gfn
    backend.machine.mem.write_u64(
        leaf.entry_address(index), (backend.domain.p2m[l1_gfn] << PAGE_SHIFT) | USER_RW | A | D
    )
    problems = shadow_sound(backend)
    assert any("write-protected page table" in p for p in problems)


# -- two domains on one processor ---------------------------------------------------------------------------
@pytest.mark.parametrize("tagged", [True, False])
@pytest.mark.parametrize("oos", [False, True])
def test_two_domains_share_the_tlb_but_not_translations(tagged: bool, oos: bool) -> None:
    """Two shadowed guests use the same virtual addresses, interleaved by the
    scheduler on one physical TLB: each sees only its own memory."""
    from refmodel.hv.machine import Machine
    from refmodel.hv.sched import Scheduler

    Step = Callable[[GuestKernel, int], None]

    def touch(i: int, kind: AccessKind, value: int = 0) -> Step:
        return lambda k, pid: k.touch(BUFFER_VA + i * PAGE, kind, value)

    def workload(seed: int) -> list[Step]:
        steps: list[Step] = [lambda k, pid: k.map_range(pid, BUFFER_VA, 40, writable=True, populate=True)]
        steps += [touch(i, AccessKind.WRITE, seed * 1000 + i) for i in range(40)]
        steps += [touch(i, AccessKind.READ) for i in range(40)]
        steps.append(lambda k, pid: k.remap(pid, BUFFER_VA, 8))
        steps += [touch(i, AccessKind.READ) for i in range(10)]
        return steps

    machine = Machine()
    sched = Scheduler(machine.tlb, machine.counters, tagged)
    kernels, pids = [], []
    for domid in (1, 2):
        backend = ShadowBackend(machine, machine.create_domain(domid, GUEST_FRAMES), tagged=tagged, oos=oos)
        sched.add(domid, backend)
        kernels.append(GuestKernel(backend, GUEST_FRAMES))
    for i, kernel in enumerate(kernels):
        sched.switch_to(i)
        pids.append(kernel.create_process())
    steps = [workload(1), workload(2)]
    for n in range(len(steps[0])):
        for i in (0, 1):
            sched.switch_to(i)
            steps[i][n](kernels[i], pids[i])
    for i, kernel in enumerate(kernels):
        assert isinstance(kernel.mmu, ShadowBackend)
        assert_sound(kernel.mmu)

        def alone(k: GuestKernel, pid: int, i: int = i) -> None:
            for step in steps[i]:
                step(k, pid)

        assert record(kernel) == native_record(alone)


def test_moving_an_upper_level_mapping_flushes_but_an_l1_change_does_not() -> None:
    """Xen set.c: a shadow L2-L4 entry replaced by one pointing elsewhere (or with
    fewer rights) flushes the TLB; a shadow L1 change never does (the guest must)."""
    backend = new_shadow(oos=False)
    guest = HandGuest(backend)
    old, new = guest.alloc(), guest.alloc()
    backend.write_frame_u64(old, 0, 1)
    backend.write_frame_u64(new, 0, 2)
    guest.map(BUFFER_VA, old)
    assert backend.access(BUFFER_VA, AccessKind.READ, 3) == 1
    flushes = backend.counters[Event.TLB_FLUSH_VPID]
    guest.map(BUFFER_VA, new)  # an L1 change: emulated, no flush, the TLB keeps the old page
    assert backend.counters[Event.TLB_FLUSH_VPID] == flushes
    assert backend.access(BUFFER_VA, AccessKind.READ, 3) == 1
    other_l1 = guest.alloc()
    backend.write_pte(other_l1, 0, Level.L1, (old << PAGE_SHIFT) | USER_RW | A)
    guest.set(BUFFER_VA, Level.L2, (other_l1 << PAGE_SHIFT) | USER_RW | A)  # moves the whole 2 MiB
    assert backend.counters[Event.TLB_FLUSH_VPID] == flushes + 1
    assert backend.access(BUFFER_VA, AccessKind.READ, 3) == 1  # through the new L1 -> old again
    assert_sound(backend)
    backend.invlpg(BUFFER_VA)
    guest.set(BUFFER_VA, Level.L2, 0)
    assert backend.counters[Event.TLB_FLUSH_VPID] == flushes + 2
    assert isinstance(backend.access(BUFFER_VA, AccessKind.READ, 3), PageFault)
    assert_sound(backend)
