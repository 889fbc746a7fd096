"""How long the calling thread's gevent loop leaves an I/O event waiting: its stalls.

A greenlet that sleeps 1 ms and times the gaps between its wake-ups does not measure that
on its own: libev's epoll backend waits at least 1 ms whenever it waits at all (its
``backend_mintime``), so when anything else wakes the loop in the middle of the ticker's
millisecond (a child's pipe, a fork server's reply), the loop goes back to sleep for a full
millisecond more, and the ticker's gap reads up to ~2 ms although the loop was idle and would
have served any socket at once. (``python benches/stallmeter.py`` shows it: the ticker's
median gap follows an unrelated 1.37 ms I/O wake-up.)

So the meter here watches an I/O event, as a server's socket would be watched: a Linux
``timerfd`` that fires every ``interval`` (0.25 ms) at known times, waited for by a greenlet
through the loop like any descriptor. The kernel makes it readable on time whatever the
loop's timers do; each time the greenlet runs, the first expiry it had not yet served tells
how long that event waited: the *lateness*. The longest lateness in a window is the stall an
I/O event met in it (less at most one interval: a stall can begin just after an expiry).
For the worst one, the meter also reports the CPU time the thread used and the time it was
runnable but waiting for a CPU (schedstat ``run_delay``) since the previous service.

Linux only (``timerfd`` through ctypes, so that any CPython 3.9+ and gipc 1.x run it too);
elsewhere :class:`StallMeter` falls back to the 1 ms ticker's gap, and says so in ``kind``.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from typing import List, Optional, Tuple

INTERVAL = 0.00025

_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = os.O_NONBLOCK  # the same bits on Linux
_TFD_CLOEXEC = os.O_CLOEXEC
_TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _timespec(ns: int) -> _Timespec:
    return _Timespec(ns // 1_000_000_000, ns % 1_000_000_000)


def _libc() -> Optional[ctypes.CDLL]:
    """The C library, with the signatures of the two timerfd calls; None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        create, settime = libc.timerfd_create, libc.timerfd_settime
    except (OSError, AttributeError):
        return None
    create.argtypes, create.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settime.argtypes = [
        ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.POINTER(_Itimerspec)
    ]
    settime.restype = ctypes.c_int
    return libc


def _timerfd(libc: ctypes.CDLL, first_ns: int, period_ns: int, absolute: bool) -> int:
    """A non-blocking timer descriptor that first fires at ``first_ns`` (on CLOCK_MONOTONIC
    if ``absolute``, else that long from now), then every ``period_ns``."""
    fd = libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    spec = _Itimerspec(_timespec(period_ns), _timespec(first_ns))
    flags = _TFD_TIMER_ABSTIME if absolute else 0
    if libc.timerfd_settime(fd, flags, ctypes.byref(spec), None) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, os.strerror(err))
    return fd


