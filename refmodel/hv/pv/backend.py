"""The PV backend: a guest kernel whose MMU operations are Xen hypercalls, as
Linux's Xen paravirt-ops make them (arch/x86/xen/mmu_pv.c, multicalls.c).

The guest runs directly on the machine's MMU, on page tables that hold *machine*
frame numbers (``pte_frame`` is the P2M lookup, ``entry_gfn`` the M2P). It reads its
page tables directly (they are mapped read-only), but every write is a request to
Xen, which validates it against the page types (:mod:`.pagetype`):

- ``write_pte`` is one ``MMU_NORMAL_PT_UPDATE`` request. Outside lazy MMU mode it is
  issued at once — one hypercall per write, the unbatched PV guest. In lazy mode
  (Linux ``xen_enter_lazy_mmu`` / ``xen_extend_mmu_update``) requests accumulate and
  go to Xen as one ``mmu_update`` of up to ``batch_size`` requests, when the batch
  is full and at ``lazy_end``.
- ``invlpg`` / ``flush_tlb`` are ``MMUEXT_INVLPG_LOCAL`` / ``MMUEXT_TLB_FLUSH_LOCAL``.
  In lazy mode they are deferred and merged: each batch is followed by one flush
  covering the invalidations asked for since the previous batch (INVLPG_LOCAL for a
  single page, TLB_FLUSH_LOCAL for more), and a batch with its flush goes to Xen as
  one multicall of two entries — one trap (Linux queues both in its multicall
  buffer, ``xen_mc_entry``).
- ``new_table`` of an L4 pins it (``MMUEXT_PIN_L4_TABLE``, as ``xen_pgd_pin``). Lower
  tables are typed when linked: the ``mmu_update`` that installs the L2/L3/L4 entry
  makes Xen validate them. (Linux with split PTE locks also pins each L1 in
  ``xen_alloc_ptpage``; without them an L1 "only stays typed as long as it is
  referenced by an L2 table" — the choice modelled here, which costs no hypercall.)
- ``load_cr3`` is ``MMUEXT_NEW_BASEPTR``.

``batch_size=1`` is the unbatched guest: lazy mode then has nothing to batch, so
every update and every invalidation is its own hypercall.

A hypercall that fails during a guest-kernel operation means the model is wrong (the
kernel only asks for valid updates): it raises :class:`PvHypercallFailed`.
"""

from collections import Counter

from ...account.events import Counters
from ...arch.access import AccessKind
from ...arch.fault import PageFault
from ...arch.mmu import Mmu
from ...arch.pte import Level
from ...arch.types import ENTRIES_PER_TABLE, ENTRY_SIZE, GFN, MFN, PAGE_SHIFT, PAGE_SIZE
from ...arch.vcpu import ArchState
from ...errors import RefmodelError
from ...guest.ops import MmuBackend, Mode
from ..machine import DOMID_SELF, Domain, Machine
from ..native import hardware_access
from .adjust import adjust_guest_entry
from .abi import BatchResult, Hypercall, MmuextCmd, MmuextOp, MmuUpdate, MulticallEntry
from .errno import errno_name
from .hypercall import mmu_update, mmuext_op, multicall
from .pagetype import PageType
from .vcpu import PvVcpu


class PvHypercallFailed(RuntimeError):
    """Xen refused a request the guest kernel made: a bug in the model."""


