"""Control-register and MSR bits that affect paging (SDM Vol. 3A 2.5, 4.1).

Only the bits the paging model reads are named; the vCPU keeps the full register
values.
"""

import enum


class Cr0(enum.IntFlag):
    """CR0 bits (SDM 2.5)."""

    PE = 1 << 0  #: protection enable
    MP = 1 << 1
    EM = 1 << 2
    TS = 1 << 3
    ET = 1 << 4
    NE = 1 << 5
    WP = 1 << 16  #: write protect: supervisor writes honour R/W (SDM 4.6)
    AM = 1 << 18
    NW = 1 << 29
    CD = 1 << 30
    PG = 1 << 31  #: paging


class Cr4(enum.IntFlag):
    """CR4 bits (SDM 2.5)."""

    VME = 1 << 0
    PVI = 1 << 1
    TSD = 1 << 2
    DE = 1 << 3
    PSE = 1 << 4
    PAE = 1 << 5  #: physical-address extension, required by 4-level paging
    MCE = 1 << 6
    PGE = 1 << 7  #: global pages (SDM 4.10.2.4)
    PCE = 1 << 8
    OSFXSR = 1 << 9
    OSXMMEXCPT = 1 << 10
    UMIP = 1 << 11
    LA57 = 1 << 12  #: 5-level paging (not modelled: must stay 0)
    VMXE = 1 << 13
    SMXE = 1 << 14
    FSGSBASE = 1 << 16
    PCIDE = 1 << 17  #: process-context identifiers (SDM 4.10.1)
    OSXSAVE = 1 << 18
    SMEP = 1 << 20  #: supervisor-mode execution prevention (SDM 4.6)
    SMAP = 1 << 21  #: supervisor-mode access prevention (SDM 4.6)
    PKE = 1 << 22  #: protection keys (not modelled: must stay 0)


class Efer(enum.IntFlag):
    """IA32_EFER (MSR C000_0080H) bits (SDM 2.2.1)."""

    SCE = 1 << 0
    LME = 1 << 8  #: long mode enable
    LMA = 1 << 10  #: long mode active (set by the processor)
    NXE = 1 << 11  #: execute-disable enable: XD bits are honoured (SDM 4.6)


class Rflags(enum.IntFlag):
    """RFLAGS bits the paging model reads."""

    FIXED1 = 1 << 1  #: reserved, always 1
    AC = 1 << 18  #: alignment check / access control: lifts SMAP for explicit accesses


MSR_EFER = 0xC0000080

#: CR3 bit 63 with CR4.PCIDE = 1: "do not invalidate" (SDM 4.10.4.1).
CR3_NOFLUSH = 1 << 63
#: CR3 bits 11:0 hold the current PCID when CR4.PCIDE = 1 (SDM 4.10.1).
CR3_PCID_MASK = 0xFFF
