"""Exceptions raised by apt_hal. Every message names the argument or backend at fault and what was expected."""


class AptHalError(Exception):
    """Base class of every apt_hal error."""


class ContractError(AptHalError, ValueError):
    """An argument violates an op contract (shape, dtype, device, layout or value)."""


class BackendError(AptHalError):
    """A backend cannot be used: its name is unknown, or it cannot run here.

    Catch this one around ``apt_hal.use(...)`` (or a first op call under ``APT_HAL_BACKEND``):
    it covers both :class:`UnknownBackendError` and :class:`BackendUnavailableError`.
    """


class BackendUnavailableError(BackendError, RuntimeError):
    """A backend was chosen explicitly but its probe says it cannot run here, or its import failed."""


class UnknownBackendError(BackendError, KeyError):
    """A backend name that no built-in backend or plugin declares."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class BackendCallError(AptHalError, RuntimeError):
    """A backend took a call but could not complete it for a reason outside the contract (a remote
    server that went down mid-call, say), having changed none of the caller's tensors. The
    contract's reference then serves the call, with a warning once per reason, or under
    ``strict=True`` the error is raised."""


class OpNotImplementedError(AptHalError, NotImplementedError):
    """Under ``strict=True``: the active backend has no implementation for an op (no silent fallback)."""


class PluginError(AptHalError, RuntimeError):
    """An out-of-tree backend plugin failed to load, or two backends claim one name."""


class CorruptBlockError(AptHalError, IOError):
    """A paged block read back from disk does not match the checksum written with it."""


class PagedStoreFullError(AptHalError, MemoryError):
    """A :class:`~apt_hal.paged_store.PagedTensor` has no room: every tier is full, or
    too many blocks are pinned."""


class PagedStoreDiskError(AptHalError, OSError):
    """The disk tier's file of a :class:`~apt_hal.paged_store.PagedTensor` cannot be used: it already
    exists, another store holds it, or reserving, writing or reading it failed. ``errno`` and
    ``filename`` are set; the message names the file and the reason."""

    def __init__(self, message: str, errno: int = None, filename: str = None):
        super().__init__(message)
        self.errno, self.filename = errno, filename

    def __str__(self) -> str:  # OSError would print "[Errno N] None: 'filename'" once errno is set
        return str(self.args[0])