class PvBackend(MmuBackend):
    """A Xen PV guest: direct paging with validated, batched updates."""

    mode = Mode.PV

    def __init__(self, machine: Machine, domain: Domain, *, batch_size: int = 32, tagged: bool = True) -> None:
        if batch_size < 1:
            raise RefmodelError(f"batch size must be at least 1, got {batch_size}")
        if machine.domains.get(domain.domid) is not domain:
            raise RefmodelError(f"domain {domain.domid} does not belong to this machine")
        self.machine = machine
        self.domain = domain
        self.batch_size = batch_size
        #: Irrelevant for PV (no VM exits, nothing for a VPID to save); kept so that
        #: every hypervisor backend takes the same arguments.
        self.tagged = tagged
        self.counters: Counters = machine.counters
        self.vpid = domain.domid + 1
        self.vcpu = PvVcpu(machine, domain, self.vpid)
        #: Hypercalls by number, each multicall entry counted as its own call.
        self.calls: Counter[Hypercall] = Counter()
        #: mmuext_op commands issued, by command.
        self.mmuext_cmds: Counter[MmuextCmd] = Counter()
        #: mmu_update calls that carried at least one L1 (PTE) write.
        self.l1_update_calls = 0
        self._lazy_depth = 0
        self._queue: list[tuple[MmuUpdate, Level]] = []
        self._invlpgs: list[int] = []
        self._flush_all = False

    # -- the vCPU ---------------------------------------------------------------------------
    @property
    def mmu(self) -> Mmu:
        """The MMU the guest's accesses run on."""
        return self.vcpu.mmu

    @property
    def guest_state(self) -> ArchState:
        """The guest's vCPU registers: a PV guest runs on the real ones, so CR3 holds
        the machine address of its current base table."""
        return self.vcpu.mmu.state

    @guest_state.setter
    def guest_state(self, state: ArchState) -> None:
        self.vcpu.mmu.state = state

    # -- frames --------------------------------------------------------------------------------
    def _mfn(self, gfn: GFN) -> MFN:
        mfn = self.domain.mfn_of(gfn)
        if mfn is None:
            raise RefmodelError(f"domain {self.domain.domid}: gfn {gfn:#x} is not populated")
        return mfn

    def _maddr(self, table: GFN, index: int) -> int:
        if not 0 <= index < ENTRIES_PER_TABLE:
            raise RefmodelError(f"entry index {index} is outside 0..{ENTRIES_PER_TABLE - 1}")
        return (self._mfn(table) << PAGE_SHIFT) + index * ENTRY_SIZE

    def _data_frame(self, gfn: GFN) -> MFN:
        """A frame the kernel writes through its direct map: never a page table in
        use, which a PV guest can only map read-only."""
        mfn = self._mfn(gfn)
        page = self.vcpu.frames.info(mfn)
        if page.count and page.type is not PageType.WRITABLE:
            raise RefmodelError(f"gfn {gfn:#x} is a {page.type.value} in use: write it with write_pte")
        return mfn

    def read_frame_u64(self, gfn: GFN, offset: int) -> int:
        if not 0 <= offset <= PAGE_SIZE - ENTRY_SIZE:
            raise RefmodelError(f"offset {offset:#x} is outside a 4 KiB frame")
        return self.machine.mem.read_u64((self._mfn(gfn) << PAGE_SHIFT) + offset)

    def write_frame_u64(self, gfn: GFN, offset: int, value: int) -> None:
        if not 0 <= offset <= PAGE_SIZE - ENTRY_SIZE:
            raise RefmodelError(f"offset {offset:#x} is outside a 4 KiB frame")
        self.machine.mem.write_u64((self._data_frame(gfn) << PAGE_SHIFT) + offset, value)

    def copy_frame(self, src: GFN, dst: GFN) -> None:
        data = self.machine.mem.frame_bytes(self._mfn(src))
        self.machine.mem.load_frame(self._data_frame(dst), data)

    def pte_frame(self, gfn: GFN) -> int:
        return int(self._mfn(gfn))

    def entry_gfn(self, frame: int) -> GFN:
        gfn = self.machine.m2p.get(MFN(frame))
        if gfn is None or self.machine.owner_of(frame) != self.domain.domid:
            raise RefmodelError(f"mfn {frame:#x} is not a frame of domain {self.domain.domid}")
        return gfn

    # -- page tables ---------------------------------------------------------------------------
    def read_pte(self, table: GFN, index: int) -> int:
        maddr = self._maddr(table, index)
        if any(req.maddr == maddr for req, _ in self._queue):
            self._issue()  # the entry has a queued update: let it reach the table first
        return self.machine.mem.read_u64(maddr)

    def write_pte(self, table: GFN, index: int, level: Level, value: int) -> None:
        req = MmuUpdate.pt_update(self._maddr(table, index), value)
        if not self._batching:
            self._send_updates([(req, level)])
            return
        if len(self._queue) >= self.batch_size:
            self._issue()
        self._queue.append((req, level))

    def new_table(self, table: GFN, level: Level) -> None:
        mfn = self._mfn(table)
        if level is Level.L4:
            self._issue()
            self._send_mmuext(MmuextOp(MmuextCmd.PIN_L4_TABLE, mfn))

    def lazy_begin(self) -> None:
        self._lazy_depth += 1

    def lazy_end(self) -> None:
        if self._lazy_depth == 0:
            raise RefmodelError("lazy_end without lazy_begin")
        self._lazy_depth -= 1
        if self._lazy_depth == 0:
            self._issue()

    def stored_entry(self, entry: int, level: Level) -> int:
        """Xen rewrites every present entry it stores (``adjust_guest_lNe``)."""
        return adjust_guest_entry(entry, level)

    # -- the processor ---------------------------------------------------------------------------
    def load_cr3(self, root: GFN) -> None:
        mfn = self._mfn(root)
        self._issue()
        self._send_mmuext(MmuextOp(MmuextCmd.NEW_BASEPTR, mfn))

    def invlpg(self, va: int) -> None:
        if self._batching:
            self._invlpgs.append(va)
        else:
            self._send_mmuext(MmuextOp(MmuextCmd.INVLPG_LOCAL, va))

    def flush_tlb(self) -> None:
        if self._batching:
            self._flush_all = True
        else:
            self._send_mmuext(MmuextOp(MmuextCmd.TLB_FLUSH_LOCAL))

    def access(self, va: int, kind: AccessKind, cpl: int = 3, value: int = 0) -> int | PageFault:
        self._issue()
        return hardware_access(self.vcpu.mmu, va, kind, cpl, value)

    # -- batching ------------------------------------------------------------------------------------
    @property
    def _batching(self) -> bool:
        return self._lazy_depth > 0 and self.batch_size > 1

    def _merged_flush(self) -> MmuextOp | None:
        """The one flush that covers every invalidation deferred since the last batch."""
        pages = set(self._invlpgs)
        op: MmuextOp | None = None
        if self._flush_all or len(pages) > 1:
            op = MmuextOp(MmuextCmd.TLB_FLUSH_LOCAL)
        elif pages:
            op = MmuextOp(MmuextCmd.INVLPG_LOCAL, pages.pop())
        self._invlpgs, self._flush_all = [], False
        return op

    def _issue(self) -> None:
        """Send the queued updates, then their flush: one hypercall each, or one
        multicall carrying both."""
        updates, self._queue = self._queue, []
        flush = self._merged_flush()
        if updates and flush is not None:
            self._send_multicall(updates, flush)
        elif updates:
            self._send_updates(updates)
        elif flush is not None:
            self._send_mmuext(flush)

    def _note_updates(self, updates: list[tuple[MmuUpdate, Level]]) -> None:
        self.calls[Hypercall.MMU_UPDATE] += 1
        if any(level is Level.L1 for _, level in updates):
            self.l1_update_calls += 1

    def _send_updates(self, updates: list[tuple[MmuUpdate, Level]]) -> None:
        self._note_updates(updates)
        result = mmu_update(self.vcpu, [req for req, _ in updates])
        self._check(result, f"mmu_update of {len(updates)} request(s)", len(updates))

    def _send_mmuext(self, op: MmuextOp) -> None:
        self.calls[Hypercall.MMUEXT_OP] += 1
        self.mmuext_cmds[MmuextCmd(op.cmd)] += 1
        self._check(mmuext_op(self.vcpu, [op]), f"mmuext_op {MmuextCmd(op.cmd).name}", 1)

    def _send_multicall(self, updates: list[tuple[MmuUpdate, Level]], flush: MmuextOp) -> None:
        self.calls[Hypercall.MULTICALL] += 1
        self._note_updates(updates)
        self.calls[Hypercall.MMUEXT_OP] += 1
        self.mmuext_cmds[MmuextCmd(flush.cmd)] += 1
        reqs = tuple(req for req, _ in updates)
        out = multicall(
            self.vcpu,
            [
                MulticallEntry(Hypercall.MMU_UPDATE, args=(reqs, len(reqs), 0, DOMID_SELF)),
                MulticallEntry(Hypercall.MMUEXT_OP, args=((flush,), 1, 0, DOMID_SELF)),
            ],
        )
        for entry, what in zip(out.entries, ("mmu_update", f"mmuext_op {MmuextCmd(flush.cmd).name}")):
            if out.rc or entry.result:
                raise PvHypercallFailed(
                    f"domain {self.domain.domid}: multicall {what} returned {errno_name(out.rc or entry.result)}"
                )

    def _check(self, result: BatchResult, what: str, count: int) -> None:
        if result.rc or result.done != count:
            raise PvHypercallFailed(
                f"domain {self.domain.domid}: {what} returned {errno_name(result.rc)} "
                f"after {result.done} of {count} done"
            )
