"""docs/oracle.md tabulates every number and name a trace uses, equal to the enums
the model runs on; the schema lists every counter with the same meaning."""

from pathlib import Path

from refmodel.account.events import Event, ExitReason, counter_meanings
from refmodel.arch.fault import PfErrorCode
from refmodel.hv.pv.abi import MmuCmd, MmuextCmd
from refmodel.hv.pv.errno import Errno
from refmodel.oracle.tables import TABLES, markdown_tables
from refmodel.oracle.trace import COUNTER_NAMES, schema

DOC = Path(__file__).resolve().parents[1] / "docs" / "oracle.md"


def test_the_document_has_every_table_as_the_enums_make_it() -> None:
    assert markdown_tables() in DOC.read_text(encoding="utf-8")


def test_every_member_of_every_enum_has_a_row() -> None:
    tables = {title: make() for title, make in TABLES.items()}
    assert all(f"| `{name}` |" in tables["Counters"] for name in COUNTER_NAMES)
    assert len(counter_meanings()) == len(Event) + len(ExitReason) == len(COUNTER_NAMES)
    assert all(f"| {bit.name} |" in tables["#PF error code"] for bit in PfErrorCode)
    assert all(f"`MMU_{c.name}`" in tables["`mmu_update` commands"] for c in MmuCmd)
    assert all(f"| {int(c)} | `MMUEXT_{c.name}` |" in tables["`mmuext_op` commands"] for c in MmuextCmd)
    assert all(f"| {-int(e)} | `-{e.name}` |" in tables["Hypercall return values"] for e in Errno)
    assert "| 2 | 0x04 | U |" in tables["#PF error code"] and "| 26 | `__HYPERVISOR_mmuext_op` |" in markdown_tables()


def test_the_schema_lists_every_counter_with_its_meaning() -> None:
    obs = schema()["$defs"]["observation"]
    counters = obs["properties"]["counters"]["properties"]
    assert {name: rule["description"] for name, rule in counters.items()} == counter_meanings()
