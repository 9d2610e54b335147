"""What an access is: a read, a write or an instruction fetch, by supervisor or user
mode (SDM Vol. 3A 4.6: "every access to a linear address is either a
supervisor-mode access or a user-mode access").
"""

import enum
from dataclasses import dataclass


class AccessKind(enum.Enum):
    """The three kinds of access the access-rights rules of SDM 4.6 distinguish."""

    READ = "read"
    WRITE = "write"
    FETCH = "fetch"


@dataclass(frozen=True)
class Access:
    """One access by the processor to a linear address.

    ``cpl`` 3 makes it a user-mode access; 0-2 a supervisor-mode one (SDM 4.6).
    ``implicit`` marks an implicit supervisor-mode access (e.g. to a descriptor
    table), which SMAP checks regardless of RFLAGS.AC (SDM 4.6).
    """

    kind: AccessKind
    cpl: int = 0
    implicit: bool = False

    @property
    def user(self) -> bool:
        """A user-mode access: CPL 3 and not an implicit supervisor access."""
        return self.cpl == 3 and not self.implicit
