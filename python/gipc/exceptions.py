"""gipc's exception types. Defined once here; the Rust core raises them by import."""


class GIPCError(Exception):
    """Raised upon general errors. All other gipc exception types derive from this one."""


class GIPCClosed(GIPCError):
    """Raised upon an operation on a closed handle (including a second ``close()``)."""


class GIPCLocked(GIPCError):
    """Raised upon an attempt to close (or pass to a child, or put in a message) a handle
    that another greenlet is currently using for I/O, or that a waiting ``put`` is
    sending."""


class GIPCTypeError(GIPCError, TypeError):
    """A gipc argument of the wrong type (e.g. ``pipe(encoder=1)``). gipc 1.x raised
    ``GIPCError`` here, the rest of Python ``TypeError``: this is both, so code written for
    either catches it."""


class GIPCValueError(GIPCError, ValueError):
    """A gipc argument with a wrong value (e.g. ``pipe(encoder='json')``): both
    ``GIPCError``, as in gipc 1.x, and ``ValueError``."""
