"""Traces under a hypervisor: Xen PV hypercalls with their ABI arguments and error
returns, shadow paging and HAP guests, context switches — replayed, checked, and
refused when malformed."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import cache

import pytest

from refmodel.oracle.check import check
from refmodel.oracle.fixtures import Fixture, generate
from refmodel.oracle.trace import (
    Observation,
    Result,
    Trace,
    TraceError,
    dump_trace,
    ok,
    op_name,
    page_fault_obs,
    parse_trace,
)

DATA_VA = 0x0000_1234_5678_9000


@cache
def fixtures() -> dict[str, Fixture]:
    return {f.name: f for f in generate()}


def recorded(name: str, **obs: Observation) -> Trace:
    """The fixture without counters, some observations replaced (``s3=...``)."""
    trace = fixtures()[name].trace
    steps = [replace(s, obs=s.obs.without_counters() if s.obs else None, allowed=()) for s in trace.steps]
    for key, value in obs.items():
        steps[int(key[1:])] = replace(steps[int(key[1:])], obs=value)
    return parse_trace(dump_trace(replace(trace, steps=tuple(steps))))


def value_at(name: str, index: int) -> int:
    obs = fixtures()[name].trace.steps[index].obs
    assert obs is not None and obs.value is not None
    return obs.value


def hypercall(ret: int, done: int | None = None) -> Observation:
    return Observation(Result.OK, ret=ret, done=done)


# -- PV: hypercall returns ------------------------------------------------------------------


def test_a_wrong_hypercall_return_or_done_count_diverges() -> None:
    name = "pv/mmu_update/stops-at-first-error"
    assert check(recorded(name, s1=hypercall(-16, 1))).clean
    d = check(recorded(name, s1=hypercall(-22, 1))).divergence
    assert d is not None and d.index == 1 and d.allowed[0][0].ret == -16
    assert check(recorded(name, s1=hypercall(-16, 2))).divergence is not None
    assert check(recorded(name, s1=hypercall(-16))).clean  # done not recorded: not compared


def test_multicall_results_are_compared_entry_by_entry() -> None:
    name = "pv/multicall/update-and-flush"
    assert check(recorded(name, s2=Observation(Result.OK, ret=0, results=(0, -16, -22, 0, 0)))).clean
    assert check(recorded(name, s2=Observation(Result.OK, ret=0, results=(0, -16, 0, 0, 0)))).divergence is not None


def test_pv_stale_translation_allowed_until_the_guest_flushes() -> None:
    name = "pv/mmu_update/normal-pt-update"
    old, new = value_at(name, 1), value_at(name, 5)
    assert check(recorded(name, s3=ok(old))).clean
    assert check(recorded(name, s3=ok(new))).clean
    assert check(recorded(name, s5=ok(old))).divergence is not None  # after MMUEXT_INVLPG_LOCAL


def test_xen_flushes_after_an_upper_level_update() -> None:
    name = "pv/mmu_update/upper-level-update-flushes"
    assert check(recorded(name, s3=ok(value_at(name, 1)))).divergence is not None


@pytest.mark.parametrize("flush", ["invlpg", "tlb-flush", "invlpg-all"])
def test_update_va_mapping_flush_flags(flush: str) -> None:
    name = f"pv/update_va_mapping/{flush}"
    assert check(recorded(name, s3=ok(value_at(name, 1)))).divergence is not None
    assert check(recorded("pv/update_va_mapping/none", s3=ok(value_at(name, 1)))).clean


def test_every_mmuext_and_mmu_update_command_is_exercised() -> None:
    cmds: set[int] = set()
    mmu_cmds: set[int] = set()
    for f in fixtures().values():
        for line in f.text().splitlines()[1:]:
            op = json.loads(line)
            calls = op.get("calls", []) + [op]
            for call in calls:
                cmds.update(e["cmd"] for e in call.get("ops", []))
                mmu_cmds.update(int(r["ptr"], 16) & 7 for r in call.get("reqs", []))
    assert set(range(21)) - {14} <= cmds and 14 in cmds  # every MMUEXT_* and an unassigned one
    assert mmu_cmds >= {0, 1, 2, 3, 4, 7}


def test_every_hypercall_and_error_return_appears() -> None:
    names = {op_name(s.op) for f in fixtures().values() for s in f.trace.steps}
    assert {"mmu_update", "mmuext_op", "update_va_mapping", "multicall", "switch"} <= names
    rets = {s.obs.ret for f in fixtures().values() for s in f.trace.steps if s.obs is not None}
    for errno in (1, 3, 13, 14, 16, 22, 38, 95):
        assert -errno in rets, errno


# -- HVM: shadow and HAP -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["shadow", "shadow-oos", "hap"])
def test_hvm_stale_translation_until_invlpg(mode: str) -> None:
    name = f"{mode}/pte-write-then-invlpg"
    old, new = value_at(name, 0), value_at(name, 4)
    assert old != new
    assert check(recorded(name, s2=ok(old))).clean
    assert check(recorded(name, s2=ok(new))).clean
    assert check(recorded(name, s4=ok(old))).divergence is not None


@pytest.mark.parametrize("scenario", ["pte-write-then-invlpg", "mov-cr3-flushes", "guest-page-faults", "accessed-dirty"])
def test_what_the_guest_sees_is_the_same_in_every_hvm_mode(scenario: str) -> None:
    """The equivalence property, on the fixtures: observations without counters agree."""
    seen = {
        mode: [s.obs.without_counters() if s.obs else None for s in fixtures()[f"{mode}/{scenario}"].trace.steps]
        for mode in ("shadow", "shadow-oos", "hap")
    }
    assert seen["shadow"] == seen["shadow-oos"] == seen["hap"]


def test_guest_page_fault_error_codes_under_shadow_and_hap() -> None:
    for mode in ("shadow", "hap"):
        steps = fixtures()[f"{mode}/guest-page-faults"].trace.steps
        assert [s.obs.error_code for s in steps if s.obs and s.obs.vector == 14] == [4, 7, 3]


def test_untagged_switch_costs_show_in_counters() -> None:
    """Counters recorded are compared: claiming a TLB hit after an untagged switch
    back is a divergence, after a tagged one it agrees."""
    hit = replace(ok(value_at("hap/switch/tagged", 4)), counters=(("tlb_hit", 1),))
    assert check(recorded("hap/switch/tagged", s4=hit)).clean
    assert check(recorded("hap/switch/untagged", s4=hit)).divergence is not None


def test_a_guest_fault_where_the_model_has_none_diverges() -> None:
    d = check(recorded("shadow/accessed-dirty", s2=page_fault_obs(DATA_VA, 4))).divergence
    assert d is not None and d.index == 2


# -- malformed hypervisor traces ---------------------------------------------------------------------


def lines(name: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in fixtures()[name].text().splitlines()]


def error(ls: list[dict[str, object]]) -> TraceError:
    with pytest.raises(TraceError) as info:
        parse_trace("\n".join(json.dumps(x) for x in ls), "hv.jsonl")
    return info.value


def test_mode_specific_operations_are_refused() -> None:
    ls = lines("pv/mmuext/pin-unpin")
    ls.append({"op": "pte_write", "table": "0x4", "index": 1, "level": 1, "value": "0x0"})
    assert "not an operation of mode pv" in str(error(ls))
    ls = lines("hap/mov-cr3-flushes")
    ls.append({"op": "mmu_update", "reqs": []})
    assert "not an operation of mode hap" in str(error(ls))
    ls = lines("hap/mov-cr3-flushes")
    ls.append({"op": "read", "va": "0x1000", "size": 4})
    assert error(ls).field == "size"
    ls = lines("shadow/mov-cr3-flushes")
    ls.append({"op": "mov_cr3", "value": "0x1008"})
    assert error(ls).field == "value"


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda h: h["vcpus"][0].update(cr3="0x1000"), "vcpus[0].cr3"),
        (lambda h: h["vcpus"].append(dict(h["vcpus"][0])), "vcpus[1].domid"),
        (lambda h: h["vcpus"][0].update(domid=7), "vcpus[0].domid"),
        (lambda h: h.pop("machine"), "machine"),
        (lambda h: h["domains"][0]["p2m"].update({"0x40": "0x3"}), "domains[0].p2m.0x40"),
        (lambda h: h["domains"][0]["p2m"].update({"0x40": "0x1ff"}), "domains[0].p2m.0x40"),
        (lambda h: h["domains"][0].update(domid=0x7FF2), "domains[0].domid"),
    ],
)
def test_bad_hypervisor_headers(edit: object, field: str) -> None:
    ls = lines("pv/mmuext/pin-unpin")
    assert callable(edit)
    edit(ls[0])
    assert error(ls).field == field
