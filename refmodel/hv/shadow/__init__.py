"""Shadow paging with trap-and-emulate, and its out-of-sync variant.

- :mod:`.backend` – :class:`ShadowBackend`, the guest-facing operations, VM exits and
  the #PF intercept;
- :mod:`.propagate` – how a guest entry becomes a shadow entry (Xen ``_sh_propagate``);
- :mod:`.tables` – shadow tables in hypervisor frames and the reverse map;
- :mod:`.oos` – out-of-sync L1 tables, snapshots and resync rules;
- :mod:`.guest` – the guest's tables seen through the P2M;
- :mod:`.audit` – :func:`shadow_sound`, the soundness predicate tests check.
"""

from .audit import shadow_sound
from .backend import ShadowBackend

__all__ = ["ShadowBackend", "shadow_sound"]
