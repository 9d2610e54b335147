"""Exceptions the paging hardware delivers, as values (SDM Vol. 3A 4.7, and 6.15
for #GP on a non-canonical address).
"""

import enum
from dataclasses import dataclass

from .access import Access, AccessKind
from .control import Cr4, Efer


class PfErrorCode(enum.IntFlag):
    """Page-fault error code bits (SDM 4.7, Figure 4-12)."""

    P = 1 << 0  #: 0: not-present page; 1: protection violation (or reserved bit)
    W = 1 << 1  #: the access was a write
    U = 1 << 2  #: the access was a user-mode access
    RSVD = 1 << 3  #: a reserved bit was set in some paging-structure entry
    I = 1 << 4  #: instruction fetch (only reported when NX or SMEP is on, below)
    PK = 1 << 5  #: protection-key violation (not modelled)
    SS = 1 << 6  #: shadow-stack access (not modelled)


class FaultCause(enum.Enum):
    """Why a walk faulted: not part of the architecture, but what a reader wants."""

    NOT_PRESENT = "not-present"
    RESERVED_BIT = "reserved-bit"
    WRITE_PROTECT = "write-protect"
    USER_SUPERVISOR = "user-supervisor"
    EXECUTE_DISABLE = "execute-disable"
    SMEP = "smep"
    SMAP = "smap"


@dataclass(frozen=True)
class PageFault:
    """#PF (vector 14): CR2 receives the linear address, the error code is pushed."""

    cr2: int
    error_code: PfErrorCode
    cause: FaultCause

    VECTOR = 14


@dataclass(frozen=True)
class GeneralProtection:
    """#GP (vector 13), e.g. a non-canonical linear address (SDM 3.3.7.1)."""

    reason: str
    error_code: int = 0

    VECTOR = 13


def fetch_reports_id(cr4: int, efer: int) -> bool:
    """SDM 4.7: the I/D flag is 1 only if the access was an instruction fetch *and*
    either CR4.SMEP = 1, or CR4.PAE = 1 and IA32_EFER.NXE = 1."""
    return bool(cr4 & Cr4.SMEP) or (bool(cr4 & Cr4.PAE) and bool(efer & Efer.NXE))


def error_code_for(access: Access, present: bool, rsvd: bool, cr4: int, efer: int) -> PfErrorCode:
    """Assemble the page-fault error code (SDM 4.7).

    - P: 0 if the fault was caused by a not-present entry, else 1 (a reserved-bit
      fault is detected only in a present entry, so it has P = 1);
    - W/R: the access was a write; U/S: it was a user-mode access;
    - RSVD: a reserved bit was set; I/D: see :func:`fetch_reports_id`.
    """
    code = PfErrorCode(0)
    if present:
        code |= PfErrorCode.P
    if access.kind is AccessKind.WRITE:
        code |= PfErrorCode.W
    if access.user:
        code |= PfErrorCode.U
    if rsvd:
        code |= PfErrorCode.RSVD
    if access.kind is AccessKind.FETCH and fetch_reports_id(cr4, efer):
        code |= PfErrorCode.I
    return code
