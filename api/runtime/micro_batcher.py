"""Micro-batching across concurrent requests, with a bounded queue.

Requests submit work items from the event loop (`submit`), or from the worker thread a search
runs in (`run`: the item goes straight onto the queue and the thread waits for its answer, with
no hop through the event loop); a batcher thread takes the first waiting
item, then keeps gathering items until their summed cost reaches the token budget or
`max_wait_s` has passed since the first one, and runs them as one batch. A lone request
therefore waits at most `max_wait_s`; under load, batches fill up and throughput grows with
concurrency. A request that brings several items (a client that batches itself: the
OpenAI SDK's bulk embeds, an API tier in front of this model server) does not wait: its
items and whatever else is queued run at once, since waiting would only add its latency.

One worker suits a model in this process (a forward pass already uses every core). A model
behind HTTP gets several (`workers`), so batches overlap the round trip instead of the
pipeline idling on it.

Admission is per request, as in TEI and infinity: a request's items (its texts, its
documents) are admitted or refused together, once, against a bound counted in items
(`max_pending`: admitted and not yet answered). A request that would pass it raises
`Overloaded` at once (the API answers 503 with Retry-After) instead of queueing without
bound; an idle batcher admits any request, so one large request is never refused alone.
"""

import asyncio
import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, TypeVar

from twostage.retrieval.core.errors import Overloaded

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Pending(Generic[Item]):
    item: Item
    cost: int
    answer: Callable[[Any, BaseException | None], None]  # called in the batcher thread
    following: int = 0  # items of the same request queued right after this one


class MicroBatcher(Generic[Item, Result]):
    """Runs `run_batch(items) -> results` (same order) on gathered items in a worker thread."""

    def __init__(
        self,
        name: str,
        run_batch: Callable[[Sequence[Item]], Sequence[Result]],
        cost: Callable[[Item], int],
        *,
        budget: int,
        max_wait_s: float,
        max_pending: int,
        on_batch: Callable[[str, int, int], None] | None = None,
        max_items: int | None = None,
        workers: int = 1,
    ) -> None:
        self.name = name
        self.run_batch = run_batch
        self.cost = cost
        self.budget = budget
        self.max_wait_s = max_wait_s
        self.max_pending = max_pending
        self.on_batch = on_batch
        self.max_items = max_items  # 1: no batching (each item alone), for comparison
        self._admitted = 0  # items admitted and not yet answered
        self._admission = threading.Lock()
        self._queue: queue.Queue[_Pending[Item] | None] = queue.Queue()
        self._putting = threading.Lock()  # a request's items are queued next to each other
        self._gathering = threading.Lock()
        self._carry: _Pending[Item] | None = None  # taken, over budget: first of the next batch
        self._workers = [
            threading.Thread(target=self._loop, name=f"batcher-{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        for worker in self._workers:
            worker.start()

    @property
    def depth(self) -> int:
        """Items waiting (not yet taken by the worker)."""
        return self._queue.qsize()

    @property
    def admitted(self) -> int:
        """Items admitted and not yet answered (what `max_pending` bounds)."""
        return self._admitted

    async def submit(self, item: Item, weight: int = 1) -> Result:
        """Run one work item that counts as `weight` items (a rerank of N documents: N)."""
        self._admit(weight)
        return (await self._enqueue([(item, weight)]))[0]

    async def submit_many(self, items: Sequence[Item]) -> list[Result]:
        """Run a request's items, admitted (or refused) together."""
        self._admit(len(items))
        return await self._enqueue([(item, 1) for item in items])

    def _admit(self, weight: int) -> None:
        with self._admission:
            if self._admitted and self._admitted + weight > self.max_pending:
                raise Overloaded(self.name, retry_after_s=1, waiting=self._admitted, limit=self.max_pending)
            self._admitted += weight

    def _release(self, weight: int) -> None:
        with self._admission:
            self._admitted -= weight

    def _release_done(self, weight: int, _: object) -> None:
        self._release(weight)

    def run(self, item: Item, weight: int = 1) -> Result:
        """`submit` for a worker thread: queued from this thread, answered to it by the batcher
        thread (two thread crossings per call instead of four through the event loop)."""
        self._admit(weight)
        future: concurrent.futures.Future[Result] = concurrent.futures.Future()
        future.add_done_callback(partial(self._release_done, weight))
        self._put([_Pending(item, max(1, self.cost(item)), partial(_settle, future))])
        return future.result()

    async def _enqueue(self, items: list[tuple[Item, int]]) -> list[Result]:
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Result]] = []
        pending = []
        for item, weight in items:
            future: asyncio.Future[Result] = loop.create_future()
            future.add_done_callback(partial(self._release_done, weight))
            answer = partial(_answer_on_loop, loop, future)
            pending.append(_Pending(item, max(1, self.cost(item)), answer))
            futures.append(future)
        self._put(pending)
        return list(await asyncio.gather(*futures))

    def _put(self, pending: list[_Pending[Item]]) -> None:
        with self._putting:
            for i, entry in enumerate(pending):
                entry.following = len(pending) - 1 - i
                self._queue.put(entry)

    def close(self) -> None:
        """Finish what is queued, then stop the workers."""
        for _ in self._workers:
            self._queue.put(None)
        for worker in self._workers:
            worker.join(timeout=60)

    def _loop(self) -> None:
        while True:
            with self._gathering:  # one worker gathers at a time; the others run their batches
                gathered = self._gather()
            if gathered is None:
                return
            self._run(*gathered)

    def _gather(self) -> tuple[list[_Pending[Item]], int] | None:
        """The next batch, or None when the batcher is closing."""
        first = self._carry or self._queue.get()
        self._carry = None
        if first is None:
            return None
        batch, total = [first], first.cost
        # a lone item waits for company; a request that brought several does not
        deadline = time.monotonic() + (self.max_wait_s if first.following == 0 else 0.0)
        while total < self.budget and (self.max_items is None or len(batch) < self.max_items):
            remaining = deadline - time.monotonic()
            try:
                if batch[-1].following:  # the rest of its request is being queued now
                    nxt = self._queue.get()
                elif remaining > 0:
                    nxt = self._queue.get(timeout=remaining)
                else:
                    nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                self._queue.put(None)  # stop after this batch
                break
            if total + nxt.cost > self.budget:
                self._carry = nxt  # starts the next batch
                break
            batch.append(nxt)
            total += nxt.cost
        return batch, total

    def _run(self, batch: list[_Pending[Item]], total: int) -> None:
        if self.on_batch is not None:
            self.on_batch(self.name, len(batch), total)
        try:
            results = list(self.run_batch([p.item for p in batch]))
        except Exception as exc:
            if len(batch) == 1:
                self._fail(batch[0], exc)
                return
            for pending in batch:  # isolate the failing item: the others still get answers
                self._run([pending], pending.cost)
            return
        for pending, result in zip(batch, results, strict=True):
            pending.answer(result, None)

    @staticmethod
    def _fail(pending: _Pending[Any], exc: BaseException) -> None:
        pending.answer(None, exc)


def _answer_on_loop(
    loop: asyncio.AbstractEventLoop, future: "asyncio.Future[Any]", result: Any, exc: BaseException | None
) -> None:
    loop.call_soon_threadsafe(_resolve, future, result, exc)


def _settle(future: "concurrent.futures.Future[Any]", result: Any, exc: BaseException | None) -> None:
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def _resolve(future: "asyncio.Future[Any]", result: Any, exc: BaseException | None) -> None:
    if future.cancelled():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
