"""gipc's exception types. Defined once here; the Rust core raises them by import."""


class GIPCError(Exception):
    """Raised upon general errors. All other gipc exception types derive from this one."""


class GIPCClosed(GIPCError):
    """Raised upon an operation on a closed handle (including a second ``close()``)."""


class GIPCLocked(GIPCError):
    """Raised upon an attempt to close (or pass to a child) a handle that another greenlet
    is currently using for I/O."""
