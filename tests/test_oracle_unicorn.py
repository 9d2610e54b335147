"""The worked example: record every core fixture unicorn can run on QEMU's MMU
(refmodel.oracle.unicorn_record) and check it against the model. QEMU's TLB makes
choices of its own (it drops global entries on MOV CR3, re-walks writes to clean
pages): the check must accept them, and must still catch a missing invalidation."""

from __future__ import annotations

from dataclasses import replace
from functools import cache
from pathlib import Path

import pytest

from refmodel.oracle.check import check
from refmodel.oracle.fixtures import Fixture, generate
from refmodel.oracle.trace import Trace, dump_trace, parse_trace
from refmodel.oracle.unicorn_adapter import UcInvlpg, run_on_unicorn
from refmodel.oracle.unicorn_record import main, obstacle, record, to_unicorn, with_observations

OTHER_VA = 0x0000_2468_ACE0_2000


@cache
def core() -> dict[str, Fixture]:
    return {f.name: f for f in generate() if f.trace.header.mode.value == "native"}


@pytest.mark.parametrize("name", sorted(core()))
def test_qemu_agrees_with_the_model(name: str) -> None:
    trace = core()[name].trace
    reason = obstacle(trace)
    if reason is not None:
        pytest.skip(f"unicorn cannot express it: {reason}")
    recorded = parse_trace(dump_trace(record(trace)), f"{name}@qemu")
    result = check(recorded)
    assert result.clean, result.summary()


def test_most_core_fixtures_run_on_unicorn() -> None:
    runnable = [n for n, f in core().items() if obstacle(f.trace) is None]
    assert len(runnable) >= 45, len(runnable)
    assert all(obstacle(f.trace) is not None for n, f in core().items() if "/pcid/" in n or "invpcid" in n)


def test_qemu_takes_other_allowed_choices_than_the_model() -> None:
    """QEMU drops global translations on MOV CR3 (unicorn_adapter.KNOWN_QEMU_DEVIATIONS,
    allowed by SDM 4.10.4.3): its observation differs from the model's own, and the
    check accepts it."""
    fixture = core()["core/tlb/global-survives-mov-cr3"]
    qemu = record(fixture.trace)
    differ = [
        i for i, (a, b) in enumerate(zip(fixture.trace.steps, qemu.steps))
        if a.obs is not None and b.obs is not None and a.obs.without_counters() != b.obs
    ]
    assert differ == [3]
    assert check(qemu).clean


def without_invlpg(trace: Trace) -> Trace:
    """Run ``trace`` on unicorn with every INVLPG aimed elsewhere: an
    implementation that forgets to invalidate."""
    run = to_unicorn(trace)
    broken = replace(run, steps=tuple(UcInvlpg(OTHER_VA) if isinstance(s, UcInvlpg) else s for s in run.steps))
    return with_observations(trace, run, run_on_unicorn(broken.memory, broken.machine, broken.steps))


def test_a_missing_invalidation_is_caught() -> None:
    trace = core()["core/tlb/remap-then-invlpg"].trace
    d = check(without_invlpg(trace)).divergence
    assert d is not None and d.index == 4, d


def test_the_recorder_refuses_what_it_cannot_express() -> None:
    with pytest.raises(Exception, match="cannot run 'mov_cr4'"):
        record(core()["core/pf/smep/enable"].trace)
    pv = next(f for f in generate() if f.name.startswith("pv/"))
    assert obstacle(pv.trace) == "mode pv: unicorn_adapter runs bare-metal paging only"


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(core()["core/pf/smap/ac0"].text())
    assert main([str(path)]) == 0
    assert check(parse_trace(capsys.readouterr().out)).clean
    path.write_text(core()["core/pf/smep/enable"].text())
    assert main([str(path)]) == 2
    assert "cannot run 'mov_cr4'" in capsys.readouterr().err
