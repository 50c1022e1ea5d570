"""The two libc calls Python 3.11's os module lacks: setns and prctl.

os.setns only arrived in Python 3.12, and PR_SET_CHILD_SUBREAPER has no
wrapper at all, so both go through ctypes. Errors come back as OSError with
the real errno, like the os module's own functions.
"""

from __future__ import annotations

import ctypes
import os

CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000

PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_libc.prctl.restype = ctypes.c_int


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def setns(fd: int, nstype: int) -> None:
    """Move the calling thread (net) or its future children (pid) into a namespace."""
    _check(_libc.setns(fd, nstype), "setns")


def set_child_subreaper(on: bool = True) -> None:
    _check(_libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")


def is_child_subreaper() -> bool:
    value = ctypes.c_int(0)
    addr = ctypes.addressof(value)
    _check(_libc.prctl(PR_GET_CHILD_SUBREAPER, addr, 0, 0, 0), "prctl(PR_GET_CHILD_SUBREAPER)")
    return value.value != 0
