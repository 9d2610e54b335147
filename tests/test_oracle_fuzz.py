"""Fuzzing the trace reader: 10,000 malformed traces — mutations of valid ones
(deleted or renamed fields, wrong types, huge and negative numbers, truncated
lines, random bytes, lines dropped or repeated) — produce only the documented
one-line errors (docs/oracle.md, "Errors"), never another exception.

A trace that still parses after mutation is then checked against the model: that
too may only succeed, report a divergence, or refuse with a one-line error.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from functools import cache
from typing import Any

from hypothesis import HealthCheck, given, settings
from jsonschema import Draft202012Validator
from hypothesis import strategies as st

from refmodel.errors import RefmodelError
from refmodel.oracle.check import check
from refmodel.oracle.fixtures import generate
from refmodel.oracle.trace import TraceError, conforms, parse_trace, schema

#: How many malformed traces one run feeds the reader (the count really runs: the
#: test below asserts it).
EXAMPLES = 10_000
#: Small fixtures whose lines together use every field shape the format has.
BASES = (
    "core/access/sizes",
    "core/tlb/pcid/mov-cr3-noflush",
    "core/cr/gp",
    "core/tlb/invpcid/type-0",
    "core/access/phys-write",
    "core/tlb/relaxed-rights-without-invlpg",
    "pv/multicall/update-and-flush",
    "shadow/pte-write-then-invlpg",
)
ERROR_LINE = re.compile(r"^fuzz\.jsonl:(\d+): (?:field '[^'\n]+': )?[^\n]+$")

Json = Any


@cache
def bases() -> tuple[tuple[Json, ...], ...]:
    by_name = {f.name: f for f in generate()}
    return tuple(tuple(json.loads(line) for line in by_name[name].text().splitlines()) for name in BASES)


def _paths(node: Json, path: tuple[Json, ...] = ()) -> list[tuple[Json, ...]]:
    """Every key/index path into a JSON value (not the root)."""
    out: list[tuple[Json, ...]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            out.append(path + (key,))
            out.extend(_paths(value, path + (key,)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out.append(path + (i,))
            out.extend(_paths(value, path + (i,)))
    return out


def _parent(root: Json, path: tuple[Json, ...]) -> Json:
    for key in path[:-1]:
        root = root[key]
    return root


def odd_value(rng: random.Random) -> Json:
    """A value of the wrong type or range for almost any field."""
    choices: list[Callable[[], Json]] = [
        lambda: None, lambda: rng.random() < 0.5, lambda: rng.randint(-(1 << 70), -1),
        lambda: rng.randint(1 << 64, 1 << 200), lambda: rng.randint(0, 1 << 64), lambda: rng.randint(0, 16),
        lambda: "".join(rng.choice("0x1fgz-.é\u0000 ") for _ in range(rng.randint(0, 12))),
        lambda: rng.choice(["0x", "0xg1", "0x" + "f" * 17, "-0x1", "1e5", "0x1000", ""]),
        lambda: [], lambda: {}, lambda: [rng.randint(0, 9)], lambda: {"result": "ok"},
        lambda: rng.choice(["read", "mmu_update", "multicall", "switch", "hap", "native", "ok", "fault"]),
    ]
    return rng.choice(choices)()


def structural(rng: random.Random, lines: list[Json]) -> None:
    """Delete, rename or retype one field somewhere in one line."""
    line = lines[rng.randrange(len(lines))]
    paths = _paths(line)
    if not paths:
        return
    path = rng.choice(paths)
    parent = _parent(line, path)
    key = path[-1]
    kind = rng.choice(["delete", "rename", "retype", "retype"])
    if kind == "delete":
        del parent[key]
    elif kind == "rename" and isinstance(parent, dict):
        parent[rng.choice(["op", "va", "obs", "x", key + "_", key.upper()])] = parent.pop(key)
    else:
        parent[key] = odd_value(rng)


def textual(rng: random.Random, raw: list[bytes]) -> None:
    """Damage the text of one line, or the line structure."""
    i = rng.randrange(len(raw))
    kind = rng.choice(["truncate", "insert", "replace", "drop", "repeat", "swap"])
    if kind == "truncate":
        raw[i] = raw[i][: rng.randrange(max(1, len(raw[i])))]
    elif kind == "insert":
        at = rng.randint(0, len(raw[i]))
        raw[i] = raw[i][:at] + rng.randbytes(rng.randint(1, 8)) + raw[i][at:]
    elif kind == "replace":
        raw[i] = rng.randbytes(rng.randint(0, 40))
    elif kind == "drop":
        del raw[i]
    elif kind == "repeat":
        raw.insert(i, raw[i])
    else:
        j = rng.randrange(len(raw))
        raw[i], raw[j] = raw[j], raw[i]


def malformed_trace(seed: int) -> bytes:
    """One mutation of a valid trace, determined by ``seed``."""
    rng = random.Random(seed)
    lines: list[Json] = json.loads(json.dumps(rng.choice(bases())))
    lines = lines[: rng.randint(1, len(lines))]
    for _ in range(rng.randint(1, 3)):
        structural(rng, lines)
    raw = [json.dumps(line).encode() for line in lines]
    if rng.random() < 0.5 and raw:
        textual(rng, raw)
    return b"\n".join(raw)


RUNS = [0]


@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.integers(0, (1 << 64) - 1))
def _fuzz_one(seed: int) -> None:
    RUNS[0] += 1
    data = malformed_trace(seed)
    try:
        trace = parse_trace(data, "fuzz.jsonl")
    except TraceError as err:
        match = ERROR_LINE.match(str(err))
        assert match, str(err)
        assert 1 <= int(match.group(1)) <= data.count(b"\n") + 1
        return
    try:
        check(trace)
    except RefmodelError as err:
        assert "\n" not in str(err) and ERROR_LINE.match(str(err)), str(err)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.integers(0, (1 << 64) - 1))
def test_the_fast_validator_agrees_with_jsonschema(seed: int) -> None:
    """trace.conforms decides valid lines without jsonschema: on mutated lines its
    verdict is jsonschema's."""
    rng = random.Random(seed)
    lines: list[Json] = json.loads(json.dumps(rng.choice(bases())))
    structural(rng, lines)
    defs = schema()["$defs"]
    for i, line in enumerate(lines):
        definition = "header" if i == 0 else f"op_{line.get('op')}" if isinstance(line, dict) else "op"
        definition = definition if definition in defs else "op"
        assert conforms(line, defs[definition]) == validator(definition).is_valid(line), (definition, line)


@cache
def validator(definition: str) -> Draft202012Validator:
    return Draft202012Validator({**schema()["$defs"][definition], "$defs": schema()["$defs"]})


def test_malformed_traces_give_only_documented_errors() -> None:
    RUNS[0] = 0
    _fuzz_one()
    assert RUNS[0] >= EXAMPLES
