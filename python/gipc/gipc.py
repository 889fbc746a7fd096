"""The classes documented as ``gipc.gipc.*`` in gipc 1.x, importable from the same place."""

from ._handles import (
    _GIPCDuplexHandle,
    _GIPCHandle,
    _GIPCReader,
    _GIPCWriter,
    _PairContext,
    pipe,
)
from ._process import _GProcess, start_process
from .exceptions import GIPCClosed, GIPCError, GIPCLocked

__all__ = [
    "GIPCClosed",
    "GIPCError",
    "GIPCLocked",
    "_GIPCDuplexHandle",
    "_GIPCHandle",
    "_GIPCReader",
    "_GIPCWriter",
    "_GProcess",
    "_PairContext",
    "pipe",
    "start_process",
]
