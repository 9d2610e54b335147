"""The refmodel trace format, version 2 (version 1 still read): parse, validate,
serialize.

A trace is JSON Lines (docs/oracle.md has the full description):

- line 1, the **header**: ``{"refmodel_trace": 2, "generator": {...}, "mode": ..., "maxphyaddr": ...,
  "memory": {...}, "vcpus": [...], ...}`` — the initial state;
- every further line one **operation**: ``{"op": "read", "va": "0x...", ...}``,
  optionally carrying ``"obs"``, the observation an implementation recorded for it.

The shape of every line is given by the JSON Schema ``schema-v2.json`` (version 1:
``schema-v1.json``) next to this module, which other implementations can use
without Python. What a schema cannot say is checked here, after it: an address
below ``2**MAXPHYADDR``, a value that fits its size, a 4 KiB page not crossed,
registers that form a state the machine can be in, a counter name the model knows.

Every problem with a trace is a :class:`TraceError`: one line, naming the trace line
and the field ("trace.jsonl:3: field 'obs.cr2': ..."). Nothing else escapes
:func:`parse_trace` for any input, however malformed (a Hypothesis test fuzzes it).

Numbers: in version 2, 64-bit quantities (addresses, values, registers, flags) are
``"0x..."`` strings and every JSON number is an integer an IEEE double holds exactly
(sizes, CPLs, vectors, indices, counts, error codes, ``-errno``), so a trace survives
readers whose numbers are doubles (JavaScript, jq). Version 1 also allowed 64-bit
quantities as JSON integers; it is still read. The header's ``generator`` names the
program, version and source revision that wrote the trace.
"""

from __future__ import annotations

import enum
import json
import re
import subprocess
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Union

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match, relevance

from .. import __version__
from ..account.events import Event, ExitReason
from ..arch.fault import GeneralProtection
from ..arch.types import PAGE_SHIFT, PAGE_SIZE
from ..arch.vcpu import ArchState, write_cr0, write_cr3, write_cr4, write_efer
from ..errors import RefmodelError
from ..guest.ops import Mode
from ..inputs import display_name, read_input

#: The format version this module writes.
TRACE_VERSION = 2
#: The versions it reads (version 1: 64-bit quantities may be JSON numbers).
READ_VERSIONS = (1, 2)
#: Name of the JSON Schema resource of the version written, shipped with the package.
SCHEMA_NAME = f"schema-v{TRACE_VERSION}.json"
#: The version whose schema validates the lines being parsed (set per trace).
_VERSION: ContextVar[int] = ContextVar("refmodel_trace_version", default=TRACE_VERSION)

Json = Any  # a value json.loads returns

# ---------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------


class TraceError(RefmodelError):
    """A malformed trace: one line that names where (trace line, field) and what."""

    def __init__(self, line: int, field_name: str | None, message: str, source: str = "") -> None:
        self.line = line
        self.field = field_name
        self.detail = message
        self.source = source
        where = f"{source}:{line}" if source else f"line {line}"
        what = f"field '{field_name}': " if field_name else ""
        super().__init__(f"{where}: {what}{message}")

    def with_source(self, source: str) -> TraceError:
        return TraceError(self.line, self.field, self.detail, source)


def _short(value: object, limit: int = 60) -> str:
    """A one-line, bounded rendering of an offending value for an error message."""
    text = json.dumps(value) if _jsonable(value) else repr(value)
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _jsonable(value: object) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


# ---------------------------------------------------------------------------------
# Observations
# ---------------------------------------------------------------------------------


class Result(enum.Enum):
    """Whether an operation completed or raised an exception."""

    OK = "ok"
    FAULT = "fault"


#: Counter names an observation may record: every :class:`Event`, and
#: ``exit.<reason>`` for every :class:`ExitReason`.
COUNTER_NAMES: frozenset[str] = frozenset(
    [e.value for e in Event] + [f"exit.{r.value}" for r in ExitReason]
)


@dataclass(frozen=True)
class Observation:
    """What an implementation saw for one operation. ``None`` fields were not
    recorded and are not compared; ``result`` always is.

    - ``value``: the value a read loaded (fetch: the byte at the target);
    - ``vector``, ``cr2``, ``error_code``: the exception (#PF 14, #GP 13);
    - ``ret``, ``done``: a hypercall's return value and success count (Xen's
      ``pdone``/``success_count``); ``results``: each multicall entry's return;
    - ``counters``: events the operation caused (see :data:`COUNTER_NAMES`).
    """

    result: Result
    value: int | None = None
    vector: int | None = None
    cr2: int | None = None
    error_code: int | None = None
    ret: int | None = None
    done: int | None = None
    results: tuple[int, ...] | None = None
    counters: tuple[tuple[str, int], ...] | None = None

    #: serialization order
    FIELDS: ClassVar[tuple[str, ...]] = (
        "result", "value", "vector", "cr2", "error_code", "ret", "done", "results", "counters",
    )

    def recorded(self) -> tuple[str, ...]:
        """Names of the fields this observation carries."""
        return tuple(f for f in self.FIELDS if getattr(self, f) is not None)

    def without_counters(self) -> Observation:
        return replace(self, counters=None)

    def to_json(self) -> dict[str, Json]:
        out: dict[str, Json] = {"result": self.result.value}
        if self.value is not None:
            out["value"] = hex(self.value)
        if self.vector is not None:
            out["vector"] = self.vector
        if self.cr2 is not None:
            out["cr2"] = hex(self.cr2)
        if self.error_code is not None:
            out["error_code"] = self.error_code
        if self.ret is not None:
            out["ret"] = self.ret
        if self.done is not None:
            out["done"] = self.done
        if self.results is not None:
            out["results"] = list(self.results)
        if self.counters:
            out["counters"] = dict(self.counters)
        return out


def ok(value: int | None = None) -> Observation:
    return Observation(Result.OK, value=value)


def page_fault_obs(cr2: int, error_code: int) -> Observation:
    return Observation(Result.FAULT, vector=14, cr2=cr2, error_code=error_code)


def gp_obs(error_code: int = 0) -> Observation:
    return Observation(Result.FAULT, vector=13, error_code=error_code)


# ---------------------------------------------------------------------------------
# Operations
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Read:
    """A data load of ``size`` bytes at linear address ``va``. ``cpl``, if given,
    is the privilege level the vCPU runs at from this access on."""

    va: int
    size: int = 8
    cpl: int | None = None
    implicit: bool = False  #: an implicit supervisor-mode access (SDM 4.6)
    NAME: ClassVar[str] = "read"


