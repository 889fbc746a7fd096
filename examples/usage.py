"""The shortest useful gipc program: a greenlet in the parent sends a Python object through a
pipe to a child process, which checks it."""

import gevent

import gipc


def writelet(writer: gipc.gipc._GIPCWriter) -> None:
    # Runs as a greenlet in the parent process.
    writer.put(0)


def readchild(reader: gipc.gipc._GIPCReader) -> None:
    # Runs in the child process.
    assert reader.get() == 0
    print("child received 0")


def main() -> None:
    with gipc.pipe() as (readend, writeend):
        g = gevent.spawn(writelet, writeend)
        p = gipc.start_process(target=readchild, args=(readend,))
        g.join()
        p.join()
    print(f"child exited with {p.exitcode}")


if __name__ == "__main__":
    main()
