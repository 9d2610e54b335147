"""The numbers and names a trace uses, as the tables of ``docs/oracle.md``.

An implementation in another language needs them without reading Python: the
counter names and what each counts, the #PF error-code bits, Xen's PV hypercall
numbers and the ``mmu_update`` / ``mmuext_op`` / ``update_va_mapping`` command and
flag numbers, and the errno values hypercalls return. Each table is made here from
the enums the model itself uses (:class:`~refmodel.account.events.Event`,
:class:`~refmodel.arch.fault.PfErrorCode`, :mod:`refmodel.hv.pv.abi`,
:class:`~refmodel.hv.pv.errno.Errno`), and a test keeps the document's copy equal to
what :func:`markdown_tables` prints, so the two cannot drift apart.

``python -m refmodel.oracle.tables`` prints them.
"""

from collections.abc import Callable, Sequence

from ..account.events import counter_meanings
from ..arch.fault import PfErrorCode
from ..hv.pv.abi import MMU_CMD_MASK, Hypercall, MmuCmd, MmuextCmd, Uvmf
from ..hv.pv.errno import Errno

#: What each #PF error-code bit means when set (SDM Vol. 3A 4.7, Figure 4-12).
PF_BIT_MEANINGS: dict[PfErrorCode, str] = {
    PfErrorCode.P: "0: the page was not present; 1: a protection violation (or a reserved bit)",
    PfErrorCode.W: "the access was a write (0: a read or a fetch)",
    PfErrorCode.U: "the access was a user-mode access (CPL 3, not an implicit supervisor access)",
    PfErrorCode.RSVD: "a reserved bit was set in some paging-structure entry",
    PfErrorCode.I: "an instruction fetch (reported only with EFER.NXE = 1 or CR4.SMEP = 1)",
    PfErrorCode.PK: "a protection-key violation (never set: not modelled)",
    PfErrorCode.SS: "a shadow-stack access (never set: not modelled)",
}

#: The trace operation of each hypercall number (None: a hypercall traces do not carry).
HYPERCALL_OPS: dict[Hypercall, str | None] = {
    Hypercall.MMU_UPDATE: "mmu_update",
    Hypercall.MULTICALL: "multicall",
    Hypercall.UPDATE_VA_MAPPING: "update_va_mapping",
    Hypercall.UPDATE_VA_MAPPING_OTHERDOMAIN: None,
    Hypercall.MMUEXT_OP: "mmuext_op",
}

#: What each ``mmu_update`` command does (``ptr & 7``).
MMU_CMD_MEANINGS: dict[MmuCmd, str] = {
    MmuCmd.NORMAL_PT_UPDATE: "checked `*ptr = val`; `ptr` is the machine address of a page-table entry",
    MmuCmd.MACHPHYS_UPDATE: "the M2P entry of machine frame `ptr >> 12` := `val`",
    MmuCmd.PT_UPDATE_PRESERVE_AD: "as 0, keeping the entry's A and D bits: `*ptr = val | (*ptr & (A|D))`",
    MmuCmd.PT_UPDATE_NO_TRANSLATE: "as 0 (`val` is never translated; the same for a PV guest)",
}

#: What each ``mmuext_op`` command does and which arguments it reads.
MMUEXT_MEANINGS: dict[MmuextCmd, str] = {
    MmuextCmd.PIN_L1_TABLE: "pin frame `arg1` (an MFN) as an L1 table",
    MmuextCmd.PIN_L2_TABLE: "pin frame `arg1` as an L2 table",
    MmuextCmd.PIN_L3_TABLE: "pin frame `arg1` as an L3 table",
    MmuextCmd.PIN_L4_TABLE: "pin frame `arg1` as an L4 table",
    MmuextCmd.UNPIN_TABLE: "unpin frame `arg1`",
    MmuextCmd.NEW_BASEPTR: "load the kernel page-table base: L4 frame `arg1`",
    MmuextCmd.TLB_FLUSH_LOCAL: "flush this vCPU's TLB",
    MmuextCmd.INVLPG_LOCAL: "invalidate linear address `arg1` in this vCPU's TLB",
    MmuextCmd.TLB_FLUSH_MULTI: "flush the TLBs of the vCPUs in the bitmap `arg2` points to",
    MmuextCmd.INVLPG_MULTI: "invalidate `arg1` in the TLBs of the vCPUs in the bitmap `arg2` points to",
    MmuextCmd.TLB_FLUSH_ALL: "flush the TLBs of every vCPU of the domain",
    MmuextCmd.INVLPG_ALL: "invalidate `arg1` in every vCPU's TLB",
    MmuextCmd.FLUSH_CACHE: "write back and invalidate this CPU's caches (-EACCES without permission)",
    MmuextCmd.SET_LDT: "set the LDT: linear address `arg1`, `arg2` entries (its low 32 bits)",
    MmuextCmd.NEW_USER_BASEPTR: "load the user page-table base: L4 frame `arg1` (0: none)",
    MmuextCmd.CLEAR_PAGE: "zero frame `arg1`",
    MmuextCmd.COPY_PAGE: "copy frame `arg2` to frame `arg1`",
    MmuextCmd.FLUSH_CACHE_GLOBAL: "write back and invalidate every CPU's caches (-EACCES without permission)",
    MmuextCmd.MARK_SUPER: "mark a superpage (-EOPNOTSUPP, as in Xen 4.17)",
    MmuextCmd.UNMARK_SUPER: "unmark a superpage (-EOPNOTSUPP, as in Xen 4.17)",
}

