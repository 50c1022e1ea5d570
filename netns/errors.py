"""The exceptions of the netns package, rooted in one base class.

Callers that only want to know "the pod network could not be set up" catch
`NetnsError`; the subclasses say which part failed, and every message names
the object involved and what to do about it.
"""

from __future__ import annotations


class NetnsError(Exception):
    """Base class of every error raised by the netns package."""


class NamespaceError(NetnsError):
    """A namespace file could not be opened or entered."""


class LockError(NetnsError):
    """A lock under the run directory could not be taken in time."""


class PodNameError(NetnsError, ValueError):
    """A pod name is not a valid DNS-label-like name."""


class PodError(NetnsError):
    """A pod network could not be created or torn down."""


class PodExistsError(PodError):
    """A pod of that name already exists on this host."""


class BridgeError(PodError):
    """The shared host bridge could not be created or used."""


class IpamError(PodError):
    """No pod address could be allocated, or the lease store is unusable."""


class PauseError(PodError):
    """The pause process could not be started or found."""


class SpawnError(NetnsError):
    """A process could not be started inside a pod.

    `errno` is set when the failure is an OS error of the new process (for
    example ENOENT when the command does not exist), else None.
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class NftError(NetnsError):
    """libnftables refused a command; the message carries nft's own text."""
