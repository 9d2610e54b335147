"""The real-Xen differential's program side, without Xen: the encoding the test
kernel reads, the translation from program frames to machine frames, and the
generator's promises (the kernel survives every program; the risky paths are
reached)."""

import struct
from collections import Counter

import pytest

from refmodel.arch.types import PAGE_SHIFT
from refmodel.errors import RefmodelError
from refmodel.hv.pv.backend import PvBackend
from refmodel.oracle.replay import HypervisorModel, build_model
from refmodel.oracle.trace import (
    Fetch, Invlpg, MmuextEntry, MmuextOp, MmuUpdate, MmuUpdateReq, Multicall, Op, Read, Trace, UpdateVaMapping, Write,
    dump_trace, parse_trace,
)
from refmodel.oracle.xen.generate import CODE_OFFSET, CODE_SLOT, ProgramGenerator, generate, window_va
from refmodel.oracle.xen.layout import dom0_header, synthetic_layout
from refmodel.oracle.xen.program import (
    FOREIGN_BASE, MAGIC, MASK_VA, SCRATCH_VA, SYM_BOOT_L3, SYM_BOOT_L4, FrameMap, Kind, Tag, encode, to_machine,
)

FMAP = FrameMap(p2m=(0x500, 0x501, 0x9000), foreign=(0x7777,), boot_l4=0x42, boot_l3=0x43)


def words(data: bytes) -> list[int]:
    assert data[:8] == MAGIC
    return list(struct.unpack(f"<{(len(data) - 8) // 8}Q", data[8:]))


def test_encoding_tags_every_frame_word() -> None:
    prog: list[Op] = [
        MmuUpdate((MmuUpdateReq((2 << 12) | 0x18 | 2, (1 << 12) | 0x67), MmuUpdateReq((1 << 12) | 1, 5))),
        MmuextOp((MmuextEntry(3, 2), MmuextEntry(7, 0x4000), MmuextEntry(17, 1, 2)), foreigndom=0x7FF0),
        UpdateVaMapping(0x1000, (1 << 12) | 1, 2),
        Read(0x2000), Write(0x2008, 7), Fetch(0x3000),
    ]
    w = words(encode(prog))
    assert w[0] == 6
    # mmu_update: foreigndom, n, then ptr and val tagged ENTRY, the M2P update's val raw
    assert w[1:4] == [Kind.MMU_UPDATE, 6, Tag.RAW]
    assert w[7:15] == [Tag.ENTRY, (2 << 12) | 0x18 | 2, Tag.ENTRY, (1 << 12) | 0x67,
                       Tag.ENTRY, (1 << 12) | 1, Tag.RAW, 5]
    # mmuext_op: the pin's frame and COPY_PAGE's two frames are FRAME, INVLPG's address RAW
    assert w[15:17] == [Kind.MMUEXT_OP, 2 + 9]
    fields = w[17:17 + 2 * 11]
    tags = fields[0::2]
    assert tags == [Tag.RAW, Tag.RAW, Tag.RAW, Tag.FRAME, Tag.RAW, Tag.RAW, Tag.RAW, Tag.RAW, Tag.RAW, Tag.FRAME, Tag.FRAME]


def test_multicall_nests_its_entries_and_refuses_a_nested_multicall() -> None:
    inner = UpdateVaMapping(0x1000, 0, 0)
    w = words(encode([Multicall((inner, inner))]))
    assert w[1:3] == [Kind.MULTICALL, 1 + 2 * (2 + 3)]
    assert w[5:7] == [Tag.RAW, Kind.UPDATE_VA_MAPPING]
    with pytest.raises(RefmodelError, match="nested multicall"):
        encode([Multicall((Multicall((inner,)),))])


def test_the_kernel_reads_aligned_quadwords_only() -> None:
    with pytest.raises(RefmodelError, match="8 aligned bytes"):
        encode([Read(0x1004)])
    with pytest.raises(RefmodelError, match="not an operation the Xen test kernel runs"):
        encode([Invlpg(0x1000)])


def test_program_frames_translate_as_the_kernel_does() -> None:
    assert [FMAP.frame(f) for f in (0, 2, FOREIGN_BASE, SYM_BOOT_L4, SYM_BOOT_L3, 3, 1 << 30)] == \
        [0x500, 0x9000, 0x7777, 0x42, 0x43, 3, 1 << 30]
    nx_entry = (1 << 63) | (0x7FF << 52) | (2 << 12) | 0xFFF
    assert FMAP.entry(nx_entry) == (1 << 63) | (0x7FF << 52) | (0x9000 << 12) | 0xFFF
    op = to_machine(MmuUpdate((MmuUpdateReq((1 << 12) | 8 | 1, 2),)), FMAP)
    assert op == MmuUpdate((MmuUpdateReq((0x501 << 12) | 8 | 1, 2),))  # an M2P value is a pfn
    op = to_machine(MmuextOp((MmuextEntry(17, 0, 1), MmuextEntry(9, 0x5000, 0x381000))), FMAP)
    assert op == MmuextOp((MmuextEntry(17, 0x500, 0x501), MmuextEntry(9, 0x5000, 0x381000)))