@dataclass(frozen=True)
class Write:
    """A data store of ``value`` (``size`` bytes, little-endian) at ``va``."""

    va: int
    value: int
    size: int = 8
    cpl: int | None = None
    implicit: bool = False
    NAME: ClassVar[str] = "write"


@dataclass(frozen=True)
class Fetch:
    """An instruction fetch at ``va`` (the model reads the byte there)."""

    va: int
    cpl: int | None = None
    NAME: ClassVar[str] = "fetch"


@dataclass(frozen=True)
class PhysWrite:
    """A store to physical (machine) memory that bypasses this CPU's MMU and TLB —
    another agent's write. Invalidates nothing (SDM 4.10.4.3)."""

    pa: int
    value: int
    size: int = 8
    NAME: ClassVar[str] = "phys_write"


@dataclass(frozen=True)
class PteWrite:
    """Software sets entry ``index`` of the page table in frame ``table``.

    Natively: an 8-byte store to ``table << 12 | index * 8``, no invalidation. Under
    a hypervisor: the guest's store to its own table (``table`` is a guest frame;
    shadow paging traps and emulates it); ``level`` says which level the table is."""

    table: int
    index: int
    value: int
    level: int | None = None
    NAME: ClassVar[str] = "pte_write"


class Register(enum.Enum):
    """Registers an operation writes, named by the trace's ``op``."""

    CR0 = "mov_cr0"
    CR3 = "mov_cr3"
    CR4 = "mov_cr4"
    EFER = "wrmsr_efer"  #: WRMSR to IA32_EFER (MSR C000_0080H)
    RFLAGS = "set_rflags"  #: POPF/STAC/CLAC at CPL 0: sets RFLAGS (AC matters to SMAP)


@dataclass(frozen=True)
class RegWrite:
    """MOV to CR0/CR3/CR4, WRMSR EFER, or an RFLAGS update."""

    reg: Register
    value: int

    @property
    def name(self) -> str:
        return self.reg.value


@dataclass(frozen=True)
class Invlpg:
    va: int
    NAME: ClassVar[str] = "invlpg"


@dataclass(frozen=True)
class Invpcid:
    """INVPCID with descriptor (``pcid``, ``va``) and ``type`` (0-3; others #GP)."""

    type: int
    pcid: int
    va: int = 0
    NAME: ClassVar[str] = "invpcid"


@dataclass(frozen=True)
class MmuUpdateReq:
    """``struct mmu_update``: ``ptr`` = entry machine address | command in bits 2:0."""

    ptr: int
    val: int


@dataclass(frozen=True)
class MmuUpdate:
    """HYPERVISOR_mmu_update(reqs, count, &done, foreigndom)."""

    reqs: tuple[MmuUpdateReq, ...]
    foreigndom: int = 0x7FF0  #: DOMID_SELF
    NAME: ClassVar[str] = "mmu_update"


@dataclass(frozen=True)
class MmuextEntry:
    """``struct mmuext_op``: ``cmd``, ``arg1`` (mfn / linear address), ``arg2``."""

    cmd: int
    arg1: int = 0
    arg2: int = 0


@dataclass(frozen=True)
class MmuextOp:
    """HYPERVISOR_mmuext_op(ops, count, &done, foreigndom)."""

    ops: tuple[MmuextEntry, ...]
    foreigndom: int = 0x7FF0
    NAME: ClassVar[str] = "mmuext_op"


@dataclass(frozen=True)
class UpdateVaMapping:
    """HYPERVISOR_update_va_mapping(va, val, flags)."""

    va: int
    val: int
    flags: int = 0
    NAME: ClassVar[str] = "update_va_mapping"


@dataclass(frozen=True)
class Multicall:
    """HYPERVISOR_multicall: each entry's return lands in ``results``."""

    calls: tuple[Hypercall, ...]
    NAME: ClassVar[str] = "multicall"


@dataclass(frozen=True)
class Switch:
    """Context switch: the physical CPU now runs vCPU ``vcpu`` (index in the header)."""

    vcpu: int
    NAME: ClassVar[str] = "switch"


Hypercall = Union[MmuUpdate, MmuextOp, UpdateVaMapping, Multicall]
Op = Union[
    Read, Write, Fetch, PhysWrite, PteWrite, RegWrite, Invlpg, Invpcid,
    MmuUpdate, MmuextOp, UpdateVaMapping, Multicall, Switch,
]

#: Operations on the bare processor, available in every mode.
CORE_OPS = ("read", "write", "fetch", "phys_write", "pte_write", "mov_cr0", "mov_cr3",
            "mov_cr4", "wrmsr_efer", "set_rflags", "invlpg", "invpcid")
HYPERCALL_OPS = ("mmu_update", "mmuext_op", "update_va_mapping", "multicall")
OP_NAMES = CORE_OPS + HYPERCALL_OPS + ("switch",)


def op_name(op: Op) -> str:
    return op.name if isinstance(op, RegWrite) else op.NAME


@dataclass(frozen=True)
class Step:
    """One operation line: the operation, its recorded observation, free-text note
    and the trace line it came from (1-based; 0 when built in memory)."""

    op: Op
    obs: Observation | None = None
    note: str = ""
    line: int = 0
    #: Fixtures: every observation the architecture allows here, when there is more
    #: than one (informational: ``refmodel check`` computes them itself).
    allowed: tuple[Observation, ...] = ()


# ---------------------------------------------------------------------------------
# The initial state
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class VcpuInit:
    """A vCPU's initial registers (hypervisor modes: as its guest sees them)."""

    cr0: int
    cr3: int
    cr4: int
    efer: int
    rflags: int
    cpl: int
    domid: int | None = None

    def arch_state(self) -> ArchState:
        return ArchState(
            cr0=self.cr0, cr3=self.cr3, cr4=self.cr4, efer=self.efer, rflags=self.rflags, cpl=self.cpl
        )

    @staticmethod
    def of(state: ArchState, domid: int | None = None) -> VcpuInit:
        return VcpuInit(state.cr0, state.cr3, state.cr4, state.efer, state.rflags, state.cpl, domid)


