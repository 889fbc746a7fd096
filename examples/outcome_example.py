"""Getting a child's return value, or its exception with the child's traceback.

Run: python examples/outcome_example.py
"""

import os
import time

import gevent
import gipc


def checksum(data: bytes) -> int:
    return sum(data) % 65521


def parse(text: str) -> int:
    return int(text)  # raises ValueError for "not a number"


def vanish() -> None:
    os._exit(3)


def main() -> None:
    # A return value. The child runs while this greenlet (and any other) keeps going.
    p = gipc.start_process(checksum, args=(os.urandom(1 << 20),), capture=True)
    ticks = 0
    while p.is_alive():
        ticks += 1
        gevent.sleep(0.001)
    print("checksum from the child:", p.result(), f"(the parent ticked {ticks} times)")
    p.join()

    # An exception: re-raised here, with the child's traceback as its cause.
    p = gipc.start_process(parse, args=("not a number",), capture=True)
    try:
        p.result(timeout=10)
    except ValueError as exc:
        print("the child raised:", repr(exc))
        print("its traceback, from the child:", str(exc.__cause__).splitlines()[-1])
    p.join()
    print("exit code, as multiprocessing reports it:", p.exitcode)

    # A child that ends without an outcome.
    p = gipc.start_process(vanish, capture=True)
    try:
        p.result()
    except gipc.ChildDied as exc:
        print("no outcome:", exc, "| exitcode =", exc.exitcode)
    p.join()

    # Several children at once, their results gathered cooperatively.
    started = time.monotonic()
    children = [gipc.start_process(time.sleep, args=(0.3,), capture=True) for _ in range(4)]
    results = [c.result() for c in children]
    for c in children:
        c.join()
    print(f"4 children sleeping 0.3 s each took {time.monotonic() - started:.2f} s: {results}")


if __name__ == "__main__":
    main()
