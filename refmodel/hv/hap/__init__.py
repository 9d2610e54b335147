"""Hardware-assisted paging: Intel EPT, the 2-D page walk, VPID-tagged TLBs.

- :mod:`.ept` – the EPT entry format, the EPT pointer, the hardware's EPT walk and
  its three outcomes (translation, EPT violation, EPT misconfiguration);
- :mod:`.tables` – the hypervisor building and editing a domain's EPT;
- :mod:`.nested` – the 2-D walk: the guest's walk with every GPA through EPT;
- :mod:`.mmu` – the processor with EPT: combined translations in the TLB;
- :mod:`.backend` – :class:`HapBackend`, the guest MMU interface on all of it;
- :mod:`.isolation` – :func:`hap_isolated`, the invariant.
"""

from .backend import HapBackend
from .ept import (
    EptCapabilities,
    EptFlag,
    EptMemType,
    EptMisconfiguration,
    Eptp,
    EptQualification,
    EptRights,
    EptTranslation,
    EptViolation,
    ept_walk,
)
from .isolation import hap_isolated
from .nested import CombinedTranslation, NestedWalkResult, nested_walk
from .tables import Ept, EptMapping

__all__ = [
    "CombinedTranslation",
    "Ept",
    "EptCapabilities",
    "EptFlag",
    "EptMapping",
    "EptMemType",
    "EptMisconfiguration",
    "EptQualification",
    "EptRights",
    "EptTranslation",
    "EptViolation",
    "Eptp",
    "HapBackend",
    "NestedWalkResult",
    "ept_walk",
    "hap_isolated",
    "nested_walk",
]
