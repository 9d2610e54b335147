"""refmodel check: the comparison rule, the allowed TLB outcomes (SDM Vol. 3A
4.10.2, 4.10.4.3) and the divergence report."""

from __future__ import annotations

from dataclasses import replace
from functools import cache
from pathlib import Path

import pytest

from refmodel.cli import main
from refmodel.oracle.check import agrees, check
from refmodel.oracle.fixtures import Fixture, generate
from refmodel.oracle.trace import (
    Observation,
    Result,
    Step,
    Trace,
    dump_trace,
    gp_obs,
    ok,
    page_fault_obs,
    parse_trace,
)

DATA = 0xD47A_0000_0020_00C3  # data_word(DATA_PA)
OTHER = 0xD47A_0000_0030_00C3  # data_word(OTHER_PA)
DATA_VA = 0x0000_1234_5678_9000


@cache
def fixtures() -> dict[str, Fixture]:
    return {f.name: f for f in generate()}


def fixture(name: str) -> Fixture:
    return fixtures()[name]


def recorded(name: str, **obs: Observation | None) -> Trace:
    """A fixture as an implementation without counters would record it, with the
    observations at the given step indices (``s3=...``) replaced."""
    trace = fixture(name).trace
    steps = [replace(s, obs=s.obs.without_counters() if s.obs else None, allowed=()) for s in trace.steps]
    for key, value in obs.items():
        index = int(key[1:])
        steps[index] = replace(steps[index], obs=value, allowed=())
    return parse_trace(dump_trace(replace(trace, steps=tuple(steps))))


def without_observations(trace: Trace) -> Trace:
    return replace(trace, steps=tuple(replace(s, obs=None, allowed=()) for s in trace.steps))


def test_agreement_compares_only_recorded_fields() -> None:
    model = replace(page_fault_obs(0x1000, 6), counters=(("tlb_miss", 1), ("walk_ref", 4)))
    assert agrees(Observation(Result.FAULT), model)
    assert agrees(Observation(Result.FAULT, vector=14, error_code=6), model)
    assert not agrees(Observation(Result.FAULT, vector=14, error_code=7), model)
    assert not agrees(Observation(Result.OK), model)
    assert not agrees(ok(5), ok())  # a value the model does not have
    assert agrees(replace(ok(), counters=(("walk_ref", 4),)), replace(ok(), counters=model.counters))
    assert agrees(replace(ok(), counters=(("tlb_hit", 0),)), replace(ok(), counters=model.counters))
    assert not agrees(replace(ok(), counters=(("walk_ref", 3),)), replace(ok(), counters=model.counters))


def test_a_wrong_value_is_reported_with_index_line_and_context() -> None:
    trace = recorded("core/access/sizes", s2=ok(0x0304))
    result = check(trace)
    d = result.divergence
    assert d is not None and d.index == 2 and d.step.line == 4
    assert d.allowed == ((replace(ok(0x0102), counters=d.allowed[0][0].counters),
                          "the model's TLB, a translation it had cached"),)
    text = result.summary()
    assert "operation 2 (trace line 4)" in text and '"value":"0x304"' in text and '"value":"0x102"' in text
    assert "after:" in text


def test_a_missing_fault_is_a_divergence() -> None:
    trace = recorded("core/pf/not-present/pte", s0=ok(DATA))
    d = check(trace).divergence
    assert d is not None and d.index == 0
    assert d.allowed[0][0].without_counters() == page_fault_obs(DATA_VA, 4)
    # a fault found by a fresh walk is not labelled as coming from the model's TLB
    assert d.allowed[0][1] == "the model's walk of the paging structures, its TLB holding no translation for the page"
    assert "(the model's walk of the paging structures" in check(trace).summary()


def test_stale_and_fresh_translations_are_both_allowed_before_invlpg() -> None:
    """SDM 4.10.4.3: without INVLPG the old translation may be used, or a walk."""
    assert check(recorded("core/tlb/remap-then-invlpg", s2=ok(DATA))).clean
    assert check(recorded("core/tlb/remap-then-invlpg", s2=ok(OTHER))).clean
    bogus = check(recorded("core/tlb/remap-then-invlpg", s2=ok(0x1234)))
    assert bogus.divergence is not None
    assert {o.value for o, _ in bogus.divergence.allowed} == {DATA, OTHER}


def test_after_invlpg_the_stale_translation_is_refused() -> None:
    d = check(recorded("core/tlb/remap-then-invlpg", s4=ok(DATA))).divergence
    assert d is not None and d.index == 4 and [o.value for o, _ in d.allowed] == [OTHER]


def test_after_mov_cr3_a_non_global_translation_is_refused() -> None:
    assert check(recorded("core/tlb/mov-cr3-flushes", s3=ok(DATA))).divergence is not None
    assert check(recorded("core/tlb/global-survives-mov-cr3", s3=ok(DATA))).clean
    assert check(recorded("core/tlb/global-survives-mov-cr3", s3=ok(OTHER))).clean
    assert check(recorded("core/tlb/global-survives-mov-cr3", s5=ok(DATA))).divergence is not None


def test_pcid_no_flush_keeps_a_translation_and_a_flushing_load_drops_it() -> None:
    assert check(recorded("core/tlb/pcid/mov-cr3-noflush", s4=ok(DATA))).clean
    assert check(recorded("core/tlb/pcid/mov-cr3-noflush", s4=ok(OTHER))).clean
    assert check(recorded("core/tlb/pcid/mov-cr3-noflush", s6=ok(DATA))).divergence is not None


