"""Micro-batching: concurrent requests are stacked into one forward pass, bounded in size and in waiting time,
so throughput grows with load while a lone request waits at most `max_wait_ms`."""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future

import torch


class MicroBatcher:
    """Runs `fn` on batches of the tensors given to `submit`, in one worker thread.

    Args:
        fn: (N, ...) batch -> (N, ...) results; called under torch.no_grad().
        max_batch: most inputs per call.
        max_wait_ms: longest a first input waits for others to join it.
    """

    def __init__(self, fn, max_batch: int = 16, max_wait_ms: float = 5.0):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_ms >= 0, got {max_batch} and {max_wait_ms}")
        self.fn, self.max_batch, self.max_wait = fn, max_batch, max_wait_ms / 1000
        self.queue: queue.Queue = queue.Queue()
        self.batch_sizes: list[int] = []  # for tests and the load report: how requests were grouped
        self.worker = threading.Thread(target=self._loop, name="seqvision-batcher", daemon=True)
        self.worker.start()

    def submit(self, x: torch.Tensor) -> Future:
        """Queue one input (without its batch dimension); the future resolves to its row of the result."""
        future: Future = Future()
        self.queue.put((x, future))
        return future

    def close(self) -> None:
        self.queue.put(None)
        self.worker.join()

    def _take(self) -> list | None:
        first = self.queue.get()
        if first is None:
            return None
        batch, deadline = [first], time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                item = self.queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if item is None:  # close() during a batch: finish it, then stop
                self.queue.put(None)
                break
            batch.append(item)
        return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            self.batch_sizes.append(len(batch))
            try:
                with torch.no_grad():
                    out = self.fn(torch.stack([x for x, _ in batch]))
                for (_, future), row in zip(batch, out):
                    future.set_result(row)
            except Exception as e:  # the requests fail, the worker lives on
                for _, future in batch:
                    future.set_exception(e)
