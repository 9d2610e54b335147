"""The PV interface differential-tested against Xen 4.17: generated programs run on
real Xen (QEMU TCG) and on the model, compared operation by operation with the
oracle's rules (docs/xen-differential.md).

Every CI run checks ``CI_SEEDS`` programs of ``OPS_PER_PROGRAM`` operations (one Xen
boot each). ``REFMODEL_XEN_OPS=100000`` runs as many programs as that many
operations need (the documented long run); ``REFMODEL_XEN_SEED0`` moves the seeds.
A divergence writes the recorded trace, which ``refmodel check`` replays without
Xen, and names it in the failure."""

import os
from pathlib import Path

import pytest

from refmodel.oracle.xen.differential import run_seed, save_divergence

from xen_support import require_xen

OPS_PER_PROGRAM = 400
CI_SEEDS = 6  # 2,400 operations
TOTAL_OPS = int(os.environ.get("REFMODEL_XEN_OPS", CI_SEEDS * OPS_PER_PROGRAM))
SEED0 = int(os.environ.get("REFMODEL_XEN_SEED0", "0"))
SEEDS = range(SEED0, SEED0 + max(1, -(-TOTAL_OPS // OPS_PER_PROGRAM)))


@pytest.mark.parametrize("seed", SEEDS)
def test_xen_and_the_model_agree(seed: int, tmp_path: Path) -> None:
    require_xen()
    result = run_seed(seed, OPS_PER_PROGRAM)
    if not result.check.clean:
        where = save_divergence(result, os.environ.get("REFMODEL_XEN_DIVERGENCES", tmp_path))
        pytest.fail(f"{result.check.summary()}\nreplay: refmodel check {where}")
    assert result.operations >= OPS_PER_PROGRAM
    assert result.check.compared == result.operations
