"""The batched background writer that logs live traffic without slowing it.

Handlers put records on a queue and return at once; one thread writes whatever has gathered,
every `flush_ms` milliseconds, in one transaction, or at once when someone needs it written
(`flush`: feedback on an answer still queued). What a crash (SIGKILL, power loss) can lose is
bounded: the records answered in the last `flush_ms` milliseconds before it, and never more than
`max_queue` records. A clean stop writes everything first. A full queue drops the newest record
(counted in `dropped`): serving never waits on logging.

A batch costs a few ms of DuckDB work whatever its size (six statements in one transaction), so at
the few tens of requests a second one small engine serves, the window decides the writer's CPU per
request (docs/design.md, the hot path's step 7, has the figures).
"""

from __future__ import annotations

import queue
import sys
import threading
import time

from store.database import Exchange, SecondResponse, Store


class LogWriter:
    def __init__(self, store: Store, flush_ms: int = 1000, max_queue: int = 10_000) -> None:
        self.store, self.flush_s = store, flush_ms / 1000
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._wake = threading.Event()  # write now, without waiting out the window
        self._idle = threading.Condition()
        self.written = self.dropped = self.pairs_made = self.failures = 0
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def put(self, record: Exchange | SecondResponse) -> bool:
        try:
            self._queue.put_nowait(record)
            return True
        except queue.Full:
            self.dropped += 1
            return False

    @property
    def depth(self) -> int:
        """Records not yet in the store: queued, or in the batch being written now."""
        return self._queue.unfinished_tasks

    def flush(self, timeout: float = 10.0) -> bool:
        """Have everything queued so far written now, and wait until it is."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.set()  # again each turn: the writer may have been writing when asked
                self._idle.wait(min(left, 0.05))
            return True

    def _drain(self) -> list:
        items = []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return items

    def _write(self, items: list) -> None:
        try:
            self._store_batch(items)
        except Exception:  # one bad record must not take its batch down: write them one by one
            for item in items:
                try:
                    self._store_batch([item])
                except Exception as e:
                    self.failures += 1
                    print(f"alignloop: could not log {type(item).__name__} {item.request_id}: {e}", file=sys.stderr)
        finally:
            for _ in items:
                self._queue.task_done()
            with self._idle:
                self._idle.notify_all()

    def _store_batch(self, items: list) -> None:
        exchanges = [i for i in items if isinstance(i, Exchange)]
        seconds = [i for i in items if isinstance(i, SecondResponse)]
        self.pairs_made += self.store.log_batch(exchanges, seconds)
        self.written += len(exchanges)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_s)
            self._wake.clear()
            items = self._drain()
            if items:
                self._write(items)

    def stop(self) -> None:
        """Write what is queued, then stop."""
        self._stop.set()
        self._wake.set()
        self._thread.join()
        items = self._drain()
        if items:
            self._write(items)