def test_a_dom0_header_round_trips_and_starts_on_the_pinned_boot_l4() -> None:
    layout = synthetic_layout()
    header = dom0_header(layout)
    model = build_model(header)
    assert isinstance(model, HypervisorModel)
    trace = parse_trace(dump_trace(Trace(header)))
    assert trace.header.domains[0].pv_base == layout.boot_l4
    backend = model.backend
    assert isinstance(backend, PvBackend)
    page = backend.vcpu.frames.state(layout.boot_l4)
    assert (page.type.value, page.count, page.validated, page.pinned) == ("l4_page_table", 2, True, True)
    assert backend.vcpu.guest_table == layout.boot_l4
    assert backend.vcpu.frames.state(layout.boot_l3).count == 1


def test_generation_is_deterministic() -> None:
    assert generate(7, 120) == generate(7, 120)
    assert generate(7, 120) != generate(8, 120)


@pytest.mark.parametrize("seed", range(4))
def test_the_kernel_survives_every_generated_program(seed: int) -> None:
    """Run the program on the model and check, before each operation, what the
    generator promises: the loaded base keeps the kernel's slot 0, writes reach only
    data frames that are not L1 tables, fetches only code frames."""
    gen = ProgramGenerator(seed)
    program = gen.program(300)
    check = ProgramGenerator(seed)
    boot_slot0 = check.read_entry(SYM_BOOT_L4, 0)
    for op in program:
        if isinstance(op, Write) and op.va >> 12 not in (MASK_VA >> 12, SCRATCH_VA >> 12):
            # (the prologue writes each code frame's ret through SCRATCH_VA)
            targets = check.targets(op.va)
            assert targets is not None and targets <= check.data
        if isinstance(op, Fetch):
            targets = check.targets(op.va)
            assert targets is not None and targets <= check.code
        check.emit(op)
        assert check.read_entry(check.current_base(), 0) & ~0x60 == boot_slot0 & ~0x60


def test_generated_programs_reach_every_answer() -> None:
    """Across a few programs the model gives every class of answer the comparison
    is about: success, each refusal Xen has for these calls, and each fault kind."""
    layout = synthetic_layout()
    answers: Counter[object] = Counter()
    for seed in range(4):
        model = build_model(dom0_header(layout))
        for op in generate(seed, 400):
            obs = model.step(to_machine(op, layout.frame_map()))
            for ret in (obs.ret, *(obs.results or ())):
                answers[ret] += 1
            if obs.vector == 14:
                answers[("pf", obs.error_code)] += 1
            if obs.vector == 13:
                answers["gp"] += 1
    for want in (0, -1, -3, -16, -22, -38, -95, ("pf", 0), ("pf", 2), ("pf", 3), ("pf", 0x10), ("pf", 0x11), "gp"):
        assert answers[want], (want, answers)


def test_a_walk_into_dom0s_own_tables_is_not_predicted() -> None:
    """Seed 121: boot L4 slot 2 (the code window) pointed at the boot L4 itself (a
    read-only linear entry), so a code-window walk went on through dom0's boot L3
    and L2. The generator's model runs on a synthetic dom0 whose tables there differ
    from real Xen's: it predicted a fault where Xen's walk reached a page-table
    frame, and a fetch ran its bytes (#UD). Such a walk is unknown, not empty."""

    gen = ProgramGenerator(121)
    gen.prologue()
    va = window_va(CODE_SLOT) + CODE_OFFSET
    assert (targets := gen.targets(va)) is not None and targets <= gen.code
    recursive = (SYM_BOOT_L4 << PAGE_SHIFT) | 0x65  # P|U|A|D, read-only: a linear entry
    gen.emit(MmuUpdate((MmuUpdateReq((SYM_BOOT_L4 << PAGE_SHIFT) + CODE_SLOT * 8, recursive),)))
    assert gen.read_entry(SYM_BOOT_L4, CODE_SLOT) & ~0xFFF == SYM_BOOT_L4 << PAGE_SHIFT
    gen.emit(MmuextOp((MmuextEntry(6, 0),)))  # MMUEXT_TLB_FLUSH_LOCAL: no stale translation either
    assert gen.targets(va) is None
