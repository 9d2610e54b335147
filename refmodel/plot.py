"""``refmodel compare --plot FILE.png``: every scenario of ``refmodel compare`` swept
over its size, one line per mode (matplotlib, an optional extra:
``pip install 'refmodel[plot]'``).

Three columns, one per scenario — pages mapped and touched (the seed), live pages
remapped, vCPU switch rounds (untagged TLB: every switch flushes) — and three rows on
log axes: entries into the hypervisor (VM exits, and PV's hypercalls, which are
entries without an exit), estimated cycles from the cost table, and those cycles as
a multiple of native's (which pulls apart the modes that lie close together on the
cycles axis). A mode has one
colour, one marker and one line style in every panel. Modes whose points coincide
(shadow-oos and pv unbatched in the remap scenario's entries, the two PV rows in the
switch scenario) stay visible: each mode's points are shifted sideways by a few
percent, and the markers differ. A count of 0 cannot sit on a log axis; it is drawn
at 0.5, below the axis label "0".

Where HAP starts costing more than PV batched, each panel says why
(:func:`crossover` finds the point, :data:`WHY` gives the reason):

- pages mapped: up to 1024 pages HAP costs less (a 2-D walk per TLB miss is cheaper
  than a validated ``mmu_update`` per entry), but from 2048 pages the buffer
  outgrows the TLB (1536 entries), the read pass misses again, and HAP pays a second
  2-D walk per page: with 4 KiB EPT pages (24 references) that overtakes PV batched;
  with 2 MiB EPT pages (19) HAP stays just below it;
- pages remapped: HAP, like native, invalidates each remapped page with its own
  INVLPG, while PV batched sends one flush per 32-entry batch; from 16 pages the
  flushes outweigh PV's hypercalls.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .account.costs import CostTable
from .account.events import Event
from .compare import RunResult, remap_setup, remap_workload, run_switch, run_workload, seed_workload
from .errors import RefmodelError
from .guest.kernel import PteFlavour
from .hv.modes import ModeSpec
from .progress import Progress

SIZES = (1, 4, 16, 64, 256, 1024, 2048, 4096)
#: The remap scenario needs two frames per page: up to 2048 pages fit a guest.
REMAP_SIZES = (1, 4, 16, 64, 256, 1024, 2048)
ROUNDS = (1, 2, 4, 8, 16)
#: Working set of the switch sweep, as ``refmodel compare`` uses it.
SWITCH_WORKING_SET = 256
#: A count of zero is drawn here, below 1, on the log axes.
ZERO = 0.5

#: One style per mode label: (colour, marker, line style). Used in every panel.
STYLES: dict[str, tuple[str, str, str]] = {
    "native": ("black", "o", "-"),
    "shadow": ("tab:red", "s", "-"),
    "shadow-oos": ("tab:orange", "D", "--"),
    "pv unbatched": ("tab:purple", "v", ":"),
    "hap": ("tab:green", "^", "-"),
    "hap, 4K EPT": ("tab:olive", "P", "--"),
}
#: PV batched's label carries its batch size.
PV_BATCHED_STYLE = ("tab:blue", "X", "-.")


def style_of(label: str) -> tuple[str, str, str]:
    return STYLES.get(label, PV_BATCHED_STYLE)


@dataclass(frozen=True)
class Series:
    """One mode in one scenario: per x value, entries into the hypervisor and cycles."""

    label: str
    xs: tuple[int, ...]
    exits: tuple[int, ...]
    hypercalls: tuple[int, ...]
    cycles: tuple[float, ...]

    @property
    def entries(self) -> tuple[int, ...]:
        """VM exits plus hypercalls: every entry into the hypervisor."""
        return tuple(e + h for e, h in zip(self.exits, self.hypercalls))


@dataclass(frozen=True)
class Scenario:
    """One column of the figure."""

    title: str
    xlabel: str
    series: list[Series]
    why: str = ""  #: why HAP comes to cost more than PV batched ({x}: where), if it does


#: The reasons for the crossovers, per scenario (module docstring).
WHY = {
    "mapped": "{hap} costs more than {pv}\nfrom {x} pages: the buffer outgrows the TLB\n"
    "(1536 entries), every read misses again:\na second 2-D walk per page",
    "remapped": "{hap} costs more than {pv}\nfrom {x} pages: an INVLPG per page (HAP, as\n"
    "native) against one flush per 32-entry batch",
}


def _series(
    spec: ModeSpec, xs: tuple[int, ...], run: Callable[[int], RunResult], costs: CostTable,
    bar: Progress | None = None,
) -> Series:
    runs: list[RunResult] = []
    for x in xs:
        if bar is not None:
            bar.doing(f"{spec.label}, {x}")
        runs.append(run(x))
        if bar is not None:
            bar.step()
    return Series(
        spec.label,
        xs,
        tuple(r.counters[Event.VM_EXIT] for r in runs),
        tuple(r.counters[Event.HYPERCALL] for r in runs),
        tuple(costs.cycles(r.counters) for r in runs),
    )


def seed_runner(spec: ModeSpec, flavour: PteFlavour) -> Callable[[int], RunResult]:
    def run(pages: int) -> RunResult:
        return run_workload(spec, seed_workload(pages), None, flavour)

    return run


def remap_runner(spec: ModeSpec, flavour: PteFlavour) -> Callable[[int], RunResult]:
    def run(pages: int) -> RunResult:
        return run_workload(spec, remap_workload(pages), remap_setup(pages), flavour)

    return run


def switch_runner(spec: ModeSpec, flavour: PteFlavour, working_set: int) -> Callable[[int], RunResult]:
    def run(rounds: int) -> RunResult:
        return run_switch(spec, working_set, rounds, flavour)

    return run


def sweep(
    specs: list[ModeSpec], costs: CostTable, sizes: tuple[int, ...] = SIZES, flavour: PteFlavour = PteFlavour.LINUX,
    bar: Progress | None = None,
) -> list[Series]:
    """The seed workload for every size under every mode (``bar``: told each point)."""
    return [_series(s, sizes, seed_runner(s, flavour), costs, bar) for s in specs]


def sweep_all(
    specs: list[ModeSpec],
    switch_specs: list[ModeSpec],
    costs: CostTable,
    sizes: tuple[int, ...] = SIZES,
    remap_sizes: tuple[int, ...] = REMAP_SIZES,
    rounds: tuple[int, ...] = ROUNDS,
    flavour: PteFlavour = PteFlavour.LINUX,
    working_set: int = SWITCH_WORKING_SET,
    bar: Progress | None = None,
) -> list[Scenario]:
    """Every scenario of ``refmodel compare`` over its size: pages mapped, pages
    remapped, and switch rounds (``switch_specs``, normally untagged). ``bar`` is
    told each point (:func:`points` of them)."""
    mapped = sweep(specs, costs, sizes, flavour, bar)
    remap = [_series(s, remap_sizes, remap_runner(s, flavour), costs, bar) for s in specs]
    switch = [_series(s, rounds, switch_runner(s, flavour, working_set), costs, bar) for s in switch_specs]
    return [
        Scenario("malloc N pages, write + read each", "pages mapped and touched", mapped, WHY["mapped"]),
        Scenario("remap N live pages, read each", "pages remapped", remap, WHY["remapped"]),
        Scenario(f"2 domains, {working_set}-page working sets, untagged TLB", "switch rounds", switch),
    ]


def points(
    specs: list[ModeSpec], switch_specs: list[ModeSpec], sizes: tuple[int, ...] = SIZES,
    remap_sizes: tuple[int, ...] = REMAP_SIZES, rounds: tuple[int, ...] = ROUNDS,
) -> int:
    """How many runs :func:`sweep_all` makes: one per plotted point."""
    return len(specs) * (len(sizes) + len(remap_sizes)) + len(switch_specs) * len(rounds)


def crossover(a: Series, b: Series) -> int | None:
    """The first x at which ``a`` costs more than ``b`` after costing less at the
    previous x (None if it never does)."""
    for i in range(1, len(a.xs)):
        if a.cycles[i - 1] <= b.cycles[i - 1] and a.cycles[i] > b.cycles[i]:
            return a.xs[i]
    return None


def _shifted(xs: tuple[int, ...], index: int, count: int) -> list[float]:
    """``xs`` moved sideways by a few percent per mode, so coinciding points of
    different modes sit next to each other instead of on top."""
    factor = 1.0 + 0.06 * (index - (count - 1) / 2)
    return [x * factor for x in xs]


def require_matplotlib() -> None:
    """Raise the one-line :class:`RefmodelError` that ``--plot`` needs matplotlib,
    if it cannot be imported (``refmodel compare`` asks before computing anything)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RefmodelError("--plot needs matplotlib: pip install 'refmodel[plot]'") from None


