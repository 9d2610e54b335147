"""Translation throughput benchmark: slow path vs fast path vs unicorn.

    python benchmarks/bench_translate.py [--sizes 1000,10000,100000,1000000] [--no-unicorn]

The same as ``refmodel bench`` (the code lives in :mod:`refmodel.fast.bench` so
that the installed command can run it); kept here so the benchmark is found with
the other benchmarks. Prints a table; asserts nothing about speed unless asked
with ``--require-ratio``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from refmodel.fast.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
