"""Dynamic batching: concurrent requests answered by one batched call.

:class:`Batcher` runs a function that takes a list of jobs and returns one result per job
(for the service: :meth:`Retriever.recommend_batch`, one query-tower forward and one index
search for the whole list) on one background thread. ``await batcher.submit(job)`` queues a
job and waits for its own result.

When to flush is adaptive, so that a request alone never waits for company:

* the thread takes every job already queued, up to ``max_batch``;
* it waits up to ``window_s`` for more only when the batch before had company (more than one
  job) and the window is not zero, and stops waiting as soon as the batch is as large as the
  one before (with N clients in a loop, N jobs are what is coming). Under load, the jobs that
  arrive while a batch is computed form the next batch anyway; the window adds the ones that
  arrive just after.

When the batched call raises, each job of that batch is run again alone, so a job that fails
gets its own exception and the others their results. Results are handed back to each job's
event loop with ``call_soon_threadsafe``, so one batcher can serve several loops (the threads of
a test client, say).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Job = TypeVar("Job")
Result = TypeVar("Result")


@dataclass
class BatchStats:
    """Counters of a batcher (read them for metrics and tests).

    Attributes:
        batches: Batched calls made (retries of single jobs after a failure not included).
        jobs: Jobs answered.
        largest: Largest batch so far.
        failed_batches: Batched calls that raised (their jobs were then run one by one).
        sizes: Number of batches per size.
    """

    batches: int = 0
    jobs: int = 0
    largest: int = 0
    failed_batches: int = 0
    sizes: dict[int, int] = field(default_factory=dict)


class _Pending(Generic[Job]):
    __slots__ = ("job", "future", "loop")

    def __init__(self, job: Job, future: asyncio.Future, loop: asyncio.AbstractEventLoop) -> None:
        self.job = job
        self.future = future
        self.loop = loop


_STOP = object()


class Batcher(Generic[Job, Result]):
    """Combine jobs submitted at about the same time into one call of ``run``.

    Args:
        run: Takes a non-empty list of jobs, returns one result per job, in order. Called on
            the batcher's thread only, never concurrently with itself.
        window_s: How long to wait for more jobs once the previous batch had company
            (0: never wait; take what is queued).
        max_batch: Most jobs per call.
        name: Name of the background thread.
    """

    def __init__(
        self,
        run: Callable[[list[Job]], Sequence[Result]],
        window_s: float = 0.001,
        max_batch: int = 64,
        name: str = "twotower-batcher",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if window_s < 0:
            raise ValueError(f"window_s must be >= 0, got {window_s}")
        self.run = run
        self.window_s = float(window_s)
        self.max_batch = int(max_batch)
        self.stats = BatchStats()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._name = name
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    async def submit(self, job: Job) -> Result:
        """Queue ``job`` and wait for its result (or its exception).

        Raises:
            Exception: Whatever ``run`` raised for this job alone.
        """
        self._start()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(_Pending(job, future, loop))
        return await future

    def close(self, timeout: float = 5.0) -> None:
        """Answer what is queued, then stop the thread (a later ``submit`` starts a new one).

        The app's shutdown calls it; an app started again (a test client's second
        ``with``) keeps batching.
        """
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is None:
                return
            self._queue.put(_STOP)
        thread.join(timeout)
        if not self._queue.empty():  # submitted while it stopped: nobody would answer them
            self._start()

    # -- the background thread -----------------------------------------------------------------

    def _start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        previous = 1
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch: list[_Pending] = [first]
            stop = self._fill(batch, expect=previous if self.window_s > 0 else 1)
            previous = len(batch)
            self._answer(batch)
            if stop:
                return

    def _fill(self, batch: list[_Pending], expect: int) -> bool:
        """Add queued jobs, waiting up to the window while fewer than ``expect`` are in.

        Returns:
            True when told to stop.
        """
        deadline = time.perf_counter() + self.window_s
        while len(batch) < self.max_batch:
            try:
                remaining = deadline - time.perf_counter()
                wait = len(batch) < expect and remaining > 0
                item = self._queue.get(timeout=remaining) if wait else self._queue.get_nowait()
            except queue.Empty:
                return False
            if item is _STOP:
                return True
            batch.append(item)
        return False

    def _answer(self, batch: list[_Pending]) -> None:
        jobs = [p.job for p in batch]
        outcomes: list[tuple[bool, object]]
        try:
            results = list(self.run(jobs))
            if len(results) != len(jobs):
                raise RuntimeError(f"batched call returned {len(results)} results for {len(jobs)}")
            outcomes = [(True, r) for r in results]
        except Exception as e:  # noqa: BLE001 - isolate the failing job: run each one alone
            self.stats.failed_batches += 1
            outcomes = [self._alone(j) for j in jobs] if len(jobs) > 1 else [(False, e)]
        s = self.stats
        s.batches += 1
        s.jobs += len(jobs)
        s.largest = max(s.largest, len(jobs))
        s.sizes[len(jobs)] = s.sizes.get(len(jobs), 0) + 1
        for pending, (ok, value) in zip(batch, outcomes, strict=True):
            try:
                pending.loop.call_soon_threadsafe(_settle, pending.future, ok, value)
            except RuntimeError:  # that request's event loop is gone: nobody waits for it
                pass

    def _alone(self, job: Job) -> tuple[bool, object]:
        try:
            (result,) = self.run([job])
            return True, result
        except Exception as e:  # noqa: BLE001 - handed to the job's own awaiting request
            return False, e


def _settle(future: asyncio.Future, ok: bool, value: object) -> None:
    if future.done():  # the request was cancelled (client gone)
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)  # type: ignore[arg-type]
