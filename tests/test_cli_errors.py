"""Every command-line mistake of issue 15 is one line on stderr and exit code 2.

Each case below was a traceback, a hang, an unbounded run or a silent pass before;
each is run through :func:`refmodel.cli.main` as a user would type it. A case whose
work would be long (``compare --plot``, ``bench`` with a huge N, ``verify`` with
99999 workers) prints nothing on stdout: the mistake is found before any work.
"""

import argparse
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from refmodel import __version__
from refmodel.cli import build_parser, main
from refmodel.oracle.fixtures import generate


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run ``argv``, check it is an input error (exit 2, nothing on stdout, one
    ``refmodel <command>: error:`` line on stderr) and return that line."""
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, ""), (code, out, err)
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("refmodel") and ": error: " in err and "Traceback" not in err
    return err


def with_stdin(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))


def fixture_text(name: str) -> str:
    return next(f for f in generate(name) if f.name == name).text()


# -- cost files ------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["costs", "compare"])
def test_a_binary_cost_file_is_an_input_error(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "c.json"
    f.write_bytes(b"\x99\xff\x00binary")
    err = usage_error(capsys, command, "--costs", str(f))
    assert f"refmodel {command}: error: cost file {f}: not UTF-8 text" in err


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ('{"vm_exit": NaN}', "NaN is not a number JSON allows"),
        ('{"vm_exit": Infinity}', "Infinity is not a number JSON allows"),
        ('{"vm_exit": 1e400}', "got inf"),
        ('{"vm_exit": 1, "vm_exit": 2}', "duplicate key 'vm_exit'"),
    ],
)
def test_cost_files_with_nan_infinity_or_duplicate_keys_are_refused(
    content: str, words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "c.json"
    f.write_text(content)
    assert words in usage_error(capsys, "costs", "--costs", str(f))


def test_a_cost_file_that_is_a_directory_or_too_large(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "Is a directory" in usage_error(capsys, "costs", "--costs", str(tmp_path))
    big = tmp_path / "big.json"
    big.write_text("{" + " " * (2 << 20) + "}")
    assert "is larger than" in usage_error(capsys, "costs", "--costs", str(big))


def test_a_cost_file_from_standard_input(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with_stdin(monkeypatch, b'{"vm_exit": 7}')
    code, out, _ = run(capsys, "costs", "--costs", "-")
    assert code == 0
    assert [line.split()[:2] for line in out.splitlines() if line.startswith("vm_exit ")] == [["vm_exit", "7"]]
    assert "overridden from <stdin>" in out


# -- compare --plot ----------------------------------------------------------------------


def test_plot_into_a_file_that_is_not_an_image_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = usage_error(capsys, "compare", "--plot", str(tmp_path / "out.txt"))
    assert "argument --plot: the file name must end in .png, .svg or .pdf" in err
    assert not (tmp_path / "out.txt").exists()


def test_plot_into_a_directory_is_refused_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adir = tmp_path / "adir"
    adir.mkdir()
    err = usage_error(capsys, "compare", "--plot", str(adir))
    assert "is a directory; name the image file" in err
    assert list(tmp_path.iterdir()) == [adir] and list(adir.iterdir()) == []


def test_plot_into_a_missing_directory_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "does not exist" in usage_error(capsys, "compare", "--plot", str(tmp_path / "no" / "p.png"))


# -- bench, verify: bounds ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--seed", "-1"], "argument --seed: must be in 0.."),
        (["--sizes", "1000000000"], "argument --sizes: each value must be in 1..10,000,000"),
        (["--sizes", "inf"], "not a whole number"),
        (["--sizes", "nan"], "not a whole number"),
        (["--sizes", "1.5"], "not a whole number"),
        (["--sizes", "-3"], "each value must be in 1.."),
        (["--sizes", ","], "expected a comma-separated list"),
        (["--repeat", "0"], "argument --repeat: must be in 1..100"),
        (["--require-ratio", "nan"], "must be a finite number above 0"),
        (["--sizes", "100", "--slow-max-n", "10"], "--slow-max-n 10 is below the smallest N (100)"),
        (["--sizes", "100", "--ept", "--ept-slow-max-n", "10"], "--ept-slow-max-n 10 is below the smallest N"),
    ],
)
def test_bench_arguments_are_bounded(args: list[str], words: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert words in usage_error(capsys, "bench", "--no-unicorn", *args)


def test_verify_refuses_more_workers_than_cpus(capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error(capsys, "verify", "--workers", "99999")
    assert f"argument --workers: must be in 1..{os.cpu_count() or 1}, got '99999'" in err
    assert "must be in 1.." in usage_error(capsys, "verify", "--workers", "0")


# -- fixtures ---------------------------------------------------------------------------------


def test_fixtures_into_an_empty_directory_name_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert "argument --out: needs a directory name" in usage_error(capsys, "fixtures", "--out", "")
    assert list(tmp_path.iterdir()) == []


def test_fixtures_only_matching_nothing_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error(capsys, "fixtures", "--out", str(tmp_path / "fx"), "--only", "nothing")
    assert "no fixture matched --only 'nothing'; names start with core/" in err
    assert not (tmp_path / "fx").exists()


def test_fixtures_into_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "f"
    f.write_text("")
    assert "exists and is not a directory" in usage_error(capsys, "fixtures", "--out", str(f))


def test_fixtures_only_computes_and_writes_the_chosen_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "fixtures", "--out", str(tmp_path), "--only", "core/pf/smap/")
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.jsonl"))
    assert code == 0 and written and all(w.startswith("core/pf/smap/") for w in written)
    assert f"wrote {len(written)} fixtures" in out


# -- check, replay: traces ---------------------------------------------------------------------


def test_check_of_a_trace_without_observations_does_not_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    lines = [json.loads(line) for line in fixture_text("core/pf/smap/ac0").splitlines()]
    for line in lines[1:]:
        line.pop("obs", None)
        line.pop("allowed", None)
    path = tmp_path / "noobs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    err = usage_error(capsys, "check", str(path))
    assert f"{path}: no operation has a recorded observation, so there is nothing to check" in err
    header_only = tmp_path / "header.jsonl"
    header_only.write_text(json.dumps(lines[0]) + "\n")
    assert "nothing to check" in usage_error(capsys, "check", str(header_only))


@pytest.mark.parametrize("command", ["check", "replay"])
def test_a_trace_from_standard_input(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with_stdin(monkeypatch, fixture_text("core/pf/smap/ac0").encode())
    code, out, err = run(capsys, command, "-")
    assert (code, err) == (0, "")
    assert out.startswith("ok: ") if command == "check" else out.startswith('{"index":0')


def test_a_bad_trace_from_standard_input_is_named_stdin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with_stdin(monkeypatch, b"\xff\xfe")
    assert "refmodel check: error: <stdin>:1:" in usage_error(capsys, "check", "-")


def test_a_trace_that_is_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert f"cannot read trace {tmp_path}: Is a directory" in usage_error(capsys, "replay", str(tmp_path))


# -- walk, usage, --version, help ---------------------------------------------------------------


def test_walk_with_an_unknown_flag_or_option_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert "--leaf-flags: unknown flag 'FOO'; flags: P, RW" in usage_error(capsys, "walk", "--leaf-flags", "P,FOO")
    err = usage_error(capsys, "walk", "--bogus")
    assert err == "refmodel walk: error: unrecognized arguments: --bogus (see refmodel walk --help)\n"
    assert "argument --cpl: invalid choice: 2" in usage_error(capsys, "walk", "--cpl", "2")


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["compare", "\n", "a b"], "unrecognized arguments: '\\n' 'a b' (see refmodel compare --help)"),
        (["check", "x\ny"], "cannot read trace 'x\\ny': No such file or directory"),
        ([], "refmodel: error: the following arguments are required: COMMAND"),
        (["nosuch"], "refmodel: error: argument COMMAND: invalid choice: 'nosuch'"),
        (["check"], "refmodel check: error: the following arguments are required: trace"),
        (["compare", "--pages", "x"], "refmodel compare: error: argument --pages: not an integer: 'x'"),
        (["compare", "--pages", "99999"], "argument --pages: must be in 1..4096"),
        (["compare", "--batch", "99999"], "argument --batch: must be in 1..4096"),
        (["costs", "--costs", ""], "an empty string is not a file name"),
    ],
)
def test_usage_errors_are_one_line(argv: list[str], words: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert words in usage_error(capsys, *argv)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--version") == (0, f"refmodel {__version__}\n", "")


def test_help_exits_0_and_names_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "--version" in out and "2 a usage or input error" in out


def test_every_command_help_opens_with_its_summary(capsys: pytest.CaptureFixture[str]) -> None:
    for parser in _parsers()[1:]:
        assert parser.description, parser.prog
        code, out, _ = run(capsys, parser.prog.split()[1], "--help")
        assert code == 0 and parser.description in " ".join(out.split())


def _parsers() -> list[argparse.ArgumentParser]:
    parser = build_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [parser, *(p for s in subs for p in s.choices.values())]


def test_every_option_of_every_command_has_help_text() -> None:
    missing = [
        f"{p.prog} {'/'.join(a.option_strings) or a.dest}"
        for p in _parsers()
        for a in p._actions
        if not (a.help and a.help.strip()) and not isinstance(a, argparse._SubParsersAction)
    ]
    assert missing == []


# -- python -m refmodel.oracle.unicorn_record ---------------------------------------------------


def test_unicorn_record_without_unicorn_says_what_to_install(tmp_path: Path) -> None:
    """Run as a program in a Python where ``import unicorn`` fails."""
    code = (
        "import runpy, sys; sys.modules['unicorn'] = None; sys.argv = ['unicorn_record', 'trace.jsonl'];"
        "runpy.run_module('refmodel.oracle.unicorn_record', run_name='__main__')"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (
        "python -m refmodel.oracle.unicorn_record: error: needs unicorn, an optional dependency: "
        "pip install 'refmodel[test]' (or pip install unicorn)\n"
    )


def test_unicorn_record_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("unicorn")
    from refmodel.oracle.unicorn_record import main as record_main

    for argv in ([], ["a", "b"], ["--bogus"], ["/nonexistent.jsonl"]):
        assert record_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("python -m refmodel.oracle.unicorn_record: error: ") and err.count("\n") == 1
