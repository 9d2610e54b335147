"""``refmodel verify``: prove the isolation invariants with Z3 for every transition.

Prints the table transition x invariant — each cell "proved" with its time, or the
failure — the lemmas that each invariant's inductive core implies its statement,
and the total proof time; exits 1 if anything is not proved. ``--negative`` adds
the negative controls: deliberately broken transitions, each of which must yield a
counterexample (exit 1 if one does not). See :mod:`specs` for what is proved.
"""

import argparse
import os

from specs import proofs
from specs.invariants import INVARIANTS
from specs.transitions import TRANSITIONS

from ..errors import RefmodelError
from ..progress import progress
from .options import int_in

#: Short column headings, in INVARIANTS order.
HEADINGS = ("memory", "hypervisor", "pt (pv)", "shadow", "tlb", "registers")


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("verify", help="prove the isolation invariants (Z3) for every transition")
    cpus = os.cpu_count() or 1
    p.add_argument("--workers", type=int_in(1, cpus), default=min(2, cpus),
                   help=f"prover processes, 1..{cpus} (this machine's CPUs; default {min(2, cpus)})")
    p.add_argument("--transition", action="append", default=[], metavar="NAME",
                   help="only this transition (repeatable; an unknown name lists the known ones)")
    p.add_argument("--negative", action="store_true", help="also run the negative controls (broken transitions)")
    p.set_defaults(func=run)


def result_name(result: proofs.Cell | tuple[str, object]) -> str:
    """What a finished proof was about, for the progress bar."""
    if isinstance(result, proofs.Cell):
        return f"{result.transition} x {result.invariant}"
    return f"core => statement of {result[0]}"


def cell_text(cell: proofs.Cell) -> str:
    if cell.ok:
        return f"ok {cell.seconds:5.2f}s" + ("*" if cell.unaffected else " ")
    return f"{cell.status.upper()} ({cell.failed_clause})"


def print_table(report: proofs.Report) -> None:
    names = [c.transition for c in report.cells if c.invariant == INVARIANTS[0].name]
    width = max(len(n) for n in names + ["core => statement"])
    print(f"{'transition':{width}}  " + "  ".join(f"{h:>11}" for h in HEADINGS))
    for name in names:
        row = [cell_text(report.cell(name, inv.name)) for inv in INVARIANTS]
        print(f"{name:{width}}  " + "  ".join(f"{c:>11}" for c in row))
    lemmas = dict(report.lemmas)
    row = [
        f"ok {lemmas[inv.name].seconds:5.2f}s " if lemmas[inv.name].status == "proved" else "NOT PROVED"
        for inv in INVARIANTS
    ]
    print(f"{'core => statement':{width}}  " + "  ".join(f"{c:>11}" for c in row))
    print("  (* the transition rewrites nothing the invariant reads; proved all the same)")


def run(args: argparse.Namespace) -> int:
    chosen = list(TRANSITIONS)
    if args.transition:
        known = {t.name: t for t in TRANSITIONS}
        unknown = [n for n in args.transition if n not in known]
        if unknown:
            raise RefmodelError(f"unknown transition(s) {', '.join(unknown)}; known: {', '.join(known)}")
        chosen = [known[n] for n in args.transition]
    with progress(len(chosen) * len(INVARIANTS) + len(INVARIANTS), "proving", unit="proof") as bar:
        report = proofs.run(chosen, workers=args.workers, on_result=lambda r: bar.step(result_name(r)))
    cpu = sum(c.cpu for c in report.cells) + sum(a.cpu for _, a in report.lemmas)
    print_table(report)
    failed = [c for c in report.cells if not c.ok] + [n for n, a in report.lemmas if a.status != "proved"]
    print(
        f"{len(report.cells)} cells, {len(report.lemmas)} lemmas: "
        f"{'all proved' if not failed else f'{len(failed)} NOT PROVED'} in {report.seconds:.1f}s wall "
        f"on {report.workers} worker{'s' if report.workers > 1 else ''} ({cpu:.1f}s CPU summed over the proofs)"
    )
    code = 0 if not failed else 1
    if args.negative:
        from specs import negative

        print()
        results = negative.run_all()
        negative.print_table(results)
        if not all(r.found and r.correct_refuted for r in results):
            code = 1
    return code
