"""``refmodel fixtures --out DIR``: write the conformance suite — one trace per
fixture, named for what it tests, with the model's expected observations — and
``DIR/index.json``. Regenerating gives byte-identical files."""

import argparse

from ..oracle.fixtures import generate, write_fixtures


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("fixtures", help="generate the conformance fixtures (traces with expected observations)")
    p.add_argument("--out", required=True, help="directory to write the fixtures into (created if missing)")
    p.add_argument("--only", default="", help="only fixtures whose name starts with this prefix")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    fixtures = [f for f in generate() if f.name.startswith(args.only)]
    write_fixtures(args.out, fixtures)
    ambiguous = sum(1 for f in fixtures if f.ambiguous)
    print(f"wrote {len(fixtures)} fixtures to {args.out} ({ambiguous} with operations that allow several outcomes)")
    return 0
