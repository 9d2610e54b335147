"""Build a backend for a mode by name — the one place that knows every mode.

``ModeSpec`` names a column of ``refmodel compare``: a mode plus its knobs (PV batch
size, tagged TLB or not).
"""

from dataclasses import dataclass

from ..errors import RefmodelError
from ..guest.ops import MmuBackend, Mode
from .machine import Machine
from .native import NativeBackend

#: Guest memory of every domain the scenarios build, in 4 KiB frames.
GUEST_FRAMES = 6144


@dataclass(frozen=True)
class ModeSpec:
    """One configuration to run a workload under."""

    mode: Mode
    batch_size: int = 32  #: PV only: requests per hypercall (1 = unbatched)
    tagged: bool = True  #: VPID-tagged TLB (hypervisor modes); PCIDs for native
    large_ept: bool = True  #: HAP only: EPT with 2 MiB / 1 GiB pages where the P2M allows

    @property
    def label(self) -> str:
        if self.mode is Mode.PV:
            return "pv unbatched" if self.batch_size == 1 else f"pv batched ({self.batch_size})"
        if self.mode is Mode.HAP and not self.large_ept:
            return "hap, 4K EPT"
        return str(self.mode.value)


def standard_specs(batch_size: int = 32, tagged: bool = True) -> list[ModeSpec]:
    """The six columns of the seed comparison."""
    return [
        ModeSpec(Mode.NATIVE, tagged=tagged),
        ModeSpec(Mode.SHADOW, tagged=tagged),
        ModeSpec(Mode.SHADOW_OOS, tagged=tagged),
        ModeSpec(Mode.PV, batch_size=1, tagged=tagged),
        ModeSpec(Mode.PV, batch_size=batch_size, tagged=tagged),
        ModeSpec(Mode.HAP, tagged=tagged),
    ]


def compare_specs(batch_size: int = 32, tagged: bool = True) -> list[ModeSpec]:
    """The rows of ``refmodel compare``: the six columns, and HAP with 4 KiB EPT pages
    beside HAP with large ones."""
    return standard_specs(batch_size, tagged) + [ModeSpec(Mode.HAP, tagged=tagged, large_ept=False)]


def build_backend(spec: ModeSpec, machine: Machine | None = None, domid: int = 1, nr_frames: int = GUEST_FRAMES) -> MmuBackend:
    """A fresh backend for ``spec``; hypervisor modes get a domain on ``machine``
    (a new machine if none is given)."""
    if spec.batch_size < 1:
        raise RefmodelError(f"batch size must be at least 1, got {spec.batch_size}")
    if spec.mode is Mode.NATIVE:
        return NativeBackend(nr_frames, pcids=spec.tagged)
    machine = machine if machine is not None else Machine()
    # HVM guests on HAP get their memory in aligned 2 MiB runs where free memory
    # allows, so that EPT can map it with large pages (Machine.populate_contiguous)
    domain = machine.create_domain(domid, nr_frames, contiguous=spec.mode is Mode.HAP)
    if spec.mode in (Mode.SHADOW, Mode.SHADOW_OOS):
        from .shadow.backend import ShadowBackend

        return ShadowBackend(machine, domain, tagged=spec.tagged, oos=spec.mode is Mode.SHADOW_OOS)
    if spec.mode is Mode.PV:
        from .pv.backend import PvBackend

        return PvBackend(machine, domain, batch_size=spec.batch_size, tagged=spec.tagged)
    from .hap.backend import HapBackend

    return HapBackend(machine, domain, tagged=spec.tagged, large_pages=spec.large_ept)
