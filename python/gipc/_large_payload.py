"""Large ``bytes`` travel as messages of their own, never inside a pickle.

The transport writes a ``bytes`` object as it is and reads a large message straight into a
``bytes`` object of its own, so a large ``bytes`` value that travels as its own message is
never copied into a pickle on one side nor out of it on the other. Two kinds of traffic do
this: outcomes (a large ``bytes`` return value, :mod:`gipc._outcome`) and the pool's tasks (its
large ``bytes`` arguments, :mod:`gipc.pool._task`). Either way a transfer is a *head*
message (a pickle that says what follows) and then the large values, one message each, in
order. This module is what the two share: which values count as large, how they are taken
out of a call's arguments and put back, how they are read, and the pipe that carries it all.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple, Union

from ._handles import _GIPCReader, _GIPCWriter, pipe

#: ``bytes`` at least this long travel as their own message instead of being copied into a
#: pickle. Below it, one message is cheaper.
THRESHOLD = 32 * 1024

#: Where a large value was taken from in a call: a position in ``args`` or a keyword.
Slot = Union[int, str]


def is_large(obj: Any) -> bool:
    """Whether ``obj`` travels as a message of its own: exactly ``bytes`` (a subclass could
    carry state a pickle would keep), and at least :data:`THRESHOLD` long."""
    return obj.__class__ is bytes and len(obj) >= THRESHOLD


def bytes_pipe() -> Tuple[_GIPCReader, _GIPCWriter]:
    """A pipe that carries ``bytes`` as they are (no codec): both ends belong to gipc, which
    pickles the heads itself."""
    reader, writer = pipe(encoder=None, decoder=None)
    return reader, writer


def take_out(
    args: Tuple[Any, ...], kwargs: Dict[str, Any]
) -> Tuple[List[Slot], Tuple[Any, ...], Dict[str, Any], List[bytes]]:
    """The large values among a call's arguments, taken out: where each was, the arguments
    with ``None`` in their place (copies; the caller's are left alone), and the values."""
    slots: List[Slot] = []
    larges: List[bytes] = []
    if any(is_large(a) for a in args):
        listed = list(args)
        for i, a in enumerate(listed):
            if is_large(a):
                slots.append(i)
                larges.append(a)
                listed[i] = None
        args = tuple(listed)
    if any(is_large(v) for v in kwargs.values()):
        kwargs = dict(kwargs)
        for key, v in kwargs.items():
            if is_large(v):
                slots.append(key)
                larges.append(v)
                kwargs[key] = None
    return slots, args, kwargs, larges


def put_back(
    slots: Sequence[Slot], larges: Sequence[bytes], args: Sequence[Any], kwargs: Dict[str, Any]
) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    """Undoes :func:`take_out`: the call's arguments with the large values in their places
    (``kwargs`` is filled in place)."""
    if not slots:
        return tuple(args), kwargs
    listed = list(args)
    for slot, large in zip(slots, larges):
        if isinstance(slot, int):
            listed[slot] = large
        else:
            kwargs[slot] = large
    return tuple(listed), kwargs


def receive_larges(reader: _GIPCReader, count: int) -> List[bytes]:
    """The ``count`` large values that follow a head, read from ``reader``."""
    return [reader.get() for _ in range(count)]
