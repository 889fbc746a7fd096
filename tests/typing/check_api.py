"""What a type checker must accept, infer and refuse in user code (not run by pytest: CI
type-checks it with mypy --strict and pyright). A line that must fail carries an ignore
comment for its error code; with unused ignores reported as errors, it fails CI if the
checker stops flagging it."""

from __future__ import annotations

import json
from typing import Any, List

import gevent
from typing_extensions import assert_type

import gipc
from gipc.gipc import _GIPCDuplexHandle, _GIPCReader, _GIPCWriter, _GProcess


def readchild(reader: gipc.Reader) -> None:
    assert_type(reader.get(), Any)


def simplex() -> None:
    with gipc.pipe() as (reader, writer):
        assert_type(reader, _GIPCReader)
        assert_type(writer, _GIPCWriter)
        writer.put(0)
        writer.put_many([1, 2])
        reader.get(timeout=1.0)
        reader.get_many(10)
        p = gipc.start_process(target=readchild, args=(reader,))
        assert_type(p, _GProcess)
        p.join()
        reader.put(1)  # type: ignore[attr-defined]  # a reader does not put
        writer.get()  # type: ignore[attr-defined]  # a writer does not get


def duplex() -> None:
    with gipc.pipe(duplex=True, encoder=None, decoder=None) as (a, b):
        assert_type(a, _GIPCDuplexHandle)
        a.put(bytearray(b"frame"))
        b.get()
        for _ in a:
            break


def handles_are_their_own_context() -> None:
    reader, writer = gipc.pipe()
    with reader as same:
        assert_type(same, _GIPCReader)
    with writer as w:
        assert_type(w, _GIPCWriter)


def public_names() -> None:
    handle: gipc.Handle = gipc.pipe()[0]
    duplex_handle: gipc.DuplexHandle = gipc.pipe(True)[0]
    process: gipc.Process = gipc.start_process(print)
    del handle, duplex_handle, process


def bad_calls() -> None:
    gipc.pipe(duplex="yes")  # type: ignore[call-overload]
    gipc.start_process(target=1)  # type: ignore[arg-type]
    gipc.set_default_codec(encoder="pickle")  # type: ignore[arg-type]
    gipc.pipe(encoder="json")  # type: ignore[call-overload]  # only 'default' is a name
    # An encoder must return bytes-like; json.dumps returns str.
    gipc.pipe(encoder=json.dumps, decoder=json.loads)  # type: ignore[arg-type]


def good_codecs() -> None:
    def encode(obj: object) -> bytes:
        return repr(obj).encode()

    def encode_view(obj: object) -> memoryview:
        return memoryview(repr(obj).encode())

    def decode(data: bytes) -> str:
        return data.decode()

    gipc.pipe(encoder=encode, decoder=decode)
    gipc.pipe(encoder=encode_view, decoder=None)
    gipc.pipe(encoder=lambda o: bytearray(b"x"), decoder="default")
    gipc.pipe(encoder=None, decoder=None)
    gipc.set_default_codec(encode, decode)


def errors() -> None:
    try:
        gipc.pipe(encoder=1)  # type: ignore[call-overload]
    except gipc.GIPCError:
        pass
    error: TypeError = gipc.GIPCTypeError("both")
    del error


def greenlets() -> None:
    with gipc.pipe() as (reader, writer):
        g = gevent.spawn(writer.put, 1)
        reader.get()
        g.join()


def square(x: int) -> int:
    return x * x


def pool() -> None:
    with gipc.ProcessPool(max_workers=2) as executor:
        future = executor.submit(square, 3)
        assert_type(future.result(), int)
        assert_type(list(executor.map(square, [1, 2])), List[int])
        executor.submit(square, "not an int")  # type: ignore[arg-type]
        executor.submit(square)  # type: ignore[call-arg]
        assert_type(executor.submit_with_timeout(5.0, square, 2).result(), int)


def waits_on_any_executor() -> None:
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(1) as threads:
        future = threads.submit(square, 2)
        assert_type(gipc.result(future), int)
        done, not_done = gipc.wait([future], timeout=1.0, return_when=gipc.FIRST_COMPLETED)
        for finished in gipc.as_completed(done):
            assert_type(finished.result(), int)
        gipc.result(square)  # type: ignore[arg-type]
