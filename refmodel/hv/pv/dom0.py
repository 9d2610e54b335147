"""The state Xen's PV domain builder leaves dom0 in, for a model that starts where
a real boot does (xen/arch/x86/pv/dom0_build.c, ``dom0_construct_pv``).

The builder writes dom0's initial page tables itself and gives their frames their
types by hand rather than through validation: ``mark_pv_pt_pages_rdonly`` makes each
table ``PGT_lN_page_table | PGT_validated`` with a type count of 1, the top-level
table one more, pinned (``PGT_pinned``); ``v->arch.guest_table`` is that L4; every
frame the initial mapping maps read-write has a writable type reference
(``get_page_and_type(page, d, PGT_writable_page)``). The counts are exactly those
validating the L4 as the base (one reference per entry that names a table or maps a
frame writable) and pinning it would give, which is how the model gets there.
"""

from ...arch.types import MFN
from .errno import errno_name
from .mmuext import get_base_reference
from .pagetype import PageType
from .vcpu import PvVcpu
from ...errors import RefmodelError


def adopt_built_base(v: PvVcpu, l4: MFN) -> None:
    """Make ``l4`` (already written in memory) ``v``'s validated, pinned, loaded base,
    as the domain builder leaves it. The vCPU's CR3 is the caller's to set."""
    if v.guest_table is not None:
        raise RefmodelError(f"domain {v.domain.domid} already has a base table")
    rc = get_base_reference(v, l4)
    if rc:
        raise RefmodelError(f"mfn {l4:#x} does not validate as an L4 table: {errno_name(rc)}")
    v.guest_table = l4
    page = v.frames.info(l4)
    assert page.type is PageType.L4 and page.validated
    page.count += 1  # "Top-level p.t. is pinned": the pin's own reference
    page.pinned = True