class _Schedstat:
    """This thread's CPU time (``thread_time``) and its time runnable but not running
    (Linux's schedstat ``run_delay``; 0 where the kernel does not say), in seconds.
    schedstat's own CPU time is not used: for a running thread it is brought up to date
    only at the scheduler's tick (4 ms at 250 Hz)."""

    def __init__(self) -> None:
        try:
            self._fd: Optional[int] = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            self._fd = None

    def read(self) -> Tuple[float, float]:
        cpu = time.thread_time()
        if self._fd is not None:
            try:
                return cpu, int(os.pread(self._fd, 100, 0).split()[1]) / 1e9
            except (OSError, IndexError, ValueError):
                pass
        return cpu, 0.0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class StallMeter:
    """Started on creation, in the calling thread's loop; ``reset()`` forgets what was seen,
    ``stop()`` ends it and returns the worst stall as (seconds, CPU seconds of the thread
    within it, seconds it waited for a CPU within it). It measures its own event: a loop
    that runs two long callbacks in one turn makes a descriptor that became ready before
    both wait for both, and the meter's event for the longer one at least.

    Each service costs the loop thread tens of microseconds (4,000 a second: ~10% of a CPU
    on libev, more on libuv), so time throughput without it, and stalls with it."""

    def __init__(self, interval: float = INTERVAL, record: bool = False) -> None:
        import gevent

        self.interval = interval
        self.worst: Tuple[float, float, float] = (0.0, 0.0, 0.0)
        self.services = 0
        #: Every stall seen (each service's lateness), with ``record=True``.
        self.samples: Optional[List[float]] = [] if record else None
        self._running = True
        self._stopped = False
        self._fd = -1
        libc = _libc()
        if libc is None:
            self.kind = "ticker"  # the 1 ms ticker's gaps, see the module docs
            self._sched = _Schedstat()
            self._last_cpu, self._last_queued = self._sched.read()
            self._greenlet = gevent.spawn(self._tick)
            return
        self.kind = "timerfd"
        self._period = int(interval * 1e9)
        # Absolute expiry times on CLOCK_MONOTONIC (time.monotonic_ns's clock), so that
        # expiry k is known exactly: start + k * period.
        self._start_ns = time.monotonic_ns() + self._period
        self._fd = _timerfd(libc, self._start_ns, self._period, absolute=True)
        self._sched = _Schedstat()
        self._served = 0  # expiries read so far; the oldest not served is number _served
        self._last_cpu, self._last_queued = self._sched.read()
        self._greenlet = gevent.spawn(self._serve)

    @classmethod
    def settled(cls, interval: float = INTERVAL, record: bool = False) -> "StallMeter":
        """A meter whose first service is behind it: that one is late by however long the
        caller ran before the meter's greenlet first did, which is set-up, not a stall."""
        import gevent

        meter = cls(interval, record)
        gevent.sleep(0.005)
        meter.reset()
        return meter

    def reset(self) -> None:
        self.worst = (0.0, 0.0, 0.0)
        self.services = 0
        if self.samples is not None:
            self.samples.clear()

    def _serve(self) -> None:
        from gevent.hub import get_hub

        hub = get_hub()
        watcher = hub.loop.io(self._fd, 1)
        try:
            while True:
                hub.wait(watcher)
                if not self._running:
                    return  # stop() has taken its last look: nothing after it counts
                self._account()
        finally:
            watcher.close()

    def _account(self) -> None:
        """Serves the expiries that are due: the oldest one not served before tells how long
        it waited. Called by the meter's greenlet, and by ``stop()`` for a stall that lasts
        until then (the caller's loop may not have run since)."""
        now = time.monotonic_ns()
        try:
            count = int.from_bytes(os.read(self._fd, 8), sys.byteorder)
        except BlockingIOError:
            return  # none due
        late = (now - (self._start_ns + self._served * self._period)) / 1e9
        self._served += count
        self._note(late)

    def _note(self, stall: float) -> None:
        cpu, queued = self._sched.read()
        self.services += 1
        if self.samples is not None:
            self.samples.append(stall)
        if stall > self.worst[0]:
            self.worst = (stall, cpu - self._last_cpu, queued - self._last_queued)
        self._last_cpu, self._last_queued = cpu, queued

    def _tick(self) -> None:
        import gevent

        last = time.perf_counter()
        while self._running:
            gevent.sleep(0.001)
            if not self._running:
                return
            now = time.perf_counter()
            self._note(now - last)
            last = now

    def stop(self) -> Tuple[float, float, float]:
        """Ends the meter (once; later calls only return the result) and returns the worst
        stall, including one that lasts until this call."""
        if self._stopped:
            return self.worst
        self._stopped = True
        self._running = False
        try:
            if self.kind == "timerfd":
                self._account()
            worst = self.worst
            self._greenlet.kill()
        finally:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            self._sched.close()
        self.worst = worst
        return worst


def _demo() -> None:
    """A 1 ms ticker alone, with and without an unrelated I/O wake-up every 1.37 ms, then
    this meter over the same I/O: the ticker's gaps follow the other wake-ups (the loop's
    timer granularity, read as stall), the meter's lateness does not."""
    import gevent
    from gevent.hub import get_hub

    def other_io(period: float) -> None:
        libc = _libc()
        assert libc is not None
        ns = int(period * 1e9)
        fd = _timerfd(libc, ns, ns, absolute=False)
        watcher = get_hub().loop.io(fd, 1)
        try:
            while True:
                get_hub().wait(watcher)
                os.read(fd, 8)
        finally:
            watcher.close()
            os.close(fd)

    def ticker_gaps() -> List[float]:
        gaps: List[float] = []
        last = time.perf_counter()
        for _ in range(2000):
            gevent.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
        return sorted(gaps)

    def ms(values: List[float]) -> str:
        values = sorted(values)
        return (f"median {values[len(values) // 2] * 1e3:.2f} ms, "
                f"max {values[-1] * 1e3:.2f} ms")

    for with_io in (False, True):
        extra = gevent.spawn(other_io, 0.00137) if with_io else None
        gaps = ticker_gaps()
        meter = StallMeter.settled(record=True)
        gevent.sleep(2)
        meter.stop()
        if extra is not None:
            extra.kill()
        print(f"{'I/O every 1.37 ms' if with_io else 'idle loop'}:\n"
              f"  1 ms ticker, gaps:                 {ms(gaps)}\n"
              f"  1 ms ticker, lateness (gap - 1 ms): {ms([g - 0.001 for g in gaps])}\n"
              f"  {meter.kind} meter (2 s), lateness:   {ms(meter.samples or [0.0])}")


if __name__ == "__main__":
    _demo()
