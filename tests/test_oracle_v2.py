"""Trace format version 2: every fixture reads back exactly through a JSON parser
whose numbers are doubles (as JavaScript's and jq's are); version 1 traces are still
read; the header and ``index.json`` name the generator; ``index.json`` has a schema.
"""

import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from refmodel import __version__
from refmodel.cli import main
from refmodel.oracle.fixtures import INDEX_SCHEMA_NAME, Fixture, generate
from refmodel.oracle.trace import TRACE_VERSION, Trace, dump_trace, generator, parse_trace, schema_of, source_revision
from trace_v2_support import v2_of


@cache
def fixtures() -> tuple[Fixture, ...]:
    return tuple(generate())


def content(trace: Trace) -> tuple[object, ...]:
    """A trace's header and steps without the line numbers they were read from."""
    return (trace.header, tuple((s.op, s.obs, s.note, s.allowed) for s in trace.steps))


def as_doubles(text: str) -> list[Any]:
    """Parse each line the way a JavaScript reader does: every number a double."""
    return [json.loads(line, parse_int=float, parse_float=float) for line in text.splitlines()]


def back_to_json(value: Any) -> Any:
    """What such a reader writes back: a double that is a whole number as an integer."""
    if isinstance(value, float):
        assert value.is_integer()
        return int(value)
    if isinstance(value, list):
        return [back_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: back_to_json(v) for k, v in value.items()}
    return value


def test_every_fixture_round_trips_through_a_reader_of_doubles_without_losing_a_bit() -> None:
    for f in fixtures():
        text = f.text()
        again = "".join(json.dumps(back_to_json(line)) + "\n" for line in as_doubles(text))
        assert content(parse_trace(again)) == content(f.trace), f.name
        assert dump_trace(parse_trace(again)) == text, f.name


def test_a_version_1_number_of_64_bits_is_what_a_reader_of_doubles_gets_wrong() -> None:
    """Why version 2 writes no 64-bit JSON numbers: 2^64-1 read as a double is 2^64."""
    (line,) = as_doubles('{"cr2": 18446744073709551615}')
    assert int(line["cr2"]) == 2**64 != 2**64 - 1


def test_every_json_number_of_every_fixture_is_exact_as_a_double() -> None:
    def numbers(value: Any) -> list[int]:
        if isinstance(value, bool) or isinstance(value, str) or value is None:
            return []
        if isinstance(value, int):
            return [value]
        items = value.values() if isinstance(value, dict) else value
        return [n for v in items for n in numbers(v)]

    found = [n for f in fixtures() for line in f.text().splitlines() for n in numbers(json.loads(line))]
    assert found and all(abs(n) <= 2**53 - 1 for n in found)


def test_the_v2_schema_is_v1_with_the_stated_changes_only() -> None:
    assert schema_of(2) == v2_of(schema_of(1))
    Draft202012Validator.check_schema(schema_of(2))


def test_version_1_traces_are_still_read() -> None:
    for f in fixtures()[:20]:
        lines = [json.loads(line) for line in f.text().splitlines()]
        lines[0]["refmodel_trace"] = 1
        del lines[0]["generator"]
        v1 = parse_trace("".join(json.dumps(line) + "\n" for line in lines))
        assert content(v1) == content(f.trace) and v1.header.version == 1, f.name


def test_every_header_names_the_generator_and_its_revision() -> None:
    header = json.loads(fixtures()[0].text().splitlines()[0])
    assert header["refmodel_trace"] == TRACE_VERSION == 2
    assert header["generator"] == {"name": "refmodel", "version": __version__, "revision": source_revision()}
    revision = source_revision()
    assert revision == "unknown" or len(revision.removesuffix("-dirty")) in (40, 64)


def test_index_json_follows_its_schema_and_names_the_generator(tmp_path: Path) -> None:
    assert main(["fixtures", "--out", str(tmp_path), "--only", "core/pf/smap/"]) == 0
    index = json.loads((tmp_path / "index.json").read_text())
    text = resources.files("refmodel.oracle").joinpath(INDEX_SCHEMA_NAME).read_text(encoding="utf-8")
    index_schema = json.loads(text)
    Draft202012Validator.check_schema(index_schema)
    errors = list(Draft202012Validator(index_schema).iter_errors(index))
    assert errors == []
    assert index["generator"] == generator() and index["trace_version"] == 2
    assert all((tmp_path / entry["path"]).is_file() for entry in index["fixtures"])
    broken = dict(index, count="3")
    assert not Draft202012Validator(index_schema).is_valid(broken)


def test_no_schema_repeats_a_key() -> None:
    """A strict JSON reader refuses an object with a repeated key."""
    def strict(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        assert not repeated, f"repeated keys {repeated}"
        return dict(pairs)

    for name in ("schema-v1.json", "schema-v2.json", INDEX_SCHEMA_NAME):
        json.loads(resources.files("refmodel.oracle").joinpath(name).read_text(), object_pairs_hook=strict)
