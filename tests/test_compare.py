"""The seed question's numbers, asserted across modes (issue "Hypervisor",
acceptance), and the ``refmodel compare`` command's behaviour."""

import math
from pathlib import Path

import pytest

from refmodel.account.events import Event, ExitReason
from refmodel.cli import main
from refmodel.compare import (
    RunResult, equivalent, remap_setup, remap_workload, run_switch, run_workload, seed_workload,
)
from refmodel.guest.ops import Mode
from refmodel.hv.modes import ModeSpec, compare_specs, standard_specs

PAGES = 1024
BATCH = 32


@pytest.fixture(scope="module")
def seed() -> dict[str, RunResult]:
    return {s.label: run_workload(s, seed_workload(PAGES)) for s in compare_specs(BATCH)}


@pytest.fixture(scope="module")
def remap() -> dict[str, RunResult]:
    return {s.label: run_workload(s, remap_workload(PAGES), remap_setup(PAGES)) for s in standard_specs(BATCH)}


def test_seed_guest_visible_results_identical(seed: dict[str, RunResult]) -> None:
    results = list(seed.values())
    assert equivalent(results) == []
    assert len(results[0].record.observations) == 2 * PAGES


def test_seed_shadow_traps_every_page_table_write(seed: dict[str, RunResult]) -> None:
    shadow = seed["shadow"].counters
    assert shadow.exits[ExitReason.PT_WRITE] >= PAGES
    assert shadow[Event.EMULATED_PT_WRITE] >= PAGES


def test_seed_out_of_sync_shadows_trap_far_less(seed: dict[str, RunResult]) -> None:
    oos = seed["shadow-oos"].counters.exits[ExitReason.PT_WRITE]
    assert oos * 50 < seed["shadow"].counters.exits[ExitReason.PT_WRITE]


def test_seed_pv_batches_hypercalls(seed: dict[str, RunResult]) -> None:
    batched = seed[f"pv batched ({BATCH})"].counters
    unbatched = seed["pv unbatched"].counters
    for c in (batched, unbatched):
        assert c[Event.VM_EXIT] == 0 and c[Event.HYPERCALL_ENTRY] >= PAGES
    # the 1024 leaf writes travel in ceil(1024/batch) hypercalls; table links add at most one batch
    assert math.ceil(PAGES / BATCH) <= batched[Event.HYPERCALL] <= math.ceil(PAGES / BATCH) + 1
    assert unbatched[Event.HYPERCALL] >= PAGES


@pytest.mark.parametrize(("label", "per_miss"), [("hap", 19), ("hap, 4K EPT", 24)])
def test_seed_hap_has_no_exits_and_19_or_24_references_per_cold_miss(
    seed: dict[str, RunResult], label: str, per_miss: int
) -> None:
    """The default HAP row maps guest memory with 2 MiB EPT pages: 4 guest entries,
    each through a 3-level EPT walk, and 3 for the page (19); with 4 KiB EPT pages 24."""
    hap = seed[label].counters
    assert hap[Event.VM_EXIT] == 0 and hap.exits[ExitReason.PT_WRITE] == 0
    assert hap[Event.TLB_MISS] == PAGES and hap[Event.EPT_SPLIT] == 0
    assert hap[Event.WALK_REF] == 4 * PAGES
    assert hap[Event.WALK_REF] + hap[Event.EPT_WALK_REF] == per_miss * hap[Event.TLB_MISS]
    assert seed["native"].counters[Event.WALK_REF] == 4 * seed["native"].counters[Event.TLB_MISS]


def flushes(r: RunResult) -> int:
    c = r.counters
    return sum(c[e] for e in (Event.TLB_FLUSH_SINGLE, Event.TLB_FLUSH_FULL, Event.TLB_FLUSH_PCID,
                               Event.TLB_FLUSH_GLOBAL, Event.TLB_FLUSH_VPID))


def test_remap_pv_batched_flushes_once_per_batch_shadow_per_write(remap: dict[str, RunResult]) -> None:
    assert equivalent(list(remap.values())) == []
    assert flushes(remap[f"pv batched ({BATCH})"]) == math.ceil(PAGES / BATCH)
    shadow = remap["shadow"].counters
    assert shadow.exits[ExitReason.PT_WRITE] >= PAGES
    assert shadow.exits[ExitReason.INVLPG] == PAGES
    assert flushes(remap["shadow"]) >= PAGES


@pytest.mark.parametrize("tagged", [False, True])
def test_switch_costs_the_same_world_switch_and_tags_keep_the_tlb(tagged: bool) -> None:
    results = [run_switch(s, working_set=32, rounds=4) for s in standard_specs(BATCH, tagged=tagged)]
    assert equivalent(results) == []
    hyper = [r for r in results if r.spec.mode is not Mode.NATIVE]
    assert len({r.counters[Event.WORLD_SWITCH] for r in hyper}) == 1
    for r in hyper:
        if tagged:
            assert r.counters[Event.TLB_MISS] == 0, r.spec.label
        else:
            assert r.counters[Event.TLB_MISS] == 8 * 32, r.spec.label


