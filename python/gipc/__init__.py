"""gipc: gevent-cooperative child processes and inter-process communication.

    >>> import gipc
    >>> with gipc.pipe() as (reader, writer):
    ...     writer.put({"hello": "world"})
    ...     reader.get()
    {'hello': 'world'}

The transport core is a Rust extension (``gipc._core``); everything that talks to gevent's
hub is here, in Python.
"""

from typing import TYPE_CHECKING, List

from ._core import __version__
from ._forkserver import set_forkserver_preload
from ._futures import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION, as_completed, result, wait
from ._handles import (
    _GIPCDuplexHandle,
    _GIPCHandle,
    _GIPCReader,
    _GIPCWriter,
    get_default_codec,
    pipe,
    set_default_codec,
)
from ._outcome import ChildDied, RemoteTraceback, UnpicklableOutcome
from ._process import _GProcess, start_process
from .exceptions import GIPCClosed, GIPCError, GIPCLocked, GIPCTypeError, GIPCValueError

# gipc 1.x code refers to the documented classes as gipc.gipc._GIPCReader etc.
from . import gipc as gipc  # a submodule, bound as an attribute on purpose

if TYPE_CHECKING:
    # Imported lazily at run time (see __getattr__); type checkers see it as it is.
    from .pool import ProcessPool

#: Public names of the documented gipc 1.x classes (which stay where 1.x had them, in
#: ``gipc.gipc``), for annotations: ``def serve(reader: gipc.Reader) -> None``.
Handle = _GIPCHandle
Reader = _GIPCReader
Writer = _GIPCWriter
DuplexHandle = _GIPCDuplexHandle
Process = _GProcess

__all__ = [
    "ALL_COMPLETED",
    "ChildDied",
    "DuplexHandle",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "GIPCClosed",
    "GIPCError",
    "GIPCLocked",
    "GIPCTypeError",
    "GIPCValueError",
    "Handle",
    "Process",
    "ProcessPool",
    "Reader",
    "RemoteTraceback",
    "UnpicklableOutcome",
    "Writer",
    "__version__",
    "as_completed",
    "get_default_codec",
    "pipe",
    "result",
    "set_default_codec",
    "set_forkserver_preload",
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


def __dir__() -> List[str]:
    # What the module offers, the lazily imported pool included.
    return sorted(set(globals()) | set(__all__))
