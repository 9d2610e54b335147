"""The command line under generated arguments and files: whatever a user types,
``refmodel`` answers with exit code 0, 1 or 2, never a traceback, and an error is
exactly one line on stderr.

Each example builds a command line from a command and generated option values —
numbers negative, zero, huge, NaN, fractional or not numbers at all; file names of
binary, truncated, huge, empty, NaN-bearing files, directories, files that cannot be
read, missing files and ``-`` with generated standard input — and runs it in-process
through :func:`refmodel.cli.main`. Values that would start long work are not
generated (a valid ``--plot`` file, ``compare --pages`` above 8, ``bench --sizes``
above 200, a real ``verify``): those commands' bounds are what is tested, and
out-of-bound values are generated so that a missing bound shows up as a slow test.
The test is derandomized: CI runs the same examples every time.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refmodel.cli import main
from refmodel.oracle.fixtures import generate, scenarios

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
EXAMPLES = 2_000 if LONG else 120

#: A small fixture with observations: valid input for check and replay.
BASE_FIXTURE = "core/pf/smap/ac0"


@cache
def fixture_bytes() -> bytes:
    return next(f for f in generate(BASE_FIXTURE) if f.name == BASE_FIXTURE).text().encode()


def catalogue(root: Path) -> dict[str, str]:
    """Named files of every troublesome kind under ``root``: name -> path."""
    text = fixture_bytes()
    contents = {
        "empty": b"",
        "binary": bytes(range(256)) * 4,
        "fixture": text,
        "truncated": text[: len(text) // 2],
        "header-only": text.split(b"\n")[0] + b"\n",
        "huge-spaces": b" " * (2 << 20),
        "huge-number": b'{"refmodel_trace": 1' + b"0" * 5000 + b"}",
        "deep": b"[" * 50_000,
        "costs-ok": b'{"vm_exit": 3, "hypercall": {"cycles": 1.5, "source": "me"}}',
        "costs-nan": b'{"vm_exit": NaN}',
        "costs-inf": b'{"vm_exit": 1e400}',
        "costs-negative": b'{"vm_exit": -12}',
        "costs-dup": b'{"vm_exit": 1, "vm_exit": 1}',
        "costs-array": b"[1, 2, 3]",
        "utf16": '{"vm_exit": 1}'.encode("utf-16"),
    }
    files = {}
    for name, data in contents.items():
        path = root / f"{name}.json"
        path.write_bytes(data)
        files[name] = str(path)
    (root / "a-directory").mkdir()
    files["directory"] = str(root / "a-directory")
    unreadable = root / "unreadable.json"
    unreadable.write_bytes(b"{}")
    unreadable.chmod(0)  # unreadable unless the tests run as root
    files["unreadable"] = str(unreadable)
    if Path("/proc/self/mem").exists():
        files["io-error"] = "/proc/self/mem"  # open() works, read() fails with EIO, even for root
    files["missing"] = str(root / "missing" / "file.json")
    files["under-a-file"] = str(root / "fixture.json" / "x")
    files["stdin"] = "-"
    files["empty-name"] = ""
    return files


@dataclass(frozen=True)
class Files:
    """The catalogue, made once per test session (a session-scoped directory)."""

    root: Path
    paths: dict[str, str]


_FILES: list[Files] = []


def files() -> Files:
    if not _FILES:
        root = Path(tempfile.mkdtemp(prefix="refmodel-cli-fuzz-"))
        atexit.register(shutil.rmtree, root, True)
        _FILES.append(Files(root, catalogue(root)))
    return _FILES[0]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


#: Values no integer or float option may accept.
BAD_NUMBERS = st.one_of(
    st.sampled_from(["-1", "0", "nan", "NaN", "inf", "-inf", "1e400", "1.5", "", " ", "x", "0x10", "1_0", "--",
                     "99999999999999999999999", "1" + "0" * 5000, "-0", "+3", "1e3"]),
    st.integers(max_value=0).map(str),
    st.integers(min_value=10**8).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=12).filter(lambda t: not _is_number(t)),
)
#: Generated junk: never a number, never something that looks like an option.
JUNK = st.text(max_size=16).filter(lambda t: not _is_number(t) and not t.startswith("-"))


class Lines:
    """Strategies for command lines: with ``valid`` every value is a good one (the
    command runs, cheaply); otherwise good and bad values mix."""

    def __init__(self, valid: bool) -> None:
        self.valid = valid

    def either(self, good: st.SearchStrategy[str], bad: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        return good if self.valid else st.one_of(good, bad)

    def number(self, low: int, high: int) -> st.SearchStrategy[str]:
        """A cheap valid value (``low..high``) or a bad one."""
        return self.either(st.integers(low, high).map(str), BAD_NUMBERS)

    def a_file(self, *good: str) -> st.SearchStrategy[str]:
        """One of the ``good`` catalogue files, or (not valid) any file at all,
        ``GENERATED`` among them."""
        anything = st.one_of(st.sampled_from(sorted(files().paths)).map(lambda k: files().paths[k]),
                             st.just("GENERATED"))
        if not good:
            return anything
        return self.either(st.sampled_from(good).map(lambda k: files().paths[k]), anything)

    def option(self, name: str, value: st.SearchStrategy[str]) -> st.SearchStrategy[list[str]]:
        """The option with a value, nothing, or (not valid) the option without its value."""
        forms = [value.map(lambda v: [name, v]), st.just([])]
        return st.one_of(*forms) if self.valid else st.one_of(*forms, st.just([name]))

    def choice(self, good: list[str], bad: list[str]) -> st.SearchStrategy[str]:
        return self.either(st.sampled_from(good), st.sampled_from(bad))

    def all(self) -> st.SearchStrategy[list[str]]:
        """One command line of a subcommand, with generated options."""
        plots = st.sampled_from(["out.txt", "adir", "", "nodir/p.png", "p.PNG.txt", "a-directory"]).map(
            lambda p: p if p in ("", "adir") else str(files().root / p)
        )
        outs = self.choice(["fx"], ["", " ", "under-file", "/dev/null"]).map(
            lambda o: str(files().root / "out" / o) if o == "fx"
            else files().paths["fixture"] if o == "under-file" else o
        )
        names = [s.name for s in scenarios()]
        onlys = self.either(
            st.sampled_from([BASE_FIXTURE, "core/pf/smap/"]),
            st.one_of(st.just("nothing"), st.text(max_size=8).filter(lambda t: not any(n.startswith(t) for n in names))),
        )
        sizes = st.lists(st.integers(1, 200), min_size=1, max_size=3).map(lambda ns: ",".join(map(str, ns)))
        lines = [
            joined(st.just(["costs"]), self.option("--costs", self.a_file("costs-ok"))),
            joined(
                st.just(["walk"]), self.option("--access", self.choice(["read", "write", "fetch"], ["run", ""])),
                self.option("--cpl", self.choice(["0", "3"], ["1", "2", "-1", "x"])),
                self.option("--leaf-flags", self.either(st.sampled_from(["P,RW,US,XD", "US", "", "p, rw"]), JUNK)),
                self.option("--size", self.choice(["4K", "2M", "1G"], ["8K", ""])),
            ),
            joined(st.just(["check"]), flag("--json"),
                   self.a_file("fixture").map(lambda f: [f]) if self.valid
                   else st.one_of(self.a_file().map(lambda f: [f]), st.just([]))),
            joined(st.just(["replay"]), flag("--annotate"), flag("--no-counters"),
                   self.a_file("fixture", "truncated").map(lambda f: [f])),
            joined(st.just(["fixtures"]), st.tuples(st.just("--out"), outs).map(list),
                   st.tuples(st.just("--only"), onlys).map(list)),
            joined(
                st.just(["compare", "--pages"]), self.number(1, 8).map(lambda v: [v]),
                st.tuples(st.just("--scenario"), self.choice(["seed", "remap"], ["bogus", "ALL"])).map(list),
                self.option("--batch", self.number(1, 40)), flag("--untagged"),
                self.option("--guest", self.choice(["linux", "ad-clear"], ["bsd"])),
                self.option("--costs", self.a_file("costs-ok")),
                st.just([]) if self.valid else self.option("--plot", plots),
            ),
            joined(
                st.just(["bench", "--sizes"]), self.either(sizes, BAD_NUMBERS).map(lambda v: [v]),
                st.just(["--repeat", "1"]) if self.valid else self.option("--repeat", self.number(1, 2)),
                self.option("--seed", self.either(st.integers(0, 2**64 - 1).map(str), BAD_NUMBERS)),
                st.just(["--slow-max-n", "200"]) if self.valid else self.option("--slow-max-n", self.number(1, 300)),
                self.option("--require-ratio", self.either(st.sampled_from(["1e-9", "1e9"]), BAD_NUMBERS)),
                flag("--no-unicorn"), flag("--ept"),
                st.just(["--ept-slow-max-n", "200"]) if self.valid
                else self.option("--ept-slow-max-n", self.number(1, 300)),
            ),
        ]
        if self.valid:
            return st.one_of(*lines)
        return st.one_of(
            *lines,
            joined(  # verify only with bad values: a real proof run is long
                st.just(["verify"]),
                st.one_of(
                    st.tuples(st.just("--workers"), BAD_NUMBERS.filter(lambda v: v.strip() not in ("1", "2", "+3")))
                    .map(list),
                    st.tuples(st.just("--transition"), JUNK).map(list),
                ),
            ),
            # anything at all after a command name: never options (an abbreviation
            # such as --u would be a valid, long compare), so these are positionals
            st.tuples(st.sampled_from(["", "compare", "walk", "nosuch", "--version", "-h"]),
                      st.lists(JUNK, min_size=1, max_size=3)).map(lambda t: [t[0], *t[1]]),
        )


def flag(name: str) -> st.SearchStrategy[list[str]]:
    return st.sampled_from([[name], []])


def joined(*parts: st.SearchStrategy[list[str]]) -> st.SearchStrategy[list[str]]:
    return st.tuples(*parts).map(lambda groups: [arg for group in groups for arg in group])


def command_lines() -> st.SearchStrategy[list[str]]:
    """Command lines that should run, and command lines with any values at all."""
    return st.one_of(Lines(valid=True).all(), Lines(valid=False).all())


@contextlib.contextmanager
def captured(stdin: bytes) -> Iterator[tuple[io.StringIO, io.StringIO]]:
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.object(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin))), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield out, err


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not LONG, database=None,
          suppress_health_check=list(HealthCheck))
@given(command_lines(), st.binary(max_size=300), st.one_of(st.binary(max_size=300), st.integers(0, 4000)))
def test_any_command_line_exits_0_1_or_2_with_at_most_one_error_line(
    argv: list[str], generated: bytes, stdin: bytes | int
) -> None:
    """``GENERATED`` in ``argv`` is a fresh file holding ``generated``; standard input
    is generated bytes, or the valid fixture cut after that many bytes."""
    stdin_bytes = fixture_bytes()[:stdin] if isinstance(stdin, int) else stdin
    with tempfile.TemporaryDirectory(dir=files().root) as scratch:
        gen = Path(scratch) / "generated.json"
        gen.write_bytes(generated)
        argv = [str(gen) if a == "GENERATED" else a for a in argv]
        with captured(stdin_bytes) as (out, err):
            try:
                code = main(argv)
            except SystemExit as stop:  # main returns its code; an escaping exit is a finding too
                raise AssertionError(f"SystemExit({stop.code!r}) escaped main for {argv!r}") from None
    output, errors = out.getvalue(), err.getvalue()
    assert code in (0, 1, 2), (argv, code, errors)
    assert "Traceback" not in output + errors, argv
    assert errors.count("\n") <= 1 and (errors == "" or errors.endswith("\n")), (argv, errors)
    if code == 2:
        assert errors.startswith("refmodel") and ": error: " in errors, (argv, errors)
        assert output == "", (argv, output)  # refused before any work
    if code == 0:
        assert errors == "", (argv, errors)


def test_the_generated_command_lines_both_run_and_fail() -> None:
    """The generated command lines are not all refused: some run (exit 0), as the
    strategy promises, so the fuzz test exercises working commands too."""
    codes: dict[int, int] = {}

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(command_lines())
    def run_one(argv: list[str]) -> None:
        argv = [files().paths["fixture"] if a == "GENERATED" else a for a in argv]
        with captured(fixture_bytes()):
            code = main(argv)
        codes[code] = codes.get(code, 0) + 1

    run_one()
    assert codes.get(0, 0) > 0 and codes.get(2, 0) > 0, codes
