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
from ._handles import pipe
from ._process import start_process
from .exceptions import GIPCClosed, GIPCError, GIPCLocked

__all__ = [
    "GIPCClosed",
    "GIPCError",
    "GIPCLocked",
    "__version__",
    "pipe",
    "start_process",
]
