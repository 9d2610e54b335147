"""The cost table: every figure has a source; estimates are counts times costs; a
user's cost file overrides figures and is checked."""

import json
from pathlib import Path

import pytest

from refmodel.account.costs import CostTable
from refmodel.account.events import Counters, Event
from refmodel.cli import main
from refmodel.errors import RefmodelError


def test_every_default_figure_cites_a_source() -> None:
    table = CostTable.default()
    assert Event.VM_EXIT in table.costs and Event.EMULATED_PT_WRITE in table.costs
    for event, cost in table.costs.items():
        assert cost.source.strip(), event
        assert cost.cycles >= 0, event


def test_cycles_are_counts_times_costs() -> None:
    table = CostTable.default()
    c = Counters()
    c.add(Event.HYPERCALL, 3)
    c.add(Event.WALK_REF, 10)
    c.add(Event.TLB_HIT, 99)
    expected = 3 * table.cost_of(Event.HYPERCALL) + 10 * table.cost_of(Event.WALK_REF)
    assert table.cycles(c) == expected
    assert list(table.breakdown(c)) == [Event.HYPERCALL, Event.WALK_REF]


def test_override_file_replaces_figures(tmp_path: Path) -> None:
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"vm_exit": 500, "hypercall": {"cycles": 250, "source": "my lab"}}))
    table = CostTable.default().with_overrides(f)
    assert table.cost_of(Event.VM_EXIT) == 500
    assert table.costs[Event.HYPERCALL].source == "my lab"
    assert table.cost_of(Event.WALK_REF) == CostTable.default().cost_of(Event.WALK_REF)
    assert str(f) in table.generation


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "invalid JSON"),
        ("[1]", "expected an object"),
        ('{"vm_exits": 1}', "unknown event 'vm_exits'"),
        ('{"vm_exit": -1}', "cycles must be a number in 0"),
        ('{"vm_exit": "fast"}', "cycles must be a number in 0"),
        ('{"vm_exit": true}', "cycles must be a number in 0"),
        ('{"vm_exit": NaN}', "NaN is not a number JSON allows"),
        ('{"vm_exit": -Infinity}', "-Infinity is not a number JSON allows"),
        ('{"vm_exit": 1e400}', "got inf"),
        ('{"vm_exit": 1e13}', "0..1e\\+12"),
        ('{"vm_exit": 1' + "0" * 400 + "}", "cycles must be a number in 0"),
        ('{"vm_exit": 1' + "0" * 5000 + "}", "invalid JSON"),
        ('{"vm_exit": {"cycles": NaN}}', "NaN"),
        ('{"vm_exit": 1, "vm_exit": 2}', "duplicate key 'vm_exit'"),
        ("[" * 100_000, "invalid JSON"),
    ],
)
def test_bad_cost_files_are_named_errors(tmp_path: Path, content: str, message: str) -> None:
    f = tmp_path / "c.json"
    f.write_text(content)
    with pytest.raises(RefmodelError, match=message):
        CostTable.default().with_overrides(f)


def test_cli_reports_bad_cost_file_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["costs", "--costs", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.json" in err
