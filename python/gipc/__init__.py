"""gipc: gevent-cooperative child processes and inter-process communication.

    >>> import gipc
    >>> with gipc.pipe() as (reader, writer):
    ...     writer.put({"hello": "world"})
    ...     reader.get()
    {'hello': 'world'}

The transport core is a Rust extension (``gipc._core``); everything that talks to gevent's
hub is here, in Python.
"""

from ._core import __version__
from ._futures import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION, as_completed, result, wait
from ._handles import get_default_codec, pipe, set_default_codec
from ._outcome import ChildDied, RemoteTraceback, UnpicklableOutcome
from ._process import start_process
from .exceptions import GIPCClosed, GIPCError, GIPCLocked, GIPCTypeError, GIPCValueError

# gipc 1.x code refers to the documented classes as gipc.gipc._GIPCReader etc.
from . import gipc  # noqa: E402  (a submodule, bound as an attribute on purpose)

__all__ = [
    "ALL_COMPLETED",
    "ChildDied",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "GIPCClosed",
    "GIPCError",
    "GIPCLocked",
    "GIPCTypeError",
    "GIPCValueError",
    "ProcessPool",
    "RemoteTraceback",
    "UnpicklableOutcome",
    "__version__",
    "as_completed",
    "get_default_codec",
    "pipe",
    "result",
    "set_default_codec",
    "start_process",
    "wait",
]


def __getattr__(name: str) -> object:
    # The pool pulls in concurrent.futures.process (and with it tempfile, shutil, lzma, ...):
    # imported on first use only, so programs that never use it do not pay for it in memory
    # and in the cost of every fork.
    if name == "ProcessPool":
        from .pool import ProcessPool

        return ProcessPool
    raise AttributeError(f"module 'gipc' has no attribute {name!r}")