def plot(scenarios: list[Scenario], path: Path, title: str) -> None:
    """Draw every scenario into ``path``: a column each, entries into the hypervisor
    above, estimated cycles below. The image format is the suffix's (png, svg, pdf)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(3, len(scenarios), figsize=(6 * len(scenarios), 13), squeeze=False)
    handles: dict[str, Any] = {}  #: one line per mode for the shared legend
    for col, scenario in enumerate(scenarios):
        top, bottom, ratio = axes[0][col], axes[1][col], axes[2][col]
        native = next((s for s in scenario.series if s.label == "native"), None)
        for i, s in enumerate(scenario.series):
            colour, marker, line = style_of(s.label)
            xs = _shifted(s.xs, i, len(scenario.series))
            kw = dict(color=colour, marker=marker, linestyle=line, markersize=6, linewidth=1.4, alpha=0.9)
            top.plot(xs, [e if e else ZERO for e in s.entries], **kw)
            (h,) = bottom.plot(xs, s.cycles, label=s.label, **kw)
            if native is not None and all(native.cycles):
                ratio.plot(xs, [c / n for c, n in zip(s.cycles, native.cycles)], **kw)
            handles.setdefault(s.label, h)
        top.set_title(scenario.title)
        top.set_ylabel("VM exits + hypercalls")
        bottom.set_ylabel("estimated cycles (cost table)")
        ratio.set_ylabel("estimated cycles / native's")
        for ax in (top, bottom, ratio):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(scenario.xlabel)
            ax.grid(True, which="both", alpha=0.3)
        top.set_ylim(bottom=ZERO * 0.7)
        top.axhline(ZERO, color="grey", linewidth=0.6)
        top.annotate("0", xy=(0, ZERO), xycoords=("axes fraction", "data"), xytext=(-12, 0),
                     textcoords="offset points", va="center", fontsize=8, color="grey")
        _mark_crossover(bottom, scenario)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles), fontsize=10)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.035, 1, 0.97))
    try:
        fig.savefig(path, dpi=100, format=path.suffix.lstrip(".").lower() or "png")
    except OSError as err:
        raise RefmodelError(f"cannot write plot {path}: {err.strerror}") from None
    except ValueError as err:  # a suffix matplotlib has no writer for
        raise RefmodelError(f"cannot write plot {path}: {err}") from None
    finally:
        plt.close(fig)


def _mark_crossover(ax: object, scenario: Scenario) -> None:
    """Annotate where the first HAP row (large EPT pages, then 4 KiB ones) that does
    so starts costing more than PV batched, with the scenario's reason."""
    by_label = {s.label: s for s in scenario.series}
    pv = next((s for label, s in by_label.items() if label.startswith("pv batched")), None)
    if pv is None or not scenario.why:
        return
    for name in ("hap", "hap, 4K EPT"):
        hap = by_label.get(name)
        x = crossover(hap, pv) if hap is not None else None
        if hap is None or x is None:
            continue
        y = hap.cycles[hap.xs.index(x)]
        getattr(ax, "annotate")(
            scenario.why.format(hap=name, pv=pv.label, x=x),
            xy=(x, y), xytext=(0.03, 0.78), textcoords="axes fraction", fontsize=8,
            arrowprops=dict(arrowstyle="->", color="grey"),
        )
        return
