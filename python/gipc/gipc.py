"""The classes documented as ``gipc.gipc.*`` in gipc 1.x, importable from the same place."""

from typing import Any, Callable

from ._handles import (
    _pickle_dumps,
    _pickle_loads,
    _GIPCDuplexHandle,
    _GIPCHandle,
    _GIPCReader,
    _GIPCWriter,
    _PairContext,
    pipe,
)
from ._process import _GProcess, start_process
from .exceptions import GIPCClosed, GIPCError, GIPCLocked

#: What ``'default'`` means for pipe() codecs, where gipc 1.x kept it. Programs that assign
#: these (e.g. a pickler that handles lambdas) change the default for every later pipe and
#: pool, as in 1.x; ``gipc.set_default_codec()`` is the documented way to do the same.
_default_encoder: Callable[[Any], Any] = _pickle_dumps
_default_decoder: Callable[[bytes], Any] = _pickle_loads

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
