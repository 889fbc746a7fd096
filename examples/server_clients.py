"""A TCP server in the parent and 1,000 concurrent clients in one child process.

The server runs in a greenlet of the parent and echoes one line per connection; the child
starts its clients as greenlets, each sends a line and checks the echo. The parent joins the
child cooperatively, so the server keeps serving meanwhile.
"""

import time

import gevent
from gevent import socket
from gevent.server import StreamServer

import gipc

N_CLIENTS = 1000
MESSAGE = b"HELLO\n"


def serve(sock: socket.socket, address: object) -> None:
    with sock.makefile("rwb") as f:
        f.write(f.readline())
        f.flush()


def client(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock, sock.makefile("rwb") as f:
        f.write(MESSAGE)
        f.flush()
        assert f.readline() == MESSAGE


def client_process(port: int) -> None:
    start = time.perf_counter()
    clients = [gevent.spawn(client, port) for _ in range(N_CLIENTS)]
    gevent.joinall(clients, raise_error=True)
    print(f"{N_CLIENTS} clients served within {time.perf_counter() - start:.2f} s.")


def main() -> None:
    server = StreamServer(("127.0.0.1", 0), serve, backlog=N_CLIENTS)
    server.start()
    try:
        child = gipc.start_process(client_process, args=(server.server_port,))
        child.join()
    finally:
        server.stop()
    if child.exitcode != 0:
        raise SystemExit(f"client process failed with exit code {child.exitcode}")


if __name__ == "__main__":
    main()
