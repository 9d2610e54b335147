"""The error numbers Xen's hypercalls return (xen/include/public/errno.h, which takes
them from Linux's asm-generic/errno-base.h and errno.h).

A hypercall returns 0 or a *negative* errno, exactly as Xen does: ``-EINVAL`` is
``-22``. :func:`neg` builds such a return; :func:`errno_name` prints one.
"""

import enum


class Errno(enum.IntEnum):
    """The errno values refmodel's PV hypercalls can return (errno.h, XEN_ERRNO)."""

    EPERM = 1  #: operation not permitted (XSM refusal, Xen-private L2 slot, foreign NEW_BASEPTR)
    ENOENT = 2
    ESRCH = 3  #: no such domain (get_pg_owner failed)
    ENOMEM = 12
    EACCES = 13  #: MMUEXT_FLUSH_CACHE without cache-flush permission
    EFAULT = 14  #: a guest buffer could not be read (copy_from_guest failed)
    EBUSY = 16  #: get_page_from_l1e could not take the references a mapping needs
    EEXIST = 17
    EINVAL = 22  #: invalid argument: bad flags, wrong page type, not the caller's frame
    ENOSYS = 38  #: unknown command or hypercall
    ERESTART = 85  #: a continuation (not modelled: hypercalls always run to completion)
    EOPNOTSUPP = 95  #: MMUEXT_[UN]MARK_SUPER


def neg(e: Errno) -> int:
    """A hypercall's error return: the negated errno (``neg(Errno.EINVAL) == -22``)."""
    return -int(e)


def errno_name(rc: int) -> str:
    """``0`` -> ``"0"``, ``-22`` -> ``"-EINVAL"``, anything else as a number."""
    if rc == 0:
        return "0"
    if rc < 0 and -rc in Errno._value2member_map_:
        return f"-{Errno(-rc).name}"
    return str(rc)
