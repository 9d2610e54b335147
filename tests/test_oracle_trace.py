"""The trace format (refmodel.oracle.trace): the schema, parsing, serialization, and
the one-line errors for bad input (docs/oracle.md, "Errors")."""

from __future__ import annotations

import json
import re
from functools import cache

import pytest
from jsonschema import Draft202012Validator

from refmodel.cli import main
from refmodel.oracle.fixtures import Fixture, generate
from refmodel.oracle.trace import (
    COUNTER_NAMES,
    Read,
    TraceError,
    dump_trace,
    parse_trace,
    schema,
)

#: What every error message looks like: "<source>:<line>: [field '<f>': ]<message>".
ERROR_LINE = re.compile(r"^(?:[^\n]*:\d+|line \d+): (?:field '[^'\n]+': )?[^\n]+$")


@cache
def fixtures() -> tuple[Fixture, ...]:
    return tuple(generate())


def fixture_text(name: str) -> str:
    return next(f.text() for f in fixtures() if f.name == name)


def lines_of(name: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in fixture_text(name).splitlines()]


def text_of(lines: list[dict[str, object]]) -> str:
    return "\n".join(json.dumps(line) for line in lines) + "\n"


def error_for(text: str | bytes) -> TraceError:
    with pytest.raises(TraceError) as info:
        parse_trace(text, "t.jsonl")
    message = str(info.value)
    assert ERROR_LINE.match(message), message
    return info.value


# -- schema and round trip --------------------------------------------------------------


def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    Draft202012Validator.check_schema(schema())


def test_every_fixture_line_validates_against_the_published_schema() -> None:
    """The schema file is usable on its own: the generic validator (no Python
    dispatch) accepts every header and operation line of every fixture."""
    validator = Draft202012Validator(schema())
    header = Draft202012Validator({"$defs": schema()["$defs"], "$ref": "#/$defs/header"})
    op = Draft202012Validator({"$defs": schema()["$defs"], "$ref": "#/$defs/op"})
    for fixture in fixtures():
        first, *rest = [json.loads(line) for line in fixture.text().splitlines()]
        assert header.is_valid(first), fixture.name
        for line in rest:
            assert op.is_valid(line) and validator.is_valid(line), (fixture.name, line)


def test_the_published_schema_rejects_what_the_parser_rejects() -> None:
    op = Draft202012Validator({"$defs": schema()["$defs"], "$ref": "#/$defs/op"})
    assert not op.is_valid({"op": "read"})
    assert not op.is_valid({"op": "read", "va": -1})
    assert not op.is_valid({"op": "read", "va": "0x1", "size": 3})
    assert not op.is_valid({"op": "teleport", "va": "0x1"})
    assert not op.is_valid({"op": "write", "va": "0x1", "value": 1 << 64})
    assert not op.is_valid({"op": "multicall", "calls": [{"op": "mmu_update", "reqs": [], "obs": {"result": "ok"}}]})


def test_every_fixture_round_trips_byte_for_byte() -> None:
    for fixture in fixtures():
        text = fixture.text()
        assert dump_trace(parse_trace(text)) == text, fixture.name


def test_version_1_numbers_may_be_integers_or_hex_strings() -> None:
    lines = lines_of("core/access/read-write-fetch")
    lines[0]["refmodel_trace"] = 1
    del lines[0]["generator"]
    lines[1]["va"] = int(str(lines[1]["va"]), 16)
    trace = parse_trace(text_of(lines))
    assert trace.steps[0].op == Read(0x0000_1234_5678_9008, 8, 3)
    assert trace.header.version == 1 and trace.header.generator is None


def test_version_2_numbers_of_64_bits_are_hex_strings_only() -> None:
    lines = lines_of("core/access/read-write-fetch")
    lines[1]["va"] = int(str(lines[1]["va"]), 16)
    assert "field 'va': expected an unsigned 64-bit value: a string 0x followed by 1-16 hex digits" in str(
        error_for(text_of(lines))
    )


def test_blank_lines_are_ignored_but_keep_line_numbers() -> None:
    text = fixture_text("core/access/read-write-fetch").replace("\n", "\n\n", 2)
    trace = parse_trace(text)
    assert [s.line for s in trace.steps[:3]] == [3, 5, 6]


def test_counter_names_cover_events_and_exit_reasons() -> None:
    assert "tlb_miss" in COUNTER_NAMES and "exit.hypercall" in COUNTER_NAMES


# -- one-line errors ----------------------------------------------------------------------------


def test_malformed_json_names_line_and_column() -> None:
    lines = fixture_text("core/access/sizes").splitlines()
    lines[2] = lines[2][:20]
    err = error_for("\n".join(lines))
    assert err.line == 3 and "malformed JSON" in str(err) and "column" in str(err)


