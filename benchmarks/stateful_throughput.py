"""How many operation sequences the stateful tests check per minute, and how long
those sequences are.

    python benchmarks/stateful_throughput.py            # every machine, CI profile sizes
    python benchmarks/stateful_throughput.py pv mmu     # some of them
    HYPOTHESIS_PROFILE=long python benchmarks/stateful_throughput.py

Each machine of ``tests/test_stateful_*.py`` runs exactly as its test does (same
settings, hence the same profile), without the example database, so every sequence
is freshly generated. A *sequence* is one example: a fresh world and up to
``stateful_step_count`` rule applications; a *step* is one rule application, after
which every invariant of the machine is checked. The counts come from the machine's
invariant checks (Hypothesis runs them once after set-up and once after every step).
"""

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from hypothesis import settings  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, run_state_machine_as_test  # noqa: E402

import conftest  # noqa: E402, F401  (registers and loads the Hypothesis profiles)
import test_stateful_domains  # noqa: E402
import test_stateful_equivalence  # noqa: E402
import test_stateful_mmu  # noqa: E402
import test_stateful_pv  # noqa: E402

MACHINES: dict[str, tuple[type[RuleBasedStateMachine], settings]] = {
    "mmu": (test_stateful_mmu.MmuMachine, test_stateful_mmu.TestMmuSequences.settings),
    "equivalence": (test_stateful_equivalence.EquivalenceMachine, test_stateful_equivalence.TestEquivalence.settings),
    "pv": (test_stateful_pv.PvMachine, test_stateful_pv.TestPvSequences.settings),
    "domains": (test_stateful_domains.DomainsMachine, test_stateful_domains.TestDomainSequences.settings),
}


@dataclass
class Tally:
    sequences: int = 0
    checks: int = 0  #: invariant rounds: one after set-up, one after every step

    @property
    def steps(self) -> int:
        return self.checks - self.sequences


@dataclass(frozen=True)
class Throughput:
    name: str
    sequences: int
    steps: int
    seconds: float

    @property
    def per_minute(self) -> float:
        return 60 * self.sequences / self.seconds

    @property
    def steps_per_sequence(self) -> float:
        return self.steps / self.sequences if self.sequences else 0.0


def counting(machine: type[RuleBasedStateMachine], tally: Tally) -> type[RuleBasedStateMachine]:
    """``machine`` with its sequences and invariant rounds counted."""

    class Counted(machine):  # type: ignore[valid-type, misc]
        def __init__(self) -> None:
            super().__init__()
            tally.sequences += 1

        def check_invariants(self, *args: Any, **kwargs: Any) -> None:
            tally.checks += 1
            super().check_invariants(*args, **kwargs)

    Counted.__name__ = machine.__name__
    return Counted


def measure(name: str) -> Throughput:
    machine, base = MACHINES[name]
    tally = Tally()
    start = time.perf_counter()
    run_state_machine_as_test(counting(machine, tally), settings=settings(base, database=None))
    return Throughput(name, tally.sequences, tally.steps, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("machines", nargs="*", help=f"some of {', '.join(MACHINES)} (default: all)")
    names = parser.parse_args(argv).machines or list(MACHINES)
    unknown = [n for n in names if n not in MACHINES]
    if unknown:
        parser.error(f"unknown machine(s) {', '.join(unknown)}; choose from {', '.join(MACHINES)}")
    results = [measure(name) for name in names]
    print(f"{'machine':<12} {'sequences':>9} {'steps':>7} {'seconds':>8} {'seq/min':>8} {'steps/seq':>9}")
    for r in results:
        print(f"{r.name:<12} {r.sequences:>9} {r.steps:>7} {r.seconds:>8.1f} {r.per_minute:>8.0f} {r.steps_per_sequence:>9.1f}")
    total = Throughput("total", sum(r.sequences for r in results), sum(r.steps for r in results),
                       sum(r.seconds for r in results))
    print(f"{total.name:<12} {total.sequences:>9} {total.steps:>7} {total.seconds:>8.1f} {total.per_minute:>8.0f} "
          f"{total.steps_per_sequence:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