def test_invpcid_types_invalidate_what_they_must() -> None:
    global_old = 0xD47A_0000_0020_10C3
    for kind in (0, 1, 3):  # the global translation may survive
        assert check(recorded(f"core/tlb/invpcid/type-{kind}", s6=ok(global_old))).clean
    assert check(recorded("core/tlb/invpcid/type-2", s6=ok(global_old))).divergence is not None
    for kind in range(4):  # DATA_VA's non-global translation never survives
        assert check(recorded(f"core/tlb/invpcid/type-{kind}", s5=ok(DATA))).divergence is not None


def test_a_spurious_fault_is_allowed_once_and_invalidates_the_page() -> None:
    spurious = page_fault_obs(DATA_VA, 7)
    assert check(recorded("core/tlb/relaxed-rights-without-invlpg", s2=spurious)).clean
    # the spurious #PF invalidated the page (SDM 4.10.4.1): the next write walks and succeeds
    assert check(recorded("core/tlb/relaxed-rights-without-invlpg", s2=spurious, s3=spurious)).divergence is not None


def test_unmapping_without_invlpg_allows_the_old_value_or_the_fault() -> None:
    assert check(recorded("core/tlb/unmap-without-invlpg", s2=page_fault_obs(DATA_VA, 4))).clean
    assert check(recorded("core/tlb/unmap-without-invlpg", s2=ok(DATA))).clean


def test_a_write_through_a_clean_cached_translation_must_walk() -> None:
    """SDM 4.8: a processor never sets D from the TLB; the stale clean translation
    cannot serve the write, so the data lands in the new page."""
    result = check(recorded("core/tlb/write-after-remap-walks", s3=ok(0xD47A_0000_0020_00C3)))
    assert result.divergence is not None and result.divergence.index == 3


def test_the_state_follows_what_was_observed() -> None:
    """After a write that may or may not set D again, the PTE read back may show
    either; after INVLPG the next write must set it."""
    name = "core/ad/cleared-dirty-without-invlpg"
    assert check(recorded(name, s3=ok(0x2000_27))).clean
    assert check(recorded(name, s3=ok(0x2000_67))).clean
    assert check(recorded(name, s3=ok(0x2000_07))).divergence is not None
    assert check(recorded(name, s6=ok(0x2000_27))).divergence is not None


def test_unrecorded_operations_keep_every_possibility() -> None:
    trace = without_observations(fixture("core/tlb/remap-then-invlpg").trace)
    steps = list(trace.steps)
    steps[4] = replace(steps[4], obs=ok(OTHER))
    result = check(replace(trace, steps=tuple(steps)))
    assert result.clean and result.compared == 1 and result.max_states >= 2


def test_counters_are_compared_only_when_recorded() -> None:
    model = fixture("core/tlb/remap-then-invlpg").trace.steps[0].obs
    assert model is not None and dict(model.counters or ())["walk_ref"] == 4
    assert check(recorded("core/tlb/remap-then-invlpg", s0=replace(ok(DATA), counters=(("walk_ref", 4),)))).clean
    d = check(recorded("core/tlb/remap-then-invlpg", s0=replace(ok(DATA), counters=(("walk_ref", 5),)))).divergence
    assert d is not None and '"counters":{"walk_ref":4}' in d.describe()


def test_privileged_operations_at_cpl3_must_fault() -> None:
    d = check(recorded("core/cr/privileged-at-cpl3", s0=ok())).divergence
    assert d is not None and d.allowed[0][0].without_counters() == gp_obs(0)


def test_every_fixture_checks_clean_and_records_its_alternatives() -> None:
    for f in fixtures().values():
        assert check(f.trace).clean, f.name
        result = check(replace(f.trace, steps=tuple(replace(s, obs=s.obs.without_counters() if s.obs else None) for s in f.trace.steps)))
        assert result.clean, f.name
        assert tuple(sorted(result.ambiguous)) == f.ambiguous
        for index, step in enumerate(f.trace.steps):
            assert (len(step.allowed) > 1) == (index in f.ambiguous)
            if step.allowed:
                assert step.obs is not None and step.obs.without_counters() in step.allowed


def test_cli_check_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text(fixture("core/pf/smap/ac0").text())
    assert main(["check", str(good)]) == 0
    assert capsys.readouterr().out.startswith("ok: 4 operations")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(dump_trace(recorded("core/pf/smap/ac0", s2=page_fault_obs(DATA_VA, 0x11))))
    assert main(["check", str(bad)]) == 1
    assert "divergence at operation 2 (trace line 4)" in capsys.readouterr().out
    assert main(["check", "--json", str(bad)]) == 1
    assert '"index": 2' in capsys.readouterr().out


def test_cli_replay_prints_the_model_observations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = without_observations(fixture("core/pf/smap/ac0").trace)
    path = tmp_path / "t.jsonl"
    path.write_text(dump_trace(trace))
    assert main(["replay", "--no-counters", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == '{"index":0,"line":2,"op":"read","obs":{"result":"fault","vector":14,"cr2":"0x123456789000","error_code":1}}'
    assert main(["replay", "--annotate", str(path)]) == 0
    assert capsys.readouterr().out == fixture("core/pf/smap/ac0").text().replace(',"allowed":[]', "")


def test_step_without_note_or_allowed_serializes_minimally() -> None:
    step = Step(fixture("core/pf/smap/ac0").trace.steps[0].op)
    assert step.obs is None and step.allowed == ()
