"""From one machine to a cluster, in a gevent program.

``crunch_all`` takes any ``concurrent.futures.Executor``. It runs first on
``gipc.ProcessPool`` (this machine's cores), then unchanged on a Dask cluster, and
collects its results with ``gipc.as_completed``: while it waits, the program keeps
answering on a small TCP status port.

    python scale_out.py                       # a local Dask cluster, started here
    python scale_out.py tcp://scheduler:8786  # an existing Dask scheduler

Dask's part needs ``pip install "dask[distributed]"``.
"""

from __future__ import annotations

import concurrent.futures as cf
import socket
import sys
import time
from typing import List, Optional

import gevent
import gevent.socket
from gevent.server import StreamServer

import gipc

ITEMS = list(range(200))
progress = {"done": 0}


def crunch(n: int) -> int:
    """The work: any picklable function (Dask ships functions defined in __main__ by
    value, with cloudpickle; the process pool's workers are forked and know them)."""
    return sum(i * i for i in range(n * 100))


def crunch_all(executor: cf.Executor, items: List[int]) -> int:
    futures = [executor.submit(crunch, item) for item in items]
    total = 0
    # Cooperative: other greenlets (the status server) run while this one waits, whichever
    # executor the futures came from.
    for future in gipc.as_completed(futures):
        total += future.result()
        progress["done"] += 1
    return total


def status(sock: socket.socket, _address: object) -> None:
    sock.sendall(f"{progress['done']} tasks done\n".encode())
    sock.close()


def ask_now_and_then(port: int, answers: List[str]) -> None:
    """Stands for the program's clients: asks for the status every 10 ms."""
    while True:
        conn = gevent.socket.create_connection(("127.0.0.1", port))
        with conn:
            answers.append(conn.makefile().readline())
        gevent.sleep(0.01)


def on_dask(scheduler: Optional[str]) -> int:
    from dask.distributed import Client, LocalCluster

    if scheduler is not None:
        with Client(scheduler) as client, client.get_executor() as executor:
            return crunch_all(executor, ITEMS)
    # Two worker processes on this machine, reachable on the loopback interface only.
    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
    ) as cluster, Client(cluster) as client, client.get_executor() as executor:
        return crunch_all(executor, ITEMS)


def main() -> None:
    server = StreamServer(("127.0.0.1", 0), status)
    server.start()
    answers: List[str] = []
    asking = gevent.spawn(ask_now_and_then, server.server_port, answers)
    try:
        started = time.perf_counter()
        with gipc.ProcessPool() as pool:
            local = crunch_all(pool, ITEMS)
        print(f"gipc.ProcessPool: {local} in {time.perf_counter() - started:.2f} s, "
              f"{len(answers)} status requests answered meanwhile")
        try:
            import dask.distributed  # noqa: F401
        except ImportError:
            print("Dask is not installed: pip install 'dask[distributed]'")
            return
        answered = len(answers)
        started = time.perf_counter()
        remote = on_dask(sys.argv[1] if len(sys.argv) > 1 else None)
        assert remote == local, (remote, local)
        print(f"Dask: {remote} in {time.perf_counter() - started:.2f} s, "
              f"{len(answers) - answered} status requests answered meanwhile")
    finally:
        asking.kill()
        server.stop()


if __name__ == "__main__":  # Dask starts its workers by importing this module anew
    main()
