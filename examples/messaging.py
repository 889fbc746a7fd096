"""Messaging from a greenlet in the parent to a child process.

A greenlet writes a message every 0.2 s while the main greenlet joins the child
cooperatively, so both make progress in the same thread. After a few messages the writer
sends ``None`` and the child stops. Ctrl-C stops the writer and the child early.
"""

import gevent

import gipc

MESSAGES = 5


def main() -> None:
    with gipc.pipe() as (reader, writer):
        child = gipc.start_process(target=child_process, args=(reader,))
        writing = gevent.spawn(write_greenlet, writer)
        try:
            child.join()
        except KeyboardInterrupt:
            writing.kill(block=True)
            child.terminate()
            child.join()
        writing.get()
    print(f"child exited with {child.exitcode}")


def write_greenlet(writer: gipc.gipc._GIPCWriter) -> None:
    for i in range(MESSAGES):
        writer.put(f"message {i}, written by a greenlet in the parent process")
        gevent.sleep(0.2)
    writer.put(None)


def child_process(reader: gipc.gipc._GIPCReader) -> None:
    while (message := reader.get()) is not None:
        print(f"child got: {message!r}", flush=True)


if __name__ == "__main__":
    main()
