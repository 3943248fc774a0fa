"""Batched inference for a sampler that takes a list of turns (transformers `generate`): every episode step that
waits for an action joins the next call, so N episodes cost one model call per tick rather than N. A batch that
fails is retried request by request, so one broken turn fails one episode, not N. Used by 04_async_loop.py's pool
(an engine that batches continuously itself, vLLM, gets one request per step instead).
"""
from __future__ import annotations

import asyncio
import concurrent.futures


class Batcher:
    def __init__(self, sampler, store, max_batch: int, timeline, stats):
        self.sampler, self.store, self.max_batch, self.timeline, self.stats = sampler, store, max_batch, timeline, stats
        self.requests: list = []  # (turn, future) waiting for inference
        self._work = asyncio.Event()  # made in the event loop that serves
        # one thread: the event loop keeps stepping the other browsers while the model generates
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="inference")

    async def infer(self, turn):
        future = asyncio.get_running_loop().create_future()
        self.requests.append((turn, future))
        self._work.set()
        return await future

    async def serve(self):
        while True:  # until cancelled
            await self._work.wait()
            self._work.clear()
            while self.requests:  # everything that waits now goes into one call; newcomers join the next one
                batch = self.requests[:self.max_batch]
                del self.requests[:len(batch)]
                await self._serve(batch)

    async def _serve(self, batch: list) -> None:
        try:
            with self.timeline.span("inference", "sample", n=len(batch)):
                samples = await asyncio.get_running_loop().run_in_executor(
                    self.executor, self.sampler.sample, [t for t, _ in batch], self.store)
        except Exception as e:
            if len(batch) > 1:  # isolate the bad request: one broken turn must not fail N episodes
                for request in batch:
                    await self._serve([request])
            elif not batch[0][1].done():
                batch[0][1].set_exception(e)
            return
        self.stats.inference_calls += 1
        self.stats.inference_replies += len(batch)
        for (_, future), sample in zip(batch, samples):
            if not future.done():
                future.set_result(sample)

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
