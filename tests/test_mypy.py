"""`mypy --strict` over refmodel, specs and tests is part of the check command."""

from pathlib import Path

from mypy import api

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_strict_is_clean() -> None:
    stdout, stderr, status = api.run(
        ["--strict", "--config-file", str(ROOT / "pyproject.toml"), str(ROOT / "refmodel"), str(ROOT / "specs"), str(ROOT / "tests")]
    )
    assert status == 0, stdout + stderr
