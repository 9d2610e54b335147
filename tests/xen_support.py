"""Whether the real-Xen tests can run here, and what to do when they cannot.

They need QEMU, Debian's Xen 4.17 and gcc. Outside CI a machine without them skips
the tests with one line saying how to install them; in CI (``CI`` set, as
``.ci/run`` runs) a missing package is a failure, so the differential test can never
silently stop running."""

import os

import pytest

from refmodel.oracle.xen.boot import available


def require_xen() -> None:
    """Skip (outside CI) or fail (in CI) unless Xen can be booted here."""
    reason = available()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the real-Xen tests: {reason}")
    pytest.skip(reason)
