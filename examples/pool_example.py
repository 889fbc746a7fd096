"""A cooperative process pool: CPU-bound work in child processes while greenlets keep running.

Run: python examples/pool_example.py
"""

import concurrent.futures as cf
import hashlib
import os
import time

import gevent
import gipc
from gipc.pool import TaskTimeout, WorkerCrashed


def count_primes(limit: int) -> int:
    sieve = bytearray([1]) * (limit + 1)
    sieve[:2] = b"\x00\x00"
    for i in range(2, int(limit**0.5) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytes(len(range(i * i, limit + 1, i)))
    return sum(sieve)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def produce(writer: gipc.gipc._GIPCWriter) -> None:
    with writer:
        for i in range(3):
            writer.put(f"item {i} from worker {os.getpid()}")


def crash() -> None:
    os._exit(9)


def heartbeat(beats: "list[float]") -> None:
    while True:
        beats.append(time.monotonic())
        gevent.sleep(0.01)


def main() -> None:
    beats: "list[float]" = []
    ticker = gevent.spawn(heartbeat, beats)
    with gipc.ProcessPool(max_workers=2, task_timeout=5) as pool:
        # map() keeps order; the waits below are cooperative, so `ticker` keeps beating.
        limits = [200_000, 300_000, 400_000, 500_000]
        for limit, n in zip(limits, pool.map(count_primes, limits)):
            print(f"primes below {limit}: {n}")

        # Futures work with concurrent.futures.as_completed, cooperatively.
        blobs = [os.urandom(4 << 20) for _ in range(3)]  # large bytes travel unpickled
        futures = {pool.submit(sha256, b): i for i, b in enumerate(blobs)}
        for future in cf.as_completed(futures):
            print(f"blob {futures[future]}: sha256 {future.result()[:16]}...")

        # A crash fails only its task; the pool replaces the worker.
        try:
            pool.submit(crash).result()
        except WorkerCrashed as exc:
            print("crashed as expected:", exc)

        # A task over its time limit is killed; the pool carries on.
        try:
            pool.submit_with_timeout(0.2, time.sleep, 10).result()
        except TaskTimeout as exc:
            print("timed out as expected:", exc)

        # A pipe made now reaches a task: its handle travels with the task (the caller's
        # copy closes when the task is sent; if the task failed before, close it here).
        with gipc.pipe() as (results, to_task):
            producer = pool.submit(produce, to_task)

            def close_if_kept(_: object) -> None:
                if not to_task.closed:
                    to_task.close()

            producer.add_done_callback(close_if_kept)
            for item in results:  # until the task's writer closes
                print("received", item)
        producer.result()

        print("still serving:", list(pool.map_unordered(count_primes, [10, 100, 1000])))
    ticker.kill()
    gaps = [b - a for a, b in zip(beats, beats[1:])]
    print(f"the heartbeat greenlet beat {len(beats)} times; longest gap {max(gaps) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
