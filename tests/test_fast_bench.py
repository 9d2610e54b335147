"""The benchmark code runs and cross-checks its engines (tiny N; no timing is asserted)."""

import numpy as np
import pytest

from refmodel.cli import main
from refmodel.fast.bench import REGIONS, addresses, build_space, run_bench, run_fast, run_slow


def test_bench_addresses_translate_the_same_on_both_paths() -> None:
    space = build_space(64)
    vas = addresses(64, seed=3)
    assert [int(p) for p in run_fast(space, vas).tolist()] == run_slow(space, [int(v) for v in vas.tolist()])
    lo = min(r[0] for r in REGIONS)
    assert bool((vas >= np.uint64(lo)).all())


def test_bench_runs_with_or_without_unicorn(capsys: pytest.CaptureFixture[str]) -> None:
    lines: list[str] = []
    rows = run_bench([50, 100], slow_max_n=50, use_unicorn=True, repeat=1, seed=2, out=lines.append)
    assert [r.n for r in rows] == [50, 100]
    assert rows[1].slow_extrapolated and not rows[0].slow_extrapolated
    text = "\n".join(lines)
    assert "extrapolated" in text
    assert ("unicorn: skipped" in text) == (rows[0].unicorn_s is None)


def test_bench_command_line() -> None:
    assert main(["bench", "--sizes", "20", "--repeat", "1", "--no-unicorn"]) == 0
    assert main(["bench", "--sizes", "oops"]) == 2
