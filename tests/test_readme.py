"""The README cannot rot: its comparison tables are what `refmodel compare` prints
today, and its check command is exactly what `.ci/run` runs."""

import contextlib
import io
import re
from pathlib import Path

from refmodel.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def blocks(text: str) -> dict[str, str]:
    """Each `== title` block of compare's output, up to the next one."""
    found = re.findall(r"^(== .*?)(?=^== |^cycle costs:|\Z)", text, re.S | re.M)
    return {b.split("\n", 1)[0]: b.strip() for b in found}


def test_readme_tables_are_todays_output() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["compare"]) == 0
    fresh = blocks(out.getvalue())
    quoted = blocks("\n".join(re.findall(r"```text\n(== .*?)```", README, re.S)))
    assert quoted, "the README quotes no compare table"
    for title, table in quoted.items():
        assert title in fresh, f"README quotes a table compare no longer prints: {title}"
        assert table == fresh[title], f"README table is stale: {title}; regenerate it with `refmodel compare`"


def test_readme_check_command_is_what_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in README
    assert "refmodel compare" in README