@dataclass(frozen=True)
class DomainInit:
    """A domain: its id, P2M (gfn -> mfn, sorted) and privilege. ``pv_base`` (PV
    only): the L4 frame the domain starts on, validated, pinned and loaded, as Xen's
    domain builder leaves dom0 (:func:`refmodel.hv.pv.dom0.adopt_built_base`)."""

    domid: int
    p2m: tuple[tuple[int, int], ...]
    privileged: bool = False
    pv_base: int | None = None


@dataclass(frozen=True)
class MachineInit:
    """Hypervisor modes: how many machine frames, how many of them Xen's own; the
    TLB tagging and the PV batch size of the backend."""

    nr_frames: int
    hypervisor_frames: int
    tagged: bool = True
    batch_size: int = 32


@dataclass(frozen=True)
class Header:
    """The first line: format version, name, mode and initial state."""

    mode: Mode
    maxphyaddr: int
    memory: tuple[tuple[int, bytes], ...]  #: (frame, 4096 bytes), ascending, non-zero frames
    vcpus: tuple[VcpuInit, ...]
    name: str = ""
    description: str = ""
    page1gb: bool = True
    tlb: tuple[int, int] | None = None  #: (capacity, ways) of the model's TLB
    machine: MachineInit | None = None
    domains: tuple[DomainInit, ...] = ()
    #: the format version the trace was read in (written traces are always
    #: :data:`TRACE_VERSION`); not part of the state
    version: int = field(default=TRACE_VERSION, compare=False)
    #: who wrote the trace that was read, as (key, value) pairs; the writer puts its
    #: own (:func:`generator`); not part of the state
    generator: tuple[tuple[str, str], ...] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Trace:
    header: Header
    steps: tuple[Step, ...] = field(default_factory=tuple)
    source: str = ""  #: the file it was read from, for error messages

    @property
    def ops(self) -> tuple[Op, ...]:
        return tuple(s.op for s in self.steps)


# ---------------------------------------------------------------------------------
# Schema validation
# ---------------------------------------------------------------------------------


@cache
def schema_of(version: int) -> dict[str, Json]:
    """The JSON Schema of one line of a version ``version`` trace (``schema-v<N>.json``)."""
    text = resources.files("refmodel.oracle").joinpath(f"schema-v{version}.json").read_text(encoding="utf-8")
    loaded: dict[str, Json] = json.loads(text)
    return loaded


def schema() -> dict[str, Json]:
    """The JSON Schema of the trace being parsed (outside a parse: the version written)."""
    return schema_of(_VERSION.get())


@contextmanager
def _version(version: int) -> Iterator[None]:
    """Validate against ``version``'s schema inside the ``with`` block."""
    token = _VERSION.set(version)
    try:
        yield
    finally:
        _VERSION.reset(token)


