"""gipc: gevent-cooperative child processes and inter-process communication.

    >>> import gipc
    >>> with gipc.pipe() as (reader, writer):
    ...     writer.put({"hello": "world"})
    ...     reader.get()
    {'hello': 'world'}

The transport core is a Rust extension (``gipc._core``); everything that talks to gevent's
hub is here, in Python.
"""

from __future__ import annotations

from importlib import import_module

from .exceptions import GIPCClosed, GIPCError, GIPCLocked, GIPCTypeError, GIPCValueError

# typing is not imported at run time: a spawned child imports this package before
# anything else of gipc's, and typing would be ~5% of its start-up (see _startup_child).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, List, Tuple

    # What the names below resolve to, for type checkers; at run time each is imported on
    # first use (see __getattr__).
    from . import gipc as gipc
    from ._core import __version__ as __version__
    from ._forkserver import set_forkserver_preload
    from ._futures import (
        ALL_COMPLETED,
        FIRST_COMPLETED,
        FIRST_EXCEPTION,
        as_completed,
        result,
        wait,
    )
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
    from .pool import ProcessPool

    #: Public names of the documented gipc 1.x classes (which stay where 1.x had them, in
    #: ``gipc.gipc``), for annotations: ``def serve(reader: gipc.Reader) -> None``.
    Handle = _GIPCHandle
    Reader = _GIPCReader
    Writer = _GIPCWriter
    DuplexHandle = _GIPCDuplexHandle
    Process = _GProcess
del TYPE_CHECKING  # not a name of the package's

#: Where each public name lives: (module, name there). Importing gipc loads none of them:
#: a program pays (in start-up time, and in memory every fork copies) for the parts it
#: uses, and a spawned child that needs no gevent does not import it. gipc 1.x code refers
#: to the documented classes as gipc.gipc._GIPCReader etc.: that submodule is one of them.
_LAZY: Dict[str, Tuple[str, str]] = {
    # In the Rust extension, which a spawned child whose target passes no handle never
    # loads (~0.4 ms of its start).
    "__version__": ("._core", "__version__"),
    "gipc": (".gipc", ""),
    "set_forkserver_preload": ("._forkserver", "set_forkserver_preload"),
    "ProcessPool": (".pool", "ProcessPool"),
    "Handle": ("._handles", "_GIPCHandle"),
    "Reader": ("._handles", "_GIPCReader"),
    "Writer": ("._handles", "_GIPCWriter"),
    "DuplexHandle": ("._handles", "_GIPCDuplexHandle"),
    "Process": ("._process", "_GProcess"),
    "start_process": ("._process", "start_process"),
    "_GProcess": ("._process", "_GProcess"),
    "ChildDied": ("._outcome", "ChildDied"),
    "RemoteTraceback": ("._outcome", "RemoteTraceback"),
    "UnpicklableOutcome": ("._outcome", "UnpicklableOutcome"),
}
_LAZY.update(
    (name, ("._futures", name))
    for name in (
        "ALL_COMPLETED",
        "FIRST_COMPLETED",
        "FIRST_EXCEPTION",
        "as_completed",
        "result",
        "wait",
    )
)
_LAZY.update(
    (name, ("._handles", name))
    for name in (
        "_GIPCDuplexHandle",
        "_GIPCHandle",
        "_GIPCReader",
        "_GIPCWriter",
        "get_default_codec",
        "pipe",
        "set_default_codec",
    )
)

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
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'gipc' has no attribute {name!r}")
    module = import_module(where[0], __name__)
    value = getattr(module, where[1]) if where[1] else module
    globals()[name] = value  # found once; later lookups never come here
    return value


def __dir__() -> List[str]:
    # What the module offers, the names not imported yet included; not the helpers this
    # file uses itself (import_module, the __future__ feature, TYPE_CHECKING).
    return sorted(set(__all__) | set(_LAZY))
