"""``refmodel walk`` explains a walk as a reader wants it: hex addresses, every entry
with its decoded flags and the rule that decided there, also when the walk faults."""

import re

import pytest

from refmodel.cli import main


def walk(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["walk", *args]) == 0
    return capsys.readouterr().out


def test_translation_shows_every_entry_in_hex_and_the_a_d_the_processor_set(capsys: pytest.CaptureFixture[str]) -> None:
    out = walk(capsys)
    assert out.startswith("write of 0x7f0000001010 at CPL 3 (user mode); CR3 = 0x1000000")
    entries = re.findall(r"^  (PML4E|PDPTE|PDE|PTE) at (0x[0-9a-f]+) = (0x[0-9a-f]{16})  \[([A-Z ]+)\]$", out, re.M)
    assert [e[0] for e in entries] == ["PML4E", "PDPTE", "PDE", "PTE"]
    assert entries[3][1:] == ("0x1003008", "0x0000000040000007", "P RW US")
    assert out.count("rights so far: writable, user, executable") == 3
    assert "the write is allowed (SDM 4.6.1)" in out
    assert "-> translated: physical address 0x40000010 in a 4K page" in out
    assert "now 0x0000000040000067 [P RW US A D] (SDM 4.8)" in out  # A and D on the leaf
    assert re.search(r"\b\d{6,}\b", out) is None  # no long decimal numbers


def test_a_refused_write_names_the_rule_and_decodes_the_error_code(capsys: pytest.CaptureFixture[str]) -> None:
    out = walk(capsys, "--access", "write", "--cpl", "3", "--leaf-flags", "P,US")
    assert "PTE at 0x1003008 = 0x0000000040000005  [P US]" in out
    assert "refused — a user-mode write needs R/W = 1 in every entry (SDM 4.6.1)" in out
    assert "CR2 = 0x7f0000001010, error code 0x7 [P W U] (protection violation, write, user mode)" in out
    assert "set A/D" not in out


def test_leaf_flags_without_p_give_a_not_present_leaf(capsys: pytest.CaptureFixture[str]) -> None:
    out = walk(capsys, "--leaf-flags", "US,RW")
    assert "PTE at 0x1003008 = 0x0000000040000006  [RW US]" in out
    assert "P = 0: not present; the walk stops with #PF" in out
    assert "error code 0x6 [W U] (not-present page, write, user mode); cause: not-present" in out


def test_large_pages_and_execute_disable(capsys: pytest.CaptureFixture[str]) -> None:
    out = walk(capsys, "--size", "2M", "--access", "fetch", "--leaf-flags", "P,RW,US,XD")
    assert "\n  PTE at" not in out and "present, a leaf: a 2M page at 0x40000000" in out
    assert "XD = 1 in any entry forbids instruction fetches" in out
    assert "(protection violation, instruction fetch, user mode)" in out
    assert "3 memory references" in walk(capsys, "--size", "2M")