def _path(parts: Iterable[object]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _schema_message(err: ValidationError, prefix: tuple[Json, ...] = ()) -> tuple[str, str]:
    """(field path, message) for a schema violation, worded for a person."""
    where = list(prefix) + list(err.absolute_path)
    instance = err.instance
    rule: dict[str, Json] = err.schema if isinstance(err.schema, dict) else {}
    if err.validator == "required" and isinstance(instance, dict):
        required = err.validator_value if isinstance(err.validator_value, list) else []
        missing = [n for n in required if n not in instance]
        return _path(where + missing[:1]), "is required but missing"
    if err.validator == "additionalProperties" and isinstance(instance, dict):
        allowed = rule.get("properties", {})
        extra = sorted(str(k) for k in instance if k not in allowed)
        name = extra[0] if extra else "?"
        return _path(where + [name]), "is not a known field" + (
            f" (fields: {', '.join(sorted(allowed))})" if allowed else ""
        )
    if err.validator == "anyOf":
        if "title" in rule:
            return _path(where), f"expected {rule['description']}, got {_short(instance)}"
        if err.context:
            return _schema_message(best_match(err.context), prefix)
    description = rule.get("description") if "title" in rule else None
    if err.validator in ("enum", "const"):
        return _path(where), f"{_short(instance)} is not allowed; expected {_short(err.validator_value, 200)}"
    if description and err.validator in ("type", "pattern", "minimum", "maximum"):
        return _path(where), f"expected {description}, got {_short(instance)}"
    return _path(where), _one_line(err.message)


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."


def _validate(obj: Json, definition: str, line: int) -> None:
    """Validate one line against a ``$defs`` entry. The common case — a valid line —
    is decided by :func:`conforms`, a small interpreter of the schema keywords this
    schema uses; jsonschema proper runs only on a line that does not conform, to
    word the error."""
    rule = schema()["$defs"][definition]
    if conforms(obj, rule):
        return
    where, value, failing = _locate(obj, rule, ())
    errors = list(_rule_validator(failing).iter_errors(value))
    if not errors:
        raise TraceError(line, _path(where) or None, "does not match the trace schema")
    path, message = _schema_message(max(errors, key=relevance), where)
    raise TraceError(line, path or None, message)


_LOCAL_KEYWORDS = ("properties", "additionalProperties", "items", "allOf", "$ref", "if", "then")


def _locate(value: Json, rule: Json, where: tuple[Json, ...]) -> tuple[tuple[Json, ...], Json, Json]:
    """The innermost (path, value, rule) that does not conform, so that jsonschema
    words the error on a small piece instead of a whole header."""
    if isinstance(rule, bool):
        return where, value, rule
    if "$ref" in rule:
        target = schema()["$defs"][rule["$ref"].rsplit("/", 1)[1]]
        if not conforms(value, target):
            return _locate(value, target, where)
    if isinstance(value, dict):
        names = rule.get("propertyNames")
        if names is not None and not all(conforms(k, names) for k in value):
            return where, value, {"propertyNames": names}
        props = rule.get("properties", {})
        for key, sub in props.items():
            if key in value and not conforms(value[key], sub):
                return _locate(value[key], sub, where + (key,))
        extra = rule.get("additionalProperties")
        if isinstance(extra, dict):
            for key, item in value.items():
                if key not in props and not conforms(item, extra):
                    return _locate(item, extra, where + (key,))
    if isinstance(value, list) and "items" in rule:
        for i, item in enumerate(value):
            if not conforms(item, rule["items"]):
                return _locate(item, rule["items"], where + (i,))
    if "anyOf" in rule and "title" not in rule:
        fitting = [alt for alt in rule["anyOf"] if _type_fits(value, alt)]
        if len(fitting) == 1:
            return _locate(value, fitting[0], where)
    for sub in rule.get("allOf", ()):
        if not conforms(value, sub):
            return _locate(value, sub, where)
    if "if" in rule and conforms(value, rule["if"]) and not conforms(value, rule.get("then", True)):
        return _locate(value, rule.get("then", True), where)
    local = {k: v for k, v in rule.items() if k not in _LOCAL_KEYWORDS or (k == "additionalProperties" and v is False)}
    if "additionalProperties" in local and "properties" in rule:
        local["properties"] = {k: True for k in rule["properties"]}
    return where, value, local


def _type_fits(value: Json, rule: Json) -> bool:
    """Whether an anyOf alternative is meant for values of this JSON type."""
    if isinstance(rule, dict) and "$ref" in rule:
        rule = schema()["$defs"][rule["$ref"].rsplit("/", 1)[1]]
    kind = rule.get("type") if isinstance(rule, dict) else None
    return isinstance(kind, str) and _TYPES[kind](value)


_RULE_VALIDATORS: dict[str, Draft202012Validator] = {}


def _rule_validator(rule: Json) -> Draft202012Validator:
    """A jsonschema validator for one rule of the schema (cached)."""
    key = f"{_VERSION.get()}:{json.dumps(rule, sort_keys=True)}"
    validator = _RULE_VALIDATORS.get(key)
    if validator is None:
        body = rule if isinstance(rule, dict) else {"not": {}} if rule is False else {}
        validator = Draft202012Validator({**body, "$defs": schema()["$defs"]})
        _RULE_VALIDATORS[key] = validator
    return validator


def _is_integer(value: Json) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_TYPES: dict[str, Callable[[Json], bool]] = {
    "integer": _is_integer,
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}


def _same(a: Json, b: Json) -> bool:
    """JSON equality (a boolean is not a number)."""
    return type(a) is type(b) and a == b if isinstance(a, bool) or isinstance(b, bool) else a == b


@cache
def _pattern(regex: str) -> re.Pattern[str]:
    return re.compile(regex)


def conforms(value: Json, rule: Json) -> bool:
    """Whether ``value`` satisfies ``rule``, for the JSON Schema keywords
    the schemas use ($ref, type, enum, const, minimum, maximum, pattern,
    maxLength, properties, required, additionalProperties, propertyNames, items,
    minItems, maxItems, anyOf, allOf, if/then). Agrees with jsonschema on them
    (tested); unknown keywords are annotations."""
    if isinstance(rule, bool):
        return rule
    for keyword, arg in rule.items():
        check = _KEYWORDS.get(keyword)
        if check is not None and not check(value, arg, rule):
            return False
    return True


def _ref(value: Json, ref: str, rule: Json) -> bool:
    return conforms(value, schema()["$defs"][ref.rsplit("/", 1)[1]])


def _properties(value: Json, props: dict[str, Json], rule: Json) -> bool:
    return not isinstance(value, dict) or all(conforms(value[k], r) for k, r in props.items() if k in value)


def _additional(value: Json, extra: Json, rule: Json) -> bool:
    if not isinstance(value, dict):
        return True
    known = rule.get("properties", {})
    return all(conforms(v, extra) for k, v in value.items() if k not in known)


def _if_then(value: Json, cond: Json, rule: Json) -> bool:
    return not conforms(value, cond) or conforms(value, rule.get("then", True))


def _number(value: Json) -> bool:
    return _is_integer(value) or isinstance(value, float)


_KEYWORDS: dict[str, Callable[[Json, Json, Json], bool]] = {
    "$ref": _ref,
    "type": lambda v, t, r: _TYPES[t](v),
    "enum": lambda v, e, r: any(_same(v, x) for x in e),
    "const": lambda v, c, r: _same(v, c),
    "minimum": lambda v, m, r: not _number(v) or v >= m,
    "maximum": lambda v, m, r: not _number(v) or v <= m,
    "pattern": lambda v, p, r: not isinstance(v, str) or _pattern(p).search(v) is not None,
    "maxLength": lambda v, n, r: not isinstance(v, str) or len(v) <= n,
    "properties": _properties,
    "required": lambda v, names, r: not isinstance(v, dict) or all(n in v for n in names),
    "additionalProperties": _additional,
    "propertyNames": lambda v, p, r: not isinstance(v, dict) or all(conforms(k, p) for k in v),
    "items": lambda v, i, r: not isinstance(v, list) or all(conforms(x, i) for x in v),
    "minItems": lambda v, n, r: not isinstance(v, list) or len(v) >= n,
    "maxItems": lambda v, n, r: not isinstance(v, list) or len(v) <= n,
    "anyOf": lambda v, rules, r: any(conforms(v, x) for x in rules),
    "allOf": lambda v, rules, r: all(conforms(v, x) for x in rules),
    "if": _if_then,
}


# ---------------------------------------------------------------------------------
# JSON -> values
# ---------------------------------------------------------------------------------


def u64(value: Json) -> int:
    """A schema-checked u64: an int, or a ``0x`` hex string."""
    return int(value, 16) if isinstance(value, str) else int(value)


def _opt_u64(obj: Mapping[str, Json], key: str, default: int) -> int:
    return u64(obj[key]) if key in obj else default


def _frame_bytes(value: Json) -> bytes:
    if isinstance(value, str):
        return bytes.fromhex(value)
    data = bytearray(PAGE_SIZE)
    for key, qword in value.items():
        offset = int(key, 16)
        data[offset : offset + 8] = u64(qword).to_bytes(8, "little")
    return bytes(data)


class _Checker:
    """Semantic checks that need the header (MAXPHYADDR, mode): raise TraceError."""

    def __init__(self, header: Header, line: int) -> None:
        self.header = header
        self.line = line

    def fail(self, where: str, message: str) -> TraceError:
        return TraceError(self.line, where, message)

    def physical(self, where: str, pa: int, size: int) -> None:
        limit = 1 << self.header.maxphyaddr
        if pa + size > limit:
            raise self.fail(where, f"physical address {pa:#x} is beyond MAXPHYADDR={self.header.maxphyaddr}")
        if pa % PAGE_SIZE + size > PAGE_SIZE:
            raise self.fail(where, f"a {size}-byte access at {pa:#x} crosses a 4 KiB frame")

    def linear(self, where: str, va: int, size: int) -> None:
        if va % PAGE_SIZE + size > PAGE_SIZE:
            raise self.fail(where, f"a {size}-byte access at {va:#x} crosses a 4 KiB page")

    def fits(self, where: str, value: int, size: int) -> None:
        if value >> (8 * size):
            raise self.fail(where, f"value {value:#x} does not fit in {size} bytes")

    def frame(self, where: str, frame: int) -> None:
        if frame >> (self.header.maxphyaddr - PAGE_SHIFT):
            raise self.fail(where, f"frame {frame:#x} is beyond MAXPHYADDR={self.header.maxphyaddr}")


def _observation(obj: Mapping[str, Json], chk: _Checker) -> Observation:
    counters = obj.get("counters")
    if counters is not None:
        for name in counters:
            if name not in COUNTER_NAMES:
                raise chk.fail(f"obs.counters.{name}", "is not a counter the model knows (see docs/oracle.md)")
    result = Result(obj["result"])
    if "error_code" in obj and u64(obj["error_code"]) >> 32:
        raise chk.fail("obs.error_code", "an error code has at most 32 bits")
    return Observation(
        result=result,
        value=u64(obj["value"]) if "value" in obj else None,
        vector=obj.get("vector"),
        cr2=u64(obj["cr2"]) if "cr2" in obj else None,
        error_code=u64(obj["error_code"]) if "error_code" in obj else None,
        ret=obj.get("ret"),
        done=obj.get("done"),
        results=tuple(obj["results"]) if "results" in obj else None,
        counters=tuple(sorted((str(k), int(v)) for k, v in counters.items())) if counters is not None else None,
    )


def _access_cpl(obj: Mapping[str, Json]) -> int | None:
    cpl = obj.get("cpl")
    return None if cpl is None else int(cpl)


def _op_read(obj: Mapping[str, Json], chk: _Checker) -> Op:
    op = Read(u64(obj["va"]), int(obj.get("size", 8)), _access_cpl(obj), bool(obj.get("implicit", False)))
    chk.linear("va", op.va, op.size)
    return op


def _op_write(obj: Mapping[str, Json], chk: _Checker) -> Op:
    op = Write(u64(obj["va"]), u64(obj["value"]), int(obj.get("size", 8)), _access_cpl(obj),
               bool(obj.get("implicit", False)))
    chk.linear("va", op.va, op.size)
    chk.fits("value", op.value, op.size)
    return op


def _op_fetch(obj: Mapping[str, Json], chk: _Checker) -> Op:
    return Fetch(u64(obj["va"]), _access_cpl(obj))


def _op_phys_write(obj: Mapping[str, Json], chk: _Checker) -> Op:
    op = PhysWrite(u64(obj["pa"]), u64(obj["value"]), int(obj.get("size", 8)))
    chk.physical("pa", op.pa, op.size)
    chk.fits("value", op.value, op.size)
    return op


def _op_pte_write(obj: Mapping[str, Json], chk: _Checker) -> Op:
    level = obj.get("level")
    op = PteWrite(u64(obj["table"]), int(obj["index"]), u64(obj["value"]), None if level is None else int(level))
    if chk.header.mode is Mode.NATIVE:
        chk.frame("table", op.table)
    elif op.level is None:
        raise chk.fail("level", f"is required in mode {chk.header.mode.value}")
    return op


def _reg_parser(reg: Register) -> Callable[[Mapping[str, Json], _Checker], Op]:
    def parse(obj: Mapping[str, Json], chk: _Checker) -> Op:
        return RegWrite(reg, u64(obj["value"]))

    return parse


def _op_invlpg(obj: Mapping[str, Json], chk: _Checker) -> Op:
    return Invlpg(u64(obj["va"]))


def _op_invpcid(obj: Mapping[str, Json], chk: _Checker) -> Op:
    return Invpcid(u64(obj["type"]), u64(obj["pcid"]), _opt_u64(obj, "va", 0))


def _op_mmu_update(obj: Mapping[str, Json], chk: _Checker) -> Op:
    reqs = tuple(MmuUpdateReq(u64(r["ptr"]), u64(r["val"])) for r in obj["reqs"])
    return MmuUpdate(reqs, int(obj.get("foreigndom", 0x7FF0)))


def _op_mmuext_op(obj: Mapping[str, Json], chk: _Checker) -> Op:
    ops = tuple(MmuextEntry(int(e["cmd"]), _opt_u64(e, "arg1", 0), _opt_u64(e, "arg2", 0)) for e in obj["ops"])
    return MmuextOp(ops, int(obj.get("foreigndom", 0x7FF0)))


def _op_update_va_mapping(obj: Mapping[str, Json], chk: _Checker) -> Op:
    return UpdateVaMapping(u64(obj["va"]), u64(obj["val"]), _opt_u64(obj, "flags", 0))


def _op_multicall(obj: Mapping[str, Json], chk: _Checker) -> Op:
    calls: list[Hypercall] = []
    for entry in obj["calls"]:
        call = _PARSERS[entry["op"]](entry, chk)
        assert isinstance(call, (MmuUpdate, MmuextOp, UpdateVaMapping, Multicall))
        calls.append(call)
    return Multicall(tuple(calls))


def _op_switch(obj: Mapping[str, Json], chk: _Checker) -> Op:
    op = Switch(int(obj["vcpu"]))
    if op.vcpu >= len(chk.header.vcpus):
        raise chk.fail("vcpu", f"there is no vCPU {op.vcpu}; the header has {len(chk.header.vcpus)}")
    return op


_PARSERS: dict[str, Callable[[Mapping[str, Json], _Checker], Op]] = {
    "read": _op_read,
    "write": _op_write,
    "fetch": _op_fetch,
    "phys_write": _op_phys_write,
    "pte_write": _op_pte_write,
    **{reg.value: _reg_parser(reg) for reg in Register},
    "invlpg": _op_invlpg,
    "invpcid": _op_invpcid,
    "mmu_update": _op_mmu_update,
    "mmuext_op": _op_mmuext_op,
    "update_va_mapping": _op_update_va_mapping,
    "multicall": _op_multicall,
    "switch": _op_switch,
}
assert set(_PARSERS) == set(OP_NAMES)


#: The operations each hypervisor mode offers a guest. A PV guest changes its page
#: tables, CR3 and TLB only through hypercalls; an HVM guest (shadow, HAP) stores to
#: its page tables, loads CR3 and runs INVLPG itself.
PV_OPS = ("read", "write", "fetch") + HYPERCALL_OPS + ("switch",)
HVM_OPS = ("read", "write", "fetch", "pte_write", "mov_cr3", "invlpg", "switch")


def _check_mode_allows(name: str, obj: Mapping[str, Json], header: Header, line: int) -> None:
    """Which operations a mode has, and the shapes its backends take."""
    mode = header.mode
    if mode is Mode.NATIVE:
        if name in HYPERCALL_OPS:
            raise TraceError(line, "op", f"'{name}' is a Xen PV hypercall; this trace's mode is native")
        if name == "switch":
            raise TraceError(line, "op", "'switch' needs a hypervisor mode (native traces have one vCPU)")
        return
    allowed = PV_OPS if mode is Mode.PV else HVM_OPS
    if name not in allowed:
        raise TraceError(line, "op", f"'{name}' is not an operation of mode {mode.value}; it has: {', '.join(allowed)}")
    if mode is not Mode.PV and name in ("read", "write"):
        if obj.get("size", 8) != 8:
            raise TraceError(line, "size", f"accesses are 8 bytes in mode {mode.value}")
        if obj.get("implicit"):
            raise TraceError(line, "implicit", f"implicit accesses are not modelled in mode {mode.value}")


def parse_op(obj: Json, header: Header, line: int) -> Step:
    """One operation line (already JSON-decoded) -> a :class:`Step`."""
    if not isinstance(obj, dict):
        raise TraceError(line, None, f"an operation line must be a JSON object, got {_short(obj)}")
    name = obj.get("op")
    if "op" not in obj:
        raise TraceError(line, "op", "is required but missing")
    if not isinstance(name, str) or name not in _PARSERS:
        raise TraceError(line, "op", f"unknown operation {_short(name)}; known: {', '.join(OP_NAMES)}")
    _validate(obj, f"op_{name}", line)
    _check_mode_allows(name, obj, header, line)
    chk = _Checker(header, line)
    op = _PARSERS[name](obj, chk)
    if isinstance(op, RegWrite) and header.mode is not Mode.NATIVE:
        if op.value % PAGE_SIZE or op.value >> header.maxphyaddr:
            raise TraceError(line, "value", "a guest's CR3 here is the page-aligned guest-physical address of its PML4")
    if isinstance(op, Multicall):
        for i, call in enumerate(obj["calls"]):
            if call["op"] not in HYPERCALL_OPS:
                raise TraceError(line, f"calls[{i}].op", "a multicall entry must be a hypercall")
    obs = _observation(obj["obs"], chk) if "obs" in obj else None
    allowed = tuple(_observation(a, chk) for a in obj.get("allowed", ()))
    return Step(op, obs, str(obj.get("note", "")), line, allowed)


def _check_registers(vcpu: VcpuInit, where: str, header: Header, line: int) -> None:
    """The initial registers must be a state a 64-bit, 4-level-paging processor can
    be in: each register must be one its write rules accept (SDM 2.5, Vol. 2A MOV CR)."""
    state = ArchState()
    steps: tuple[tuple[str, Callable[[ArchState], object]], ...] = (
        ("efer", lambda s: write_efer(s, vcpu.efer)),
        ("cr4", lambda s: write_cr4(s, vcpu.cr4)),
        ("cr0", lambda s: write_cr0(s, vcpu.cr0)),
        ("cr3", lambda s: write_cr3(s, vcpu.cr3, header.maxphyaddr)),
    )
    for reg, write in steps:
        try:
            result = write(state)
        except RefmodelError as err:
            raise TraceError(line, f"{where}.{reg}", str(err)) from None
        if isinstance(result, GeneralProtection):
            raise TraceError(line, f"{where}.{reg}", f"not a valid initial value: {result.reason}")
        state = getattr(result, "state")
    if vcpu.efer & 0x500 != 0x500:
        raise TraceError(line, f"{where}.efer", "EFER.LME and EFER.LMA must be set (the model runs in IA-32e mode)")
    if vcpu.cr3 >> 63:
        raise TraceError(line, f"{where}.cr3", "bit 63 (no-flush) is not stored in CR3")
    if not vcpu.rflags & 2:
        raise TraceError(line, f"{where}.rflags", "bit 1 of RFLAGS is reserved and always 1")


def parse_header(obj: Json, line: int = 1) -> Header:
    """The header line (already JSON-decoded) -> a :class:`Header`."""
    if not isinstance(obj, dict):
        raise TraceError(line, None, f"the header must be a JSON object, got {_short(obj)}")
    if "refmodel_trace" not in obj:
        raise TraceError(line, "refmodel_trace", "is missing: line 1 must be a trace header {\"refmodel_trace\": 2, ...}")
    version = obj["refmodel_trace"]
    if isinstance(version, bool) or version not in READ_VERSIONS:
        raise TraceError(line, "refmodel_trace", f"version {_short(version)} is not supported (versions 1 and 2 are)")
    with _version(int(version)):
        _validate(obj, "header", line)
    maxphyaddr = int(obj["maxphyaddr"])
    mode = Mode(obj["mode"])
    memory: list[tuple[int, bytes]] = []
    for key, value in obj["memory"].items():
        frame = int(key, 16)
        if frame >> (maxphyaddr - PAGE_SHIFT):
            raise TraceError(line, f"memory.{key}", f"frame is beyond MAXPHYADDR={maxphyaddr}")
        if isinstance(value, dict):
            for off in value:
                offset = int(off, 16)
                if offset % 8 or offset >= PAGE_SIZE:
                    raise TraceError(line, f"memory.{key}.{off}", "an offset must be 8-byte aligned and below 0x1000")
        data = _frame_bytes(value)
        if any(data):
            memory.append((frame, data))
    memory.sort()
    if len({f for f, _ in memory}) != len(memory):
        raise TraceError(line, "memory", "a frame is listed twice")
    vcpus = tuple(
        VcpuInit(u64(v["cr0"]), u64(v["cr3"]), u64(v["cr4"]), u64(v["efer"]), u64(v["rflags"]), int(v["cpl"]),
                 v.get("domid"))
        for v in obj["vcpus"]
    )
    domains = tuple(
        DomainInit(int(d["domid"]), tuple(sorted((int(g, 16), u64(m)) for g, m in d["p2m"].items())),
                   bool(d.get("privileged", False)), u64(d["pv_base"]) if "pv_base" in d else None)
        for d in obj.get("domains", [])
    )
    machine = None
    if "machine" in obj:
        m = obj["machine"]
        machine = MachineInit(int(m["nr_frames"]), int(m["hypervisor_frames"]), bool(m.get("tagged", True)),
                              int(m.get("batch_size", 32)))
    tlb = (int(obj["tlb"]["capacity"]), int(obj["tlb"]["ways"])) if "tlb" in obj else None
    generator = obj.get("generator")
    header = Header(
        mode=mode, maxphyaddr=maxphyaddr, memory=tuple(memory), vcpus=vcpus,
        name=str(obj.get("name", "")), description=str(obj.get("description", "")),
        page1gb=bool(obj.get("page1gb", True)), tlb=tlb, machine=machine, domains=domains,
        version=int(version),
        generator=tuple((str(k), str(v)) for k, v in generator.items()) if isinstance(generator, dict) else None,
    )
    _check_header(header, line)
    return header


def _check_header(header: Header, line: int) -> None:
    if header.tlb is not None and header.tlb[0] % header.tlb[1]:
        raise TraceError(line, "tlb.capacity", f"{header.tlb[0]} is not a multiple of ways={header.tlb[1]}")
    for i, vcpu in enumerate(header.vcpus):
        _check_registers(vcpu, f"vcpus[{i}]", header, line)
    if header.mode is Mode.NATIVE:
        if len(header.vcpus) != 1:
            raise TraceError(line, "vcpus", "a native trace has exactly one vCPU (the processor)")
        for name, present in (("machine", header.machine is not None), ("domains", bool(header.domains))):
            if present:
                raise TraceError(line, name, "belongs to hypervisor modes; this trace's mode is native")
        if header.vcpus[0].domid is not None:
            raise TraceError(line, "vcpus[0].domid", "belongs to hypervisor modes; this trace's mode is native")
        return
    _check_hypervisor_header(header, line)


def _check_hypervisor_header(header: Header, line: int) -> None:
    machine = header.machine
    if machine is None:
        raise TraceError(line, "machine", f"is required in mode {header.mode.value}")
    if not header.domains:
        raise TraceError(line, "domains", f"is required in mode {header.mode.value}")
    if machine.hypervisor_frames >= machine.nr_frames:
        raise TraceError(line, "machine.hypervisor_frames", "must be below nr_frames")
    if machine.nr_frames << PAGE_SHIFT > 1 << header.maxphyaddr:
        raise TraceError(line, "machine.nr_frames", f"{machine.nr_frames} frames do not fit below MAXPHYADDR")
    owners: dict[int, int] = {}
    domids: set[int] = set()
    for i, dom in enumerate(header.domains):
        if dom.domid in domids:
            raise TraceError(line, f"domains[{i}].domid", f"domain {dom.domid} is listed twice")
        if dom.domid >= 0x7FF0:
            raise TraceError(line, f"domains[{i}].domid", f"{dom.domid:#x} is a reserved domain id")
        domids.add(dom.domid)
        for gfn, mfn in dom.p2m:
            if not machine.hypervisor_frames <= mfn < machine.nr_frames:
                raise TraceError(line, f"domains[{i}].p2m.{gfn:#x}", f"mfn {mfn:#x} is not a guest frame of the machine")
            if mfn in owners:
                raise TraceError(line, f"domains[{i}].p2m.{gfn:#x}", f"mfn {mfn:#x} is already given to domain {owners[mfn]}")
            owners[mfn] = dom.domid
    for frame, _ in header.memory:
        if frame >= machine.nr_frames:
            raise TraceError(line, f"memory.{frame:#x}", f"beyond the machine's {machine.nr_frames} frames")
    seen: set[int] = set()
    for i, vcpu in enumerate(header.vcpus):
        where = f"vcpus[{i}]"
        if vcpu.domid is None:
            raise TraceError(line, f"{where}.domid", f"is required in mode {header.mode.value}")
        if vcpu.domid not in domids:
            raise TraceError(line, f"{where}.domid", f"no domain {vcpu.domid} in domains")
        if vcpu.domid in seen:
            raise TraceError(line, f"{where}.domid", "the model runs one vCPU per domain")
        seen.add(vcpu.domid)
        base = next(d.pv_base for d in header.domains if d.domid == vcpu.domid)
        if header.mode is Mode.PV and vcpu.cr3 != (base or 0) << PAGE_SHIFT:
            raise TraceError(
                line, f"{where}.cr3",
                "a PV vCPU starts on its domain's pv_base (cr3 = pv_base << 12), or without a base table (0); "
                "install one with MMUEXT_NEW_BASEPTR",
            )
    for i, dom in enumerate(header.domains):
        if dom.pv_base is None:
            continue
        if header.mode is not Mode.PV:
            raise TraceError(line, f"domains[{i}].pv_base", f"belongs to mode pv; this trace's mode is {header.mode.value}")
        if dom.pv_base not in {mfn for _, mfn in dom.p2m}:
            raise TraceError(line, f"domains[{i}].pv_base", f"mfn {dom.pv_base:#x} is not a frame of domain {dom.domid}")


# ---------------------------------------------------------------------------------
# Reading a file
# ---------------------------------------------------------------------------------


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def _reject_float(text: str) -> object:
    raise ValueError(f"{_short(text)} is not an integer (every number in a trace is)")


def _no_duplicates(pairs: list[tuple[str, Json]]) -> dict[str, Json]:
    out: dict[str, Json] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {_short(key)}")
        out[key] = value
    return out


def decode_line(raw: bytes, line: int) -> Json:
    """Strict JSON decoding of one line: UTF-8, no NaN/Infinity, no duplicate keys."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TraceError(line, None, f"not valid UTF-8 (byte {err.start})") from None
    try:
        return json.loads(
            text, parse_constant=_reject_constant, parse_float=_reject_float, object_pairs_hook=_no_duplicates
        )
    except json.JSONDecodeError as err:
        raise TraceError(line, None, f"malformed JSON: {err.msg} (column {err.colno})") from None
    except RecursionError:
        raise TraceError(line, None, "malformed JSON: nested too deeply") from None
    except ValueError as err:
        raise TraceError(line, None, f"malformed JSON: {_one_line(str(err))}") from None


def parse_trace(data: bytes | str, source: str = "") -> Trace:
    """Parse a whole trace; any problem is a :class:`TraceError` naming the line."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    try:
        return replace(_parse_lines(raw.split(b"\n")), source=source)
    except TraceError as err:
        raise err.with_source(source) from None


def _parse_lines(lines: Sequence[bytes]) -> Trace:
    numbered = [(i + 1, raw) for i, raw in enumerate(lines) if raw.strip()]
    if not numbered:
        raise TraceError(1, None, "empty trace: line 1 must be a header {\"refmodel_trace\": 2, ...}")
    first_line, first = numbered[0]
    header = parse_header(decode_line(first, first_line), first_line)
    with _version(header.version):
        steps = tuple(parse_op(decode_line(raw, n), header, n) for n, raw in numbered[1:])
    return Trace(header, steps)


def load_trace(path: str) -> Trace:
    """Read and parse a trace file (``-``: standard input, named ``<stdin>`` in
    messages)."""
    return parse_trace(read_input(path, "trace"), display_name(path))


# ---------------------------------------------------------------------------------
# Values -> JSON
# ---------------------------------------------------------------------------------


def _frame_json(data: bytes) -> dict[str, str]:
    """A frame as sparse qwords (non-zero ones only)."""
    out: dict[str, str] = {}
    for off in range(0, PAGE_SIZE, 8):
        q = int.from_bytes(data[off : off + 8], "little")
        if q:
            out[hex(off)] = hex(q)
    return out


@cache
def source_revision() -> str:
    """The git commit of the refmodel source being run, with ``-dirty`` if its files
    differ from it, or ``unknown`` (an installed copy, no git)."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
                                 "refmodel", "specs"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not re.fullmatch(r"[0-9a-f]{40,64}", head):
        return "unknown"
    return head + ("-dirty" if status.strip() else "")


def generator() -> dict[str, Json]:
    """The ``generator`` of every header and ``index.json`` refmodel writes."""
    return {"name": "refmodel", "version": __version__, "revision": source_revision()}


def header_json(h: Header) -> dict[str, Json]:
    out: dict[str, Json] = {"refmodel_trace": TRACE_VERSION, "generator": generator()}
    if h.name:
        out["name"] = h.name
    if h.description:
        out["description"] = h.description
    out["mode"] = h.mode.value
    out["maxphyaddr"] = h.maxphyaddr
    if not h.page1gb:
        out["page1gb"] = False
    if h.tlb is not None:
        out["tlb"] = {"capacity": h.tlb[0], "ways": h.tlb[1]}
    if h.machine is not None:
        m: dict[str, Json] = {"nr_frames": h.machine.nr_frames, "hypervisor_frames": h.machine.hypervisor_frames}
        if not h.machine.tagged:
            m["tagged"] = False
        if h.machine.batch_size != 32:
            m["batch_size"] = h.machine.batch_size
        out["machine"] = m
    if h.domains:
        out["domains"] = [
            {"domid": d.domid, **({"privileged": True} if d.privileged else {}),
             **({"pv_base": hex(d.pv_base)} if d.pv_base is not None else {}),
             "p2m": {hex(g): hex(mfn) for g, mfn in d.p2m}}
            for d in h.domains
        ]
    out["memory"] = {hex(frame): _frame_json(data) for frame, data in h.memory}
    out["vcpus"] = [_vcpu_json(v) for v in h.vcpus]
    return out


def _vcpu_json(v: VcpuInit) -> dict[str, Json]:
    out: dict[str, Json] = {
        "cr0": hex(v.cr0), "cr3": hex(v.cr3), "cr4": hex(v.cr4), "efer": hex(v.efer),
        "rflags": hex(v.rflags), "cpl": v.cpl,
    }
    if v.domid is not None:
        out["domid"] = v.domid
    return out


def op_json(op: Op) -> dict[str, Json]:
    """The JSON object of an operation (without ``obs`` and ``note``)."""
    out: dict[str, Json] = {"op": op_name(op)}
    if isinstance(op, (Read, Write)):
        out["va"] = hex(op.va)
        if isinstance(op, Write):
            out["value"] = hex(op.value)
        out["size"] = op.size
        if op.cpl is not None:
            out["cpl"] = op.cpl
        if op.implicit:
            out["implicit"] = True
    elif isinstance(op, Fetch):
        out["va"] = hex(op.va)
        if op.cpl is not None:
            out["cpl"] = op.cpl
    elif isinstance(op, PhysWrite):
        out.update(pa=hex(op.pa), value=hex(op.value), size=op.size)
    elif isinstance(op, PteWrite):
        out.update(table=hex(op.table), index=op.index)
        if op.level is not None:
            out["level"] = op.level
        out["value"] = hex(op.value)
    elif isinstance(op, RegWrite):
        out["value"] = hex(op.value)
    elif isinstance(op, Invlpg):
        out["va"] = hex(op.va)
    elif isinstance(op, Invpcid):
        out.update(type=hex(op.type), pcid=hex(op.pcid), va=hex(op.va))
    elif isinstance(op, MmuUpdate):
        out["reqs"] = [{"ptr": hex(r.ptr), "val": hex(r.val)} for r in op.reqs]
        if op.foreigndom != 0x7FF0:
            out["foreigndom"] = op.foreigndom
    elif isinstance(op, MmuextOp):
        out["ops"] = [{"cmd": e.cmd, "arg1": hex(e.arg1), "arg2": hex(e.arg2)} for e in op.ops]
        if op.foreigndom != 0x7FF0:
            out["foreigndom"] = op.foreigndom
    elif isinstance(op, UpdateVaMapping):
        out.update(va=hex(op.va), val=hex(op.val), flags=hex(op.flags))
    elif isinstance(op, Multicall):
        out["calls"] = [op_json(c) for c in op.calls]
    else:
        out["vcpu"] = op.vcpu
    return out


def step_json(step: Step) -> dict[str, Json]:
    out = op_json(step.op)
    if step.note:
        out["note"] = step.note
    if step.obs is not None:
        out["obs"] = step.obs.to_json()
    if step.allowed:
        out["allowed"] = [a.to_json() for a in step.allowed]
    return out


def dumps_line(obj: Mapping[str, Json]) -> str:
    """One canonical JSON line: compact, ASCII, keys in the order built."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True)


def dump_trace(trace: Trace) -> str:
    """The canonical text of a trace: deterministic, newline-terminated lines."""
    lines = [dumps_line(header_json(trace.header))]
    lines.extend(dumps_line(step_json(s)) for s in trace.steps)
    return "\n".join(lines) + "\n"
