"""What trace format version 2 changes in the schema, as a function of version 1's:
the test keeps ``schema-v2.json`` equal to :func:`v2_of` (``schema-v1.json``), so the
two schemas differ in exactly these points and nowhere else."""

import copy
from typing import Any

#: The largest integer an IEEE double holds exactly (and every integer below it).
SAFE = 2**53 - 1


def v2_of(v1: dict[str, Any]) -> dict[str, Any]:
    """Version 2's schema: 64-bit quantities only as hex strings; every JSON number a
    double holds exactly; the #PF/#GP error code a 32-bit number; a ``generator`` in
    the header."""
    s = copy.deepcopy(v1)
    s["$id"] = v1["$id"].replace("schema-v1.json", "schema-v2.json")
    s["title"] = "refmodel trace, version 2 (one JSON Lines line)"
    s["description"] = v1["description"] + (
        " Version 2: every 64-bit quantity is a string 0x..., and every JSON number is an integer a double holds "
        "exactly, so that a reader whose numbers are doubles (JavaScript, jq) reads every bit."
    )
    d = s["$defs"]
    d["u64"] = {
        "title": "u64",
        "description": "an unsigned 64-bit value: a string 0x followed by 1-16 hex digits (never a JSON number)",
        "type": "string", "pattern": "^0x[0-9a-fA-F]{1,16}$",
    }
    d["s64"] = {
        "title": "s64",
        "description": f"a signed integer a double holds exactly: -{SAFE}..{SAFE} (a hypercall's 0 or -errno)",
        "type": "integer", "minimum": -SAFE, "maximum": SAFE,
    }
    obs = d["observation"]["properties"]
    obs["error_code"] = {
        "title": "error_code", "description": "an exception's error code: an integer 0..4294967295 (32 bits)",
        "type": "integer", "minimum": 0, "maximum": 4294967295,
    }
    counters = obs["counters"]
    for rule in [*counters["properties"].values(), counters["additionalProperties"]]:
        rule["maximum"] = SAFE
    header = d["header"]["properties"]
    header["refmodel_trace"] = {"description": "the format version", "const": 2}
    header["generator"] = {
        "description": "the program that wrote the trace: its name, version and source revision",
        "type": "object",
        "required": ["name", "version"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "maxLength": 100},
            "version": {"type": "string", "maxLength": 100},
            "revision": {"description": "the source revision (a git commit, '-dirty' if modified), or 'unknown'",
                         "type": "string", "maxLength": 100},
        },
    }
    return s