@pytest.mark.parametrize(
    ("mutate", "line", "field", "words"),
    [
        (lambda ls: ls[1].pop("va"), 2, "va", "required"),
        (lambda ls: ls[1].update(op="teleport"), 2, "op", "unknown operation"),
        (lambda ls: ls[1].update(va=[1]), 2, "va", "unsigned 64-bit"),
        (lambda ls: ls[1].update(va=-5), 2, "va", "unsigned 64-bit"),
        (lambda ls: ls[1].update(va=1 << 70), 2, "va", "unsigned 64-bit"),
        (lambda ls: ls[1].update(va="0x" + "f" * 17), 2, "va", "unsigned 64-bit"),
        (lambda ls: ls[1].update(size=3), 2, "size", "not allowed"),
        (lambda ls: ls[1].update(colour="blue"), 2, "colour", "not a known field"),
        (lambda ls: ls[1].update(va="0x123456789ffc", size=8), 2, "va", "crosses a 4 KiB page"),
        (lambda ls: ls[1].update(obs={"result": "maybe"}), 2, "obs.result", "not allowed"),
        (lambda ls: ls[1].update(obs={"result": "ok", "counters": {"tlb_mis": 1}}), 2, "obs.counters.tlb_mis", "counter"),
        (lambda ls: ls[1].update(obs={"result": "fault", "error_code": 1 << 33}), 2, "obs.error_code", "32 bits"),
        (lambda ls: ls[0].update(maxphyaddr=60), 1, "maxphyaddr", "maximum"),
        (lambda ls: ls[0].update(refmodel_trace=3), 1, "refmodel_trace", "not supported"),
        (lambda ls: ls[0].pop("refmodel_trace"), 1, "refmodel_trace", "header"),
        (lambda ls: ls[0]["vcpus"][0].update(cr3="0x1" + "0" * 16), 1, "vcpus[0].cr3", "unsigned 64-bit"),
        (lambda ls: ls[0]["vcpus"][0].update(cr4="0x0"), 1, "vcpus[0].cr4", "PAE"),
        (lambda ls: ls[0]["vcpus"][0].update(cr3="0x10000000000"), 1, "vcpus[0].cr3", "MAXPHYADDR"),
        (lambda ls: ls[0]["vcpus"][0].update(cpl=4), 1, "vcpus[0].cpl", "0..3"),
        (lambda ls: ls[0]["memory"].update({"0x10000000": {}}), 1, "memory.0x10000000", "MAXPHYADDR"),
        (lambda ls: ls[0]["memory"].update({"0x5": {"0x7": "0x1"}}), 1, "memory.0x5.0x7", "aligned"),
        (lambda ls: ls[0]["memory"].update({"0x5": "00"}), 1, "memory.0x5", None),
        (lambda ls: ls[0].update(domains=[{"domid": 1, "p2m": {}}]), 1, "domains", "hypervisor modes"),
    ],
)
def test_bad_fields_name_the_line_and_the_field(mutate: object, line: int, field: str, words: str | None) -> None:
    lines = lines_of("core/access/sizes")
    assert callable(mutate)
    mutate(lines)
    err = error_for(text_of(lines))
    assert (err.line, err.field) == (line, field), str(err)
    if words is not None:
        assert words in str(err), str(err)


def test_physical_addresses_beyond_maxphyaddr_are_refused() -> None:
    lines = lines_of("core/access/phys-write")
    lines[2]["pa"] = hex(1 << 40)
    err = error_for(text_of(lines))
    assert err.field == "pa" and "MAXPHYADDR=40" in str(err)


def test_a_value_must_fit_its_size() -> None:
    lines = lines_of("core/access/sizes")
    lines[6]["value"] = "0x100"
    err = error_for(text_of(lines))
    assert err.field == "value" and "does not fit in 1 bytes" in str(err)


def test_hypercalls_need_pv_mode_and_switch_needs_a_hypervisor() -> None:
    lines = lines_of("core/access/sizes")
    lines.append({"op": "mmu_update", "reqs": []})
    assert "Xen PV hypercall" in str(error_for(text_of(lines)))
    lines[-1] = {"op": "switch", "vcpu": 0}
    assert "hypervisor mode" in str(error_for(text_of(lines)))


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "empty trace"),
        (b"\n\n", "empty trace"),
        (b"\xff\xfe{}", "UTF-8"),
        (b"[1, 2]", "JSON object"),
        (b'{"refmodel_trace": 1, "refmodel_trace": 1}', "duplicate key"),
        (b'{"refmodel_trace": NaN}', "malformed JSON"),
        (b"[" * 100_000, "malformed JSON"),
        (b'{"refmodel_trace": ' + b"9" * 5000 + b"}", "malformed JSON"),
        (b'{"refmodel_trace": true}', "not supported"),
    ],
)
def test_garbage_gives_one_line_errors(data: bytes, words: str) -> None:
    assert words in str(error_for(data))


def test_cli_reports_a_bad_trace_in_one_line_with_exit_2(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    path = tmp_path / "bad.jsonl"
    lines = lines_of("core/access/sizes")
    lines[3]["va"] = "0xnope"
    path.write_text(text_of(lines))
    for command in ("check", "replay"):
        assert main([command, str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{path}:4: field 'va'" in err and "Traceback" not in err


def test_cli_reports_a_missing_file_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "/nonexistent/trace.jsonl"]) == 2
    assert "cannot read trace" in capsys.readouterr().err