#: What each ``update_va_mapping`` flag value means (``flags & 3``, then the rest).
UVMF_MEANINGS: dict[str, str] = {
    "NONE": "`flags & 3` = 0: no flush",
    "TLB_FLUSH": "`flags & 3` = 1: flush the entire TLB(s)",
    "INVLPG": "`flags & 3` = 2: invalidate only the entry for `va`",
    "FLUSHTYPE_MASK": "the flush-type field, `flags & 3`: 3 flushes nothing, as 0 does",
    "LOCAL": "`flags & ~3` = 0: this vCPU's TLB (also spelt MULTI with a NULL bitmap)",
    "ALL": "`flags & ~3` = 4: every vCPU's TLB; any other value points to a vCPU bitmap (-EFAULT if unreadable)",
}

#: When the model's PV hypercalls return each errno (``ret`` = minus the number).
ERRNO_MEANINGS: dict[Errno, str] = {
    Errno.EPERM: "not permitted: a Xen-private L2 slot, a foreign NEW_BASEPTR, an XSM refusal",
    Errno.ENOENT: "no such entry",
    Errno.ESRCH: "no such domain (`foreigndom`)",
    Errno.ENOMEM: "out of memory",
    Errno.EACCES: "MMUEXT_FLUSH_CACHE(_GLOBAL) without cache-flush permission",
    Errno.EFAULT: "a guest buffer could not be read (a count beyond the array)",
    Errno.EBUSY: "the references a mapping needs could not be taken",
    Errno.EEXIST: "already exists",
    Errno.EINVAL: "invalid argument: bad flags, a wrong page type, not the caller's frame, INVALID_MFN",
    Errno.ENOSYS: "an unknown command or hypercall (`mmu_update` commands 4-7, `mmuext_op` 14)",
    Errno.ERESTART: "a continuation (never returned: hypercalls run to completion in the model)",
    Errno.EOPNOTSUPP: "MMUEXT_MARK_SUPER, MMUEXT_UNMARK_SUPER",
}


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def counters_table() -> str:
    return _table(("counter", "what it counts"), [(f"`{n}`", m) for n, m in counter_meanings().items()])


def pf_error_code_table() -> str:
    rows = [(str(bit.bit_length() - 1), f"{int(bit):#04x}", bit.name or "", PF_BIT_MEANINGS[bit]) for bit in PfErrorCode]
    return _table(("bit", "value", "name", "meaning when set"), rows)


def hypercall_table() -> str:
    rows = [(str(int(h)), f"`__HYPERVISOR_{(h.name or '').lower()}`", f"`{HYPERCALL_OPS[h]}`" if HYPERCALL_OPS[h]
             else "(not a trace operation)") for h in Hypercall]
    return _table(("number", "hypercall (xen.h)", "trace `op`"), rows)


def mmu_cmd_table() -> str:
    rows = [(str(int(c)), f"`MMU_{c.name}`", MMU_CMD_MEANINGS[c]) for c in MmuCmd]
    rows.append((f"{len(MmuCmd)}-{MMU_CMD_MASK}", "(none)", "refused with -ENOSYS"))
    return _table(("`ptr & 7`", "command", "meaning"), rows)


def mmuext_table() -> str:
    rows = [(str(int(c)), f"`MMUEXT_{c.name}`", MMUEXT_MEANINGS[c]) for c in MmuextCmd]
    return _table(("`cmd`", "command", "meaning"), rows)


def uvmf_table() -> str:
    rows = [(str(int(Uvmf[name])), f"`UVMF_{name}`", meaning) for name, meaning in UVMF_MEANINGS.items()]
    return _table(("value", "flag", "meaning"), rows)


def errno_table() -> str:
    rows = [(str(-int(e)), f"`-{e.name}`", ERRNO_MEANINGS[e]) for e in Errno]
    return _table(("`ret`", "name", "when"), rows)


#: Every table, by the heading it has in docs/oracle.md.
TABLES: dict[str, Callable[[], str]] = {
    "Counters": counters_table,
    "#PF error code": pf_error_code_table,
    "PV hypercall numbers": hypercall_table,
    "`mmu_update` commands": mmu_cmd_table,
    "`mmuext_op` commands": mmuext_table,
    "`update_va_mapping` flags": uvmf_table,
    "Hypercall return values": errno_table,
}


def markdown_tables() -> str:
    """Every table under its heading, as docs/oracle.md has them."""
    return "\n".join(f"#### {title}\n\n{make()}" for title, make in TABLES.items())


if __name__ == "__main__":
    print(markdown_tables(), end="")
