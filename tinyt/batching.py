"""Dynamic batching for `tinyt serve`: concurrent requests for one model decoded together.

Decoding one sentence at a time leaves most of the model's matrix multiplies tiny; decoding
the sentences of many requests in one batch keeps them large. A `DynamicBatcher` owns one
model's decoding thread. Requests queue up; whenever the thread is free, the batcher takes
everything queued (up to `max_tokens` source tokens), waits up to `max_wait` seconds for more
only when requests have recently been arriving together, decodes the batch off the event loop,
and answers each request with its own hypotheses.

    batcher = DynamicBatcher(translator)
    await batcher.start()
    hyps = await batcher.translate(["Ein Hund läuft."], SearchSettings(beam=5, nbest=2,
                                                                    length_penalty=1.0))
    await batcher.close()   # answers what is queued, then stops

A lone request is not held back by the wait (it is decoded at once), so one client's latency
stays that of one sentence decoded alone; under load, requests that arrive while a batch is
being decoded form the next batch.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tinyt.errors import TinytError
from tinyt.translation import Translator


@dataclass(frozen=True)
class SearchSettings:
    """How the sentences of one request are searched; requests with equal settings share a
    decoding batch."""

    beam: int
    nbest: int
    length_penalty: float


# One sentence's hypotheses, best first: (text, score).
Hypotheses = list[tuple[str, float]]


@dataclass
class _Pending:
    sentences: list[str]
    settings: SearchSettings
    tokens: int
    future: asyncio.Future[list[Hypotheses]]
    queued_at: float = field(default_factory=time.monotonic)


def decoding_thread() -> ThreadPoolExecutor:
    """A one-thread executor for all of a process's torch work: load the models in it too
    (`executor.submit(load_model, ...).result()`). torch gives every thread that runs
    operators its own OpenMP team; with models loaded on the main thread and decoded on
    another, the two teams on 2 cores stop keeping their threads ready between operators, and
    each small operator pays to wake them (a 10x64 matmul: 60 us instead of 5). Measured on a
    2-core server: one sentence 93 -> 75 ms at p50, 32 clients 52 -> 60 sentences/s."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinyt-decode")


class ServerBusy(TinytError):
    """More sentences are waiting than the batcher accepts (`max_queued`)."""


class DynamicBatcher:
    """Gathers one model's concurrent requests into decoding batches (see the module doc).

    max_tokens: source tokens a batch may hold (a request larger than that is a batch alone).
    max_wait: seconds to wait for more requests once one has arrived, when requests have
        been arriving together (the last batch held more than one); 0 never waits.
    max_queued: sentences that may wait; beyond that `translate` raises ServerBusy.
    thread: the one-thread executor to decode in (`decoding_thread()`), shared by the
        batchers of every model a server serves; default a new one of its own.
    """

    def __init__(self, translator: Translator, max_tokens: int = 4096, max_wait: float = 0.003,
                 max_queued: int = 4096, thread: ThreadPoolExecutor | None = None):
        self.translator = translator
        self.max_tokens = max_tokens
        self.max_wait = max_wait
        self.max_queued = max_queued
        self.queued_sentences = 0
        self.batches = 0  # decoded so far, with the requests and sentences they held
        self.requests = 0
        self.sentences = 0
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None
        # The decoding thread: batches, and the server's scoring and attention passes, run here
        # one at a time, off the event loop.
        self.owns_thread = thread is None
        self.thread = thread or decoding_thread()
        self._last_batch_requests = 0

    async def start(self) -> None:
        """Start the batching task on the running event loop."""
        self._queue = asyncio.Queue()
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Answer every queued request, then stop the batching task and the decoding thread."""
        if self._queue is not None:
            await self._queue.join()
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        if self.owns_thread:
            self.thread.shutdown(wait=True)

    async def translate(self, sentences: list[str], settings: SearchSettings
                        ) -> list[Hypotheses]:
        """Each sentence's hypotheses, best first, once its batch has been decoded."""
        if self._queue is None:
            raise RuntimeError("DynamicBatcher.start() has not been awaited")
        if not sentences:
            return []
        if self.queued_sentences + len(sentences) > self.max_queued:
            raise ServerBusy(f"the server has {self.queued_sentences} sentences waiting, its "
                             f"limit; try again in a moment")
        tokens = sum(len(ids) for ids in self.translator.tokenizers.encode_src(sentences))
        future = asyncio.get_running_loop().create_future()
        self.queued_sentences += len(sentences)
        self._queue.put_nowait(_Pending(sentences, settings, tokens, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            await asyncio.sleep(0)  # let requests that have already arrived enqueue
            tokens = batch[0].tokens
            deadline = loop.time() + (self.max_wait if self._last_batch_requests > 1 else 0.0)
            while tokens < self.max_tokens:
                if not self._queue.empty():
                    pending = self._queue.get_nowait()
                else:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        pending = await asyncio.wait_for(self._queue.get(), remaining)
                    except asyncio.TimeoutError:
                        break
                batch.append(pending)
                tokens += pending.tokens
            self._last_batch_requests = len(batch)
            try:
                live = [p for p in batch if not p.future.done()]  # cancelled: not decoded
                if live:
                    results = await loop.run_in_executor(self.thread, self._decode, live)
                    for pending, result in zip(live, results):
                        if not pending.future.done():
                            if isinstance(result, BaseException):
                                pending.future.set_exception(result)
                            else:
                                pending.future.set_result(result)
                    self.batches += 1
                    self.requests += len(live)
                    self.sentences += sum(len(p.sentences) for p in live)
            finally:
                for pending in batch:
                    self.queued_sentences -= len(pending.sentences)
                    self._queue.task_done()

    def _decode(self, batch: list[_Pending]) -> list[list[Hypotheses] | BaseException]:
        """Decode the batch's requests, those with equal settings together (in this thread).
        A failure is returned for the requests it concerns, not raised."""
        groups: dict[SearchSettings, list[int]] = defaultdict(list)
        for i, pending in enumerate(batch):
            groups[pending.settings].append(i)
        results: list[list[Hypotheses] | BaseException] = [[] for _ in batch]
        for settings, members in groups.items():
            sentences = [s for i in members for s in batch[i].sentences]
            try:
                hyps = self.translator.translate_nbest(sentences, settings.nbest, settings.beam,
                                                       settings.length_penalty)
            except Exception as exc:  # noqa: BLE001 - handed to the requests' futures
                for i in members:
                    results[i] = exc
                continue
            start = 0
            for i in members:
                results[i] = hyps[start: start + len(batch[i].sentences)]
                start += len(batch[i].sentences)
        return results
