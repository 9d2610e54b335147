"""The README cannot rot: its comparison tables are what `refmodel compare` prints
today, and its check command is exactly what `.ci/run` runs."""

import contextlib
import functools
import io
import re
from pathlib import Path

from refmodel.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


@functools.cache
def compare_output() -> str:
    """What `refmodel compare` prints today (run once for every test here)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["compare"]) == 0
    return out.getvalue()


def row(table: str, label: str) -> list[str]:
    """The cells of ``label``'s row in a compare table (the label may hold spaces)."""
    line = next(line for line in table.splitlines() if line.startswith(label + "  "))
    return line[len(label):].split()


def blocks(text: str) -> dict[str, str]:
    """Each `== title` block of compare's output, up to the next one."""
    found = re.findall(r"^(== .*?)(?=^== |^cycle costs:|\Z)", text, re.S | re.M)
    return {b.split("\n", 1)[0]: b.strip() for b in found}


def test_readme_tables_are_todays_output() -> None:
    fresh = blocks(compare_output())
    quoted = blocks("\n".join(re.findall(r"```text\n(== .*?)```", README, re.S)))
    assert quoted, "the README quotes no compare table"
    for title, table in quoted.items():
        assert title in fresh, f"README quotes a table compare no longer prints: {title}"
        assert table == fresh[title], f"README table is stale: {title}; regenerate it with `refmodel compare`"


def test_readme_check_command_is_what_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in README
    assert "refmodel compare" in README


def test_readme_opens_with_the_question_and_the_answer_with_todays_numbers() -> None:
    """The first 40 lines hold the question, its thread, the answer, and the numbers
    that carry it — the same numbers compare prints today."""
    top = " ".join(" ".join(README.splitlines()[:40]).split())  # one line: phrases may wrap
    assert "context switch and hypervisor" in top and "xen-devel" in top
    assert "vCPU context switch, the TLB flushes, or the traps" in top
    assert "**the traps**" in top
    seed = next(b for t, b in blocks(compare_output()).items() if t.startswith("== malloc"))
    assert f"**{row(seed, 'shadow')[-1]} native**" in top
    for label in ("pv batched (32)", "hap", "hap, 4K EPT"):
        assert row(seed, label)[-1] in top, label
    assert "1,028" in top and row(seed, "shadow")[1] == "1,028"
    assert "## What is in it" not in top or top.index("**the traps**") < top.index("## What is in it")
    assert "seed/xen-devel-question.txt" not in README  # no file the repository does not have
