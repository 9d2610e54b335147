"""``refmodel compare --plot FILE.png``: VM exits and estimated cycles against the
number of pages mapped, one line per mode (matplotlib, an optional extra:
``pip install 'refmodel[plot]'``).

Two panels on log-log axes: left, VM exits (PV's hypercalls drawn dashed, since a
PV guest has no VM exits but does enter the hypervisor); right, estimated cycles
from the cost table. Each point is the seed workload run afresh for that size.
"""

from dataclasses import dataclass
from pathlib import Path

from .account.costs import CostTable
from .account.events import Event
from .compare import run_workload, seed_workload
from .errors import RefmodelError
from .hv.modes import ModeSpec

SIZES = (1, 4, 16, 64, 256, 1024, 4096)


@dataclass(frozen=True)
class Series:
    label: str
    pages: tuple[int, ...]
    exits: tuple[int, ...]
    hypercalls: tuple[int, ...]
    cycles: tuple[float, ...]


def sweep(specs: list[ModeSpec], costs: CostTable, sizes: tuple[int, ...] = SIZES) -> list[Series]:
    """Run the seed workload for every size under every mode."""
    out = []
    for spec in specs:
        runs = [run_workload(spec, seed_workload(n)) for n in sizes]
        out.append(
            Series(
                spec.label,
                sizes,
                tuple(r.counters[Event.VM_EXIT] for r in runs),
                tuple(r.counters[Event.HYPERCALL] for r in runs),
                tuple(costs.cycles(r.counters) for r in runs),
            )
        )
    return out


def plot(series: list[Series], path: Path, title: str) -> None:
    """Draw the two panels into ``path`` (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RefmodelError("--plot needs matplotlib: pip install 'refmodel[plot]'") from None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    for s in series:
        if any(s.exits):
            left.plot(s.pages, [max(e, 0.8) for e in s.exits], marker="o", label=f"{s.label}: VM exits")
        if any(s.hypercalls):
            left.plot(s.pages, s.hypercalls, marker="s", linestyle="--", label=f"{s.label}: hypercalls")
        right.plot(s.pages, s.cycles, marker="o", label=s.label)
    silent = [s.label for s in series if not any(s.exits) and not any(s.hypercalls)]
    if silent:
        left.text(0.98, 0.02, f"zero exits and hypercalls: {', '.join(silent)}", transform=left.transAxes,
                  ha="right", va="bottom", fontsize=8)
    for ax, ylabel in ((left, "VM exits / hypercalls"), (right, "estimated cycles")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("pages mapped and touched")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    left.set_title("entries into the hypervisor")
    right.set_title("estimated cycles (cost table)")
    fig.suptitle(title)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as err:
        raise RefmodelError(f"cannot write plot {path}: {err.strerror}") from None
    finally:
        plt.close(fig)
