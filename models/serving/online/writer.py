"""Group commit: the batches of concurrent requests joined into one durable write.

A durable commit costs about one fsync (SQLite `synchronous=FULL`: 0.04 to 4 ms here, by
the host's load; Redis with `appendfsync always`: one fsync per turn of its event loop), so
1-event requests committed one by one reached 940 to 2,100 req/s on SQLite at 64 clients
here, and 4,000 to 6,600 joined (bench/events.py). One writer thread per process takes
whatever batches are waiting, writes them with a single `write_events` (up to `max_events`
events) and hands each caller its own part of the result: the same acknowledgement, after
the same durable commit, for many requests at once.

`submit(events)` is for async code (it never blocks the event loop); `write(events)` for
threads. A failed joined write fails every request in it with the same error (a
`BackendUnavailable` is a 503 for each): none of them was acknowledged.

Impressions, which nobody waits on, go through `BufferedWriter` instead: appended to a list,
written every few ms, with no future and no wake of the writer thread per response.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import Callable, Sequence

from models.serving.events import Event, Impression
from models.serving.online.base import OnlineState, WriteResult

_Pending = tuple[Sequence[Event], "concurrent.futures.Future[WriteResult]"]


class GroupCommitWriter:
    """One thread that writes the waiting event batches together (`write_events`). `max_events`
    bounds one joined write (a single batch larger than that is written alone)."""

    def __init__(self, state: OnlineState, max_events: int) -> None:
        self.state, self.max_events = state, max_events
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        # Counters for the benchmark and the metrics: how much joining happened.
        self.commits = 0
        self.batches = 0
        self._thread = threading.Thread(target=self._run, name=f"group-commit-events-{state.backend}", daemon=True)
        self._thread.start()

    def write_future(self, events: Sequence[Event]) -> concurrent.futures.Future[WriteResult]:
        future: concurrent.futures.Future[WriteResult] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the group-commit writer is closed")
            self._queue.put((events, future))
        return future

    def write(self, events: Sequence[Event]) -> WriteResult:
        """Blocking: for a thread (a BentoML `def` API)."""
        return self.write_future(events).result()

    async def submit(self, events: Sequence[Event]) -> WriteResult:
        """For an event loop: waits without blocking it."""
        return await asyncio.wrap_future(self.write_future(events))

    def _run(self) -> None:
        carry: _Pending | None = None
        while True:
            first = carry if carry is not None else self._queue.get()
            if first is None:  # the stop, queued by close() after every batch before it
                return
            group, total, carry, stop = [first], len(first[0]), None, False
            while True:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                if total + len(nxt[0]) > self.max_events:
                    carry = nxt  # the next group's first
                    break
                group.append(nxt)
                total += len(nxt[0])
            self._commit(group)
            if stop:
                return

    def _commit(self, group: list[_Pending]) -> None:
        events = [e for batch, _ in group for e in batch]
        # Any error, not only BackendUnavailable: each waiting caller re-raises it; left
        # unhandled it would end this thread and leave them waiting forever.
        try:
            result = self.state.write_events(events)
        except Exception as err:  # noqa: BLE001 - not swallowed: every caller gets it
            for _, future in group:
                future.set_exception(err)
            return
        self.commits += 1
        self.batches += len(group)
        for (_, future), part in zip(group, result.split([len(b) for b, _ in group]), strict=True):
            future.set_result(part)

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, then stop the thread (the state stays open)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout)


class BufferedWriter:
    """Writes nobody waits on (the impression of each /recommend and /rank response): `add`
    appends under a lock and returns; one thread wakes on the first entry after a write,
    lingers `linger_s` for more, then writes all it holds (`max_events` a commit). Measured
    at 64 clients, a future and a queue wake per impression (GroupCommitWriter with a linger)
    kept the writer thread on about 12% of an API worker's samples; joined here, once per
    linger. At most `max_pending` entries are held or being written: beyond, `add` returns
    False (the caller counts the drop) so that a slow backend cannot pile them up. A failed
    write is passed to `on_error` with the number of entries it lost."""

    def __init__(self, state: OnlineState, max_events: int, linger_s: float, max_pending: int,
                 on_error: Callable[[Exception, int], None]) -> None:  # fmt: skip
        if linger_s < 0:
            raise ValueError(f"linger_s {linger_s!r}: must be >= 0")
        self.state, self.max_events, self.linger_s, self.max_pending = state, max_events, linger_s, max_pending
        self._on_error = on_error
        self._held: list[Impression] = []
        self._writing = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()  # set by the first entry after a write, or by close()
        self._stop = threading.Event()  # ends the linger at once: close() writes what is held
        self._closed = False
        self.commits = 0
        self._thread = threading.Thread(target=self._run, name=f"buffered-impressions-{state.backend}", daemon=True)
        self._thread.start()

    def add(self, entry: Impression) -> bool:
        """False when `max_pending` entries are already held (the entry is not written)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the buffered writer is closed")
            if len(self._held) + self._writing >= self.max_pending:
                return False
            self._held.append(entry)
            if len(self._held) == 1:
                self._wake.set()
        return True

    @property
    def pending(self) -> int:
        """Entries held or being written."""
        with self._lock:
            return len(self._held) + self._writing

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._stop.wait(self.linger_s)
            with self._lock:
                held, self._held = self._held, []
                self._writing = len(held)
                self._wake.clear()
                closed = self._closed
            for start in range(0, len(held), self.max_events):
                chunk = held[start:start + self.max_events]
                # Any error: handed on (counted, logged) rather than ending this thread.
                try:
                    self.state.write_impressions(chunk)
                    self.commits += 1
                except Exception as err:  # noqa: BLE001 - not swallowed: on_error counts it
                    self._on_error(err, len(chunk))
            with self._lock:
                self._writing = 0
            if closed:  # add() refuses after close, so nothing came in since the swap
                return

    def close(self, timeout: float = 30.0) -> None:
        """Write what is held, then stop the thread (the state stays open)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop.set()
            self._wake.set()
        self._thread.join(timeout)
