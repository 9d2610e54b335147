"""refmodel fixtures: the conformance suite is deterministic, covers every
operation and fault kind, and replaying a fixture reproduces its expectations."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest

from refmodel.cli import main
from refmodel.oracle.fixtures import Fixture, generate
from refmodel.oracle.replay import replay
from refmodel.oracle.trace import OP_NAMES, load_trace, op_name


@cache
def fixtures() -> tuple[Fixture, ...]:
    return tuple(generate())


def written(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_regeneration_is_byte_identical(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fixtures", "--out", str(tmp_path / "a")]) == 0
    assert main(["fixtures", "--out", str(tmp_path / "b")]) == 0
    a, b = written(tmp_path / "a"), written(tmp_path / "b")
    assert a == b
    assert len(a) == len(fixtures()) + 1  # + index.json
    index = json.loads(a["index.json"])
    assert index["count"] == len(fixtures()) and [f["name"] for f in index["fixtures"]] == sorted(f.name for f in fixtures())
    assert f"wrote {len(fixtures())} fixtures" in capsys.readouterr().out


def test_replaying_every_written_fixture_reproduces_its_expectations(tmp_path: Path) -> None:
    main(["fixtures", "--out", str(tmp_path)])
    for f in fixtures():
        trace = load_trace(str(tmp_path / f.path))
        assert [s.obs for s in trace.steps] == replay(trace), f.name


def test_fixture_names_are_unique_paths() -> None:
    names = [f.name for f in fixtures()]
    assert len(set(names)) == len(names)
    assert all(n == n.lower() and " " not in n and not n.startswith("/") for n in names)


#: What the suite must cover (deliverable 3 of the oracle issue), by name prefix.
REQUIRED = [
    "core/pf/not-present/pml4e", "core/pf/not-present/pdpte", "core/pf/not-present/pde", "core/pf/not-present/pte",
    "core/pf/rsvd/above-maxphyaddr/", "core/pf/rsvd/xd-without-nxe/", "core/pf/rsvd/ps-in-pml4e",
    "core/pf/rsvd/2m-base-unaligned", "core/pf/rsvd/1g-base-unaligned", "core/pf/rsvd/pdpte-ps-without-page1gb",
    "core/pf/wp/supervisor-write-wp1", "core/pf/wp/supervisor-write-wp0", "core/pf/us/", "core/pf/xd/",
    "core/pf/smep/", "core/pf/smap/ac0", "core/pf/smap/ac1", "core/gp/noncanonical",
    "core/large/2m", "core/large/1g", "core/ad/read-sets-accessed", "core/ad/write-sets-dirty",
    "core/tlb/remap-then-invlpg", "core/tlb/mov-cr3-flushes", "core/tlb/pcid/mov-cr3-noflush",
    "core/tlb/invpcid/type-0", "core/tlb/invpcid/type-1", "core/tlb/invpcid/type-2", "core/tlb/invpcid/type-3",
    "core/tlb/global-survives-mov-cr3",
    "pv/mmu_update/", "pv/mmuext/pin-unpin", "pv/mmuext/tlb-flush-local", "pv/mmuext/invlpg-multi",
    "pv/update_va_mapping/", "pv/multicall/", "pv/switch/tagged", "pv/switch/untagged",
    "shadow/pte-write-then-invlpg", "shadow-oos/pte-write-then-invlpg", "hap/pte-write-then-invlpg",
    "hap/switch/untagged", "shadow/guest-page-faults",
]


@pytest.mark.parametrize("prefix", REQUIRED)
def test_the_suite_covers(prefix: str) -> None:
    assert any(f.name.startswith(prefix) for f in fixtures()), prefix


def test_every_operation_appears_in_some_fixture() -> None:
    used = {op_name(s.op) for f in fixtures() for s in f.trace.steps}
    assert set(OP_NAMES) <= used, set(OP_NAMES) - used


def test_every_mode_has_fixtures() -> None:
    assert {f.trace.header.mode.value for f in fixtures()} == {"native", "pv", "shadow", "shadow-oos", "hap"}


def test_every_fault_kind_is_expected_somewhere() -> None:
    """Each #PF error-code bit combination the core produces, and #GP, is expected."""
    codes = {
        (s.obs.vector, s.obs.error_code)
        for f in fixtures() for s in f.trace.steps if s.obs is not None and s.obs.vector is not None
    }
    for code in (0, 2, 4, 0x14, 1, 3, 5, 7, 0x15, 0x11, 9, 0xB, 0xD, 0xF, 0x19):
        assert (14, code) in codes, hex(code)
    assert (13, 0) in codes


def test_fixtures_describe_themselves() -> None:
    for f in fixtures():
        assert f.trace.header.name == f.name and len(f.trace.header.description) > 20
