"""Micro-batching for serve: requests that arrive while the model is busy share one batch.

Each request is decoded and preprocessed in serve's thread pool (`Classifier.prepare`: one
image -> float32 (3, S, S)); the batcher stacks what is queued and runs the model once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from imgclf.inference import Classifier

log = logging.getLogger("imgclf.serve")


class MicroBatcher:
    """Collects tensors from concurrent requests and runs them through the model together.

    Greedy: a batch is whatever is queued when the model becomes free, so a lone request
    never waits for company, and a burst is classified in a few large batches.
    """

    def __init__(self, classifier: Classifier, max_batch: int,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.classifier = classifier
        self.max_batch = max(1, max_batch)
        self.on_batch = on_batch  # told each batch's size (serve's /metrics)
        # One thread owns the model: batches run one at a time with all of torch's intra-op threads.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="imgclf-model")
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future]] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=False)

    async def probabilities(self, image: np.ndarray) -> np.ndarray:
        """One preprocessed image (3, S, S) -> its class probabilities, computed in a shared batch."""
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        await self._queue.put((image, future))
        return await future

    def _run(self, images: list[np.ndarray]) -> np.ndarray:
        if self.on_batch is not None:
            self.on_batch(len(images))
        return self.classifier.probabilities(np.stack(images))

    async def _loop(self) -> None:
        while True:
            items = [await self._queue.get()]
            while len(items) < self.max_batch and not self._queue.empty():
                items.append(self._queue.get_nowait())
            try:
                probs = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._run, [image for image, _ in items])
            except Exception as err:  # a model failure fails these requests, never the loop
                log.exception("inference failed for a batch of %d", len(items))
                for _, future in items:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, future), row in zip(items, probs, strict=True):
                if not future.done():  # the client may have gone away
                    future.set_result(row)
