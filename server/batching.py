"""Dynamic batching of Infer calls, as Triton does it.

Calls for the same model version join one queue; a worker per queue runs them as one forward
pass of up to ``max_batch_size`` samples and hands each caller its rows. The worker takes what
is queued at once; it waits up to ``max_queue_delay_us`` for more only while other calls are
on their way (decoded but not yet queued) or a lone caller's pass is running, so a lone
caller never waits (it even runs in its own thread: nothing queued, gathered or running) and
a busy server fills its batches. Larger batches amortise the per-call overhead
of the engine's kernels.

Each model may set its own ``max_batch_size`` and ``max_queue_delay_us``, or turn batching
off (its ``BatchingPolicy``, merged over the server's ``BatchingConfig``). Every call brings
the model's current record, so a queue follows a policy update from the next call on.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cnnd.core import Sequential
from cnnd.server.config import BatchingConfig
from cnnd.server.registry import Loaded
from cnnd.server.store.base import BatchingPolicy

log = logging.getLogger("cnnd.batching")
IDLE_SECONDS = 60.0  # a queue's worker exits after this long without work


def measured_forward(model: Sequential, x: np.ndarray, metrics: Any = None) -> np.ndarray:
    """One inference forward pass, observed in the batch-size and compute-time histograms."""
    start = time.perf_counter()
    logits = model.forward(x, train=False)
    if metrics is not None:
        metrics.infer_batch.observe(len(x))
        metrics.infer_compute.observe(time.perf_counter() - start)
    return logits


@dataclass
class _Request:
    x: np.ndarray
    enqueued: float
    done: threading.Event = field(default_factory=threading.Event)
    logits: np.ndarray | None = None
    error: BaseException | None = None


class _Queue:
    """The pending calls of one model version and the thread that runs them."""

    def __init__(
        self, batcher: Batcher, key: tuple[str, int], model: Sequential, policy: BatchingPolicy
    ) -> None:
        self.batcher = batcher
        self.key = key
        self.model = model
        self.policy = policy  # the model's, as of the latest call (see Batcher.arriving)
        self.items: deque[_Request] = deque()
        self.cond = threading.Condition()
        self.arriving = 0  # callers between decode and enqueue
        self.running = 0  # forward passes in flight: the worker's batch and lone callers
        self.gathering = False  # the worker holds calls and waits for more
        self.thread = threading.Thread(target=self._work, name=f"cnnd-batch-{key[0]}", daemon=True)
        self.alive = True
        self.thread.start()

    def idle(self) -> bool:
        """Nothing queued, gathered, running or on its way: a caller may run alone. (Under
        ``cond``.)"""
        return not self.items and not self.gathering and self.running == 0 and not self.arriving

    def _take(self) -> list[_Request] | None:
        with self.cond:
            while not self.items:
                if not self.cond.wait(IDLE_SECONDS) and not self.items:
                    return None
            max_size, delay_us = self.batcher.limits(self.policy)
            deadline = time.perf_counter() + delay_us / 1e6
            batch, size = [], 0
            self.gathering = True
            while True:
                while self.items and size + len(self.items[0].x) <= max_size:
                    r = self.items.popleft()
                    batch.append(r)
                    size += len(r.x)
                if not batch:  # one call larger than the batch limit runs alone
                    batch.append(self.items.popleft())
                    break
                left = deadline - time.perf_counter()
                full = size >= max_size or bool(self.items)  # the next one won't fit
                # Wait for calls on their way, and for a lone caller's pass to end (what
                # queues meanwhile joins this batch), within the queue delay.
                if full or left <= 0 or (self.arriving == 0 and self.running == 0):
                    break
                self.cond.wait(left)
            self.gathering = False
            self.running += 1
            return batch

    def _work(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                if self.batcher._retire(self):
                    return
                continue
            try:
                self._run(batch)
            finally:
                with self.cond:
                    self.running -= 1

    def _run(self, batch: list[_Request]) -> None:
        m = self.batcher.metrics
        start = time.perf_counter()
        try:
            x = batch[0].x if len(batch) == 1 else np.concatenate([r.x for r in batch])
            logits = measured_forward(self.model, x, self.batcher.metrics)
        except BaseException as e:  # every caller gets the error
            for r in batch:
                r.error = e
                r.done.set()
            return
        row = 0
        for r in batch:
            r.logits = logits[row : row + len(r.x)]
            row += len(r.x)
            if m is not None:
                m.infer_queue.observe(start - r.enqueued)
            r.done.set()


class Batcher:
    def __init__(self, config: BatchingConfig, metrics: Any = None) -> None:
        self.config = config  # the defaults of models that set no policy of their own
        self.metrics = metrics
        self._queues: dict[tuple[str, int], _Queue] = {}
        self._lock = threading.Lock()

    def limits(self, policy: BatchingPolicy) -> tuple[int, int]:
        """(max_batch_size, max_queue_delay_us) of a model: its own, else the server's."""
        size, delay = policy.max_batch_size, policy.max_queue_delay_us
        return (
            self.config.max_batch_size if size is None else size,
            self.config.max_queue_delay_us if delay is None else delay,
        )

    @contextlib.contextmanager
    def arriving(self, loaded: Loaded) -> Iterator[Callable[[np.ndarray], np.ndarray]]:
        """Announce a call before its input is decoded (so that the worker may wait for it);
        yields ``run(x) -> logits`` for x (N, C, H, W), computed in a batch with other
        callers' inputs, or alone when the model's policy turns batching off."""
        policy = loaded.record.batching
        if policy.disabled:
            yield lambda x: self._alone(loaded.model, x)
            return
        key = (loaded.record.id, loaded.version)
        with self._lock:
            q = self._queues.get(key)
            if q is None or not q.alive:
                q = self._queues[key] = _Queue(self, key, loaded.model, policy)
            with q.cond:
                q.arriving += 1
                q.policy = policy  # the worker's next batch uses it
        queued = False

        def run(x: np.ndarray) -> np.ndarray:
            nonlocal queued
            with q.cond:
                q.arriving -= 1
                queued = True
                # Alone (nothing queued, gathered, running or on the way): run in this
                # thread; handing over to the worker would only add a thread switch. No
                # request object, no event, no wake-up of the worker: this is the latency
                # of a lone client.
                alone = q.idle()
                if alone:
                    q.running += 1
                else:
                    r = _Request(x, time.perf_counter())
                    q.items.append(r)
                    q.cond.notify()
            if alone:
                try:
                    return self._alone(q.model, x, queued=True)
                finally:
                    with q.cond:
                        q.running -= 1
                        if q.items:  # the worker may be waiting for this pass to end
                            q.cond.notify()
            r.done.wait()
            if r.error is not None:
                raise r.error
            assert r.logits is not None
            return r.logits

        try:
            yield run
        finally:
            if not queued:  # the input was refused before it reached the queue
                with q.cond:
                    q.arriving -= 1
                    q.cond.notify()

    def _alone(self, model: Sequential, x: np.ndarray, queued: bool = False) -> np.ndarray:
        """A call run by itself in the caller's thread (a model that does not batch, or a
        lone caller), measured like a batch of one call; ``queued``: it went through a queue,
        with no wait."""
        logits = measured_forward(model, x, self.metrics)
        if queued and self.metrics is not None:
            self.metrics.infer_queue.observe(0.0)
        return logits

    def _retire(self, q: _Queue) -> bool:
        """An idle worker leaves unless a call arrived meanwhile."""
        with self._lock, q.cond:
            if q.items or q.arriving:
                return False
            q.alive = False
            if self._queues.get(q.key) is q:
                del self._queues[q.key]
            return True
