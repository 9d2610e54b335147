"""Long commands show progress on a terminal and nothing otherwise.

A terminal is played by a text buffer whose ``isatty()`` is true; anything else
(the tests' capture, a pipe, a file) must receive no progress at all.
"""

import contextlib
import io
import re

import pytest

from refmodel.cli import main
from refmodel.hv.modes import compare_specs
from refmodel.account.costs import CostTable
from refmodel.plot import points, sweep_all
from refmodel.progress import progress


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def run_on_terminal(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), Terminal()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


BENCH = ("bench", "--sizes", "20,40", "--repeat", "1", "--no-unicorn")


def test_bench_shows_each_size_on_a_terminal_and_keeps_its_table_on_stdout() -> None:
    code, out, err = run_on_terminal(*BENCH)
    assert code == 0
    assert "bench" in err and "N=20" in err and "N=40" in err and "2/2" in err
    rows = [line.split()[0] for line in out.splitlines() if line.strip() and line.split()[0] in ("20", "40")]
    assert rows == ["20", "40"]  # the rows are output, the bar is not
    assert re.search(r"N=[24]0\b", out) is None


def test_bench_is_quiet_when_stderr_is_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(list(BENCH)) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and re.search(r"N=[24]0\b", captured.out) is None


def test_verify_shows_each_proof_on_a_terminal() -> None:
    code, out, err = run_on_terminal("verify", "--transition", "invlpg", "--workers", "1")
    assert code == 0 and "all proved" in out
    assert "proving" in err and "invlpg x " in err and "core => statement of " in err
    counts = re.search(r"(\d+) cells, (\d+) lemmas", out)
    assert counts is not None
    total = int(counts.group(1)) + int(counts.group(2))  # a cell per invariant, a lemma each
    assert f"{total}/{total}" in err


def test_the_plot_sweep_counts_every_point() -> None:
    specs = compare_specs(32, tagged=True)[:2]
    switch = compare_specs(32, tagged=False)[:1]
    sizes, remap, rounds = (1, 2), (1,), (1,)
    total = points(specs, switch, sizes, remap, rounds)
    assert total == 2 * (2 + 1) + 1
    err = Terminal()
    with contextlib.redirect_stderr(err), progress(total, "plotting", unit="point") as bar:
        swept = sweep_all(specs, switch, CostTable.default(), sizes, remap, rounds, bar=bar)
    assert sum(len(s.xs) for scenario in swept for s in scenario.series) == total
    assert f"{total}/{total}" in err.getvalue() and f"{specs[0].label}, 2" in err.getvalue()


def test_progress_draws_nothing_off_a_terminal() -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), progress(3, "x") as bar:
        assert not bar.shown
        for _ in range(3):
            bar.step("note")
    assert err.getvalue() == ""
