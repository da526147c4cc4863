"""Group commit for labels: the labels that arrive while one transaction runs go together in the next.

With twenty labellers at full speed, one transaction a label made each wait behind the others' commits
(server-side p95 95 ms at 100,000 pairs, ops/bench/results/next_pair.md). Here one drain task writes
whatever has gathered through `LabelQueue.label_many` (one transaction, one commit) in a worker
thread, and each sender gets its own answer back: its label id, next pair and progress, or its own
refusal. An answer is never delayed to wait for others: a label that arrives to an idle batcher is
written at once. `labeling.max_batch` bounds a batch (1: each label alone, as before).
"""

from __future__ import annotations

import asyncio

from store.labelling import Answer, Labelled, LabelQueue


class LabelBatcher:
    def __init__(self, queue: LabelQueue, max_batch: int = 64) -> None:
        self.queue, self.max_batch = queue, max_batch
        self._pending: list[tuple[Answer, asyncio.Future]] = []
        self._drain: asyncio.Task | None = None
        self.batches = self.labels = 0  # for the benchmark and /api/status: labels per commit

    async def submit(self, answer: Answer) -> Labelled:
        """The label written (committed) and the sender's next pair; raises this answer's refusal."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((answer, future))
        if self._drain is None:
            self._drain = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
                try:
                    results = await asyncio.to_thread(self.queue.label_many, [a for a, _ in batch])
                except Exception as e:  # the store failed: the transaction rolled back for all of them
                    results = [e] * len(batch)
                self.batches += 1
                self.labels += len(batch)
                for (_, future), result in zip(batch, results):
                    if future.done():  # its sender went away; the label stands
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._drain = None
