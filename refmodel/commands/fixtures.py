"""``refmodel fixtures --out DIR``: write the conformance suite — one trace per
fixture, named for what it tests, with the model's expected observations — and
``DIR/index.json``. Regenerating gives byte-identical files."""

import argparse

from ..errors import RefmodelError
from ..oracle.fixtures import generate, scenarios, write_fixtures
from .options import output_dir


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("fixtures", help="generate the conformance fixtures (traces with expected observations)")
    p.add_argument("--out", required=True, type=output_dir, metavar="DIR",
                   help="directory to write the fixtures into (created if missing)")
    p.add_argument("--only", default="", metavar="PREFIX",
                   help="only fixtures whose name starts with this prefix (e.g. core/tlb/)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    fixtures = generate(args.only)
    if not fixtures:
        families = sorted({s.name.split("/")[0] + "/" for s in scenarios()})
        raise RefmodelError(f"no fixture matched --only {args.only!r}; names start with {', '.join(families)}")
    write_fixtures(str(args.out), fixtures)
    ambiguous = sum(1 for f in fixtures if f.ambiguous)
    print(f"wrote {len(fixtures)} fixtures to {args.out} ({ambiguous} with operations that allow several outcomes)")
    return 0
