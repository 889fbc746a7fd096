"""Synchronising two processes with a handshake over a duplex pipe.

The parent sends SYN and waits for ACK; the child answers the moment it sees SYN. Both then
take a timestamp at (almost) the same instant: the difference shows how tight the sync is.
"""

import time

import gipc


def main() -> None:
    with gipc.pipe(duplex=True) as (child_end, parent_end):
        child = gipc.start_process(writer_process, args=(child_end,))
        parent_end.put("SYN")
        assert parent_end.get() == "ACK"
        parent_time = time.time()  # now in sync with the child
        child_time = parent_end.get()
        child.join()
    print(f"Time delta: {abs(parent_time - child_time):.8f} s.")


def writer_process(child_end: gipc.gipc._GIPCDuplexHandle) -> None:
    with child_end:
        assert child_end.get() == "SYN"
        child_end.put("ACK")
        child_end.put(time.time())  # now in sync with the parent


if __name__ == "__main__":
    main()