def test_compare_cli_prints_every_mode_and_the_equivalence_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--pages", "8", "--scenario", "seed"]) == 0
    out = capsys.readouterr().out
    for label in ("native", "shadow", "shadow-oos", "pv unbatched", "pv batched (32)", "hap", "hap, 4K EPT"):
        assert f"\n{label} " in out
    assert "identical across all 7 modes" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--pages", "0"], "--pages: must be in 1..4096"), (["--pages", "5000"], "--pages"), (["--batch", "0"], "--batch")],
)
def test_compare_cli_rejects_bad_arguments(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_compare_plot_draws_every_scenario_with_one_style_per_mode(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from refmodel.account.costs import CostTable
    from refmodel.plot import STYLES, Series, crossover, plot, style_of, sweep_all

    specs = [ModeSpec(Mode.NATIVE), ModeSpec(Mode.PV, batch_size=8), ModeSpec(Mode.HAP)]
    scenarios = sweep_all(specs, [ModeSpec(Mode.NATIVE, tagged=False)], CostTable.default(),
                          sizes=(1, 16), remap_sizes=(1, 4), rounds=(1, 2), working_set=8)
    assert [len(s.series) for s in scenarios] == [3, 3, 1]
    assert [s.xs for s in scenarios[1].series] == [(1, 4)] * 3 and scenarios[2].series[0].xs == (1, 2)
    pv = scenarios[0].series[1]
    assert pv.hypercalls[1] > pv.hypercalls[0] and pv.entries == pv.hypercalls
    out = tmp_path / "p.png"
    plot(scenarios, out, "test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    labels = [s.label for s in compare_specs(BATCH)]
    assert len({style_of(label) for label in labels}) == len(labels)  # one colour/marker/line per mode
    assert len({style_of(label)[0] for label in labels}) == len(labels) and set(STYLES) < set(labels)
    a = Series("a", (1, 2, 4), (0, 0, 0), (0, 0, 0), (1.0, 5.0, 9.0))
    b = Series("b", (1, 2, 4), (0, 0, 0), (0, 0, 0), (2.0, 6.0, 8.0))
    assert crossover(a, b) == 4 and crossover(b, a) is None


def test_seed_shadow_with_linux_flags_traps_1028_writes_and_takes_no_hidden_fault(seed: dict[str, RunResult]) -> None:
    shadow = seed["shadow"].counters
    assert shadow.exits[ExitReason.PT_WRITE] == 1028  # 1024 leaves + 4 table links
    assert shadow[Event.VM_EXIT] == 1028
    assert shadow[Event.SHADOW_FILL] == 0 and shadow.exits[ExitReason.PAGE_FAULT] == 0


def test_seed_a_d_clear_guest_shows_the_1024_hidden_faults() -> None:
    from refmodel.guest.kernel import PteFlavour

    spec = ModeSpec(Mode.SHADOW)
    shadow = run_workload(spec, seed_workload(PAGES), flavour=PteFlavour.AD_CLEAR).counters
    assert shadow.exits[ExitReason.PT_WRITE] == 1028
    assert shadow[Event.SHADOW_FILL] == 1024 and shadow.exits[ExitReason.PAGE_FAULT] == 1024
    native = run_workload(ModeSpec(Mode.NATIVE), seed_workload(PAGES), flavour=PteFlavour.AD_CLEAR)
    hap = run_workload(ModeSpec(Mode.HAP), seed_workload(PAGES), flavour=PteFlavour.AD_CLEAR)
    assert equivalent([native, run_workload(spec, seed_workload(PAGES), flavour=PteFlavour.AD_CLEAR), hap]) == []


def test_every_event_has_a_cause_and_the_causes_add_up(seed: dict[str, RunResult]) -> None:
    from refmodel.account.costs import CAUSE_OF, Cause, CostTable
    from refmodel.compare import row_for

    assert set(CAUSE_OF) == set(Event)
    costs = CostTable.default()
    for r in seed.values():
        row = row_for(r, costs)
        assert math.isclose(sum(row.by_cause.values()), row.cycles)
    shadow = row_for(seed["shadow"], costs).by_cause
    assert shadow[Cause.EXITS] == 1028 * costs.cost_of(Event.VM_EXIT)
    assert shadow[Cause.EMULATION] == 1028 * costs.cost_of(Event.EMULATED_PT_WRITE)
    batched = row_for(seed[f"pv batched ({BATCH})"], costs).by_cause
    assert batched[Cause.EXITS] == 0 and batched[Cause.HYPERCALLS] > 0.8 * sum(batched.values())
    hap = row_for(seed["hap"], costs).by_cause
    assert hap[Cause.WALKS] == 19 * PAGES * costs.cost_of(Event.WALK_REF)


def test_compare_cli_prints_the_cost_split_and_takes_the_guest_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--pages", "8", "--scenario", "seed", "--guest", "ad-clear"]) == 0
    out = capsys.readouterr().out
    assert "ad-clear guest" in out
    header = next(line for line in out.splitlines() if line.startswith("cycles by cause"))
    for cause in ("exits + handling", "emulation", "hypercalls", "flushes", "TLB misses", "world switches", "total"):
        assert cause in header
