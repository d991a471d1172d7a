"""predict's input side: inputs -> batches ready for the model, read ahead in threads, in bounded memory.

`load_batches(items, classifier, plan)` consumes the inputs lazily (any iterable: a folder of a
million files is never listed in memory as images), cuts them into batches of `batch_size` and
loads each batch in a thread of the preprocessing pool: fetch its URLs, read its files, decode
each body with `images.decode_image` (the one place that decides what an image is, with the
resize bound of `ImageLimits.for_resize`), then preprocess the whole batch at once
(`Classifier.prepare_batch`). While the model runs on one batch, `threads` more are loading, so
at most `threads + 2` batches exist at any time, whatever the input's length.

A batch keeps its inputs' order; an input that cannot be used gets its reason ("not_image: ...",
"http_error: HTTP 404 ...") as a value and the batch goes on.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from imgclf.errors import first_line
from imgclf.images import MAX_FILE_BYTES, ImageLimits, Rejected, decode_image, read_file
from imgclf.inference import PREDICT_LIMITS, Classifier, preprocess_pool
from imgclf.predict._inputs import Input


@dataclass(frozen=True)
class LoadPlan:
    batch_size: int = 64
    threads: int = 2  # batches loading while the model runs
    fetch_timeout: float = 15.0  # seconds per URL, redirects included


@dataclass
class LoadedBatch:
    items: list[Input]
    errors: list[str]  # per item: "" when its image is in `inputs`, else why it is unusable
    inputs: np.ndarray | None  # the usable images, preprocessed: float32 (n_ok, 3, S, S)


def _fetch(urls: list[str], timeout: float) -> list[Any]:
    # Imported here: aiohttp costs a noticeable share of a one-image predict's start.
    from imgclf.net.guard import FetchOptions, fetch_all

    # allow_private: predict is the user's own command, which may read their LAN.
    return asyncio.run(fetch_all(urls, FetchOptions(allow_private=True, total_timeout=timeout)))


def _body(item: Input, fetched: Any) -> bytes | str:
    if item.kind == "missing":
        return item.error
    if item.kind == "url":
        from imgclf.net.guard import FetchedBody

        return fetched.data if isinstance(fetched, FetchedBody) else f"{fetched.code}: {fetched.reason}"
    # A regular file only, size-capped: a FIFO never blocks, /dev/zero is never read.
    data = read_file(item.source, MAX_FILE_BYTES)
    return f"{data.status}: {data.reason}" if isinstance(data, Rejected) else data


def _decode(item: Input, fetched: Any, limits: ImageLimits) -> Image.Image | str:
    try:
        body = _body(item, fetched)
        if isinstance(body, str):
            return body
        decoded = decode_image(body, limits, keep_grey=True)  # grey stays grey: a third of the resize work
        return f"{decoded.status}: {decoded.reason}" if isinstance(decoded, Rejected) else decoded.image
    except Exception as err:  # errors are values: one input never takes the batch down
        return f"error: {first_line(err)}"


def _prepare_batch(classifier: Classifier, images: list[Image.Image], errors: list[str]) -> np.ndarray | None:
    if not images:
        return None
    try:
        return classifier.prepare_batch(images)
    except Exception:  # noqa: BLE001 - find the image at fault, one at a time, and keep the others
        out = []
        slots = [i for i, error in enumerate(errors) if not error]
        for slot, image in zip(slots, images, strict=True):
            try:
                out.append(classifier.prepare(image))
            except Exception as err:
                errors[slot] = f"error: {first_line(err)}"
        return np.stack(out) if out else None


def load_batch(items: list[Input], classifier: Classifier, plan: LoadPlan) -> LoadedBatch:
    """One batch: fetch, read, decode, preprocess (runs in a pool thread)."""
    urls = [item.source for item in items if item.kind == "url"]
    fetched = iter(_fetch(urls, plan.fetch_timeout) if urls else [])
    limits = PREDICT_LIMITS.for_resize(classifier.preprocessing.resize_size)
    images: list[Image.Image] = []
    errors: list[str] = []
    for item in items:
        result = _decode(item, next(fetched) if item.kind == "url" else None, limits)
        errors.append(result if isinstance(result, str) else "")
        if not isinstance(result, str):
            images.append(result)
    return LoadedBatch(items, errors, _prepare_batch(classifier, images, errors))


def _chunks(items: Iterable[Input], size: int) -> Iterator[list[Input]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def load_batches(items: Iterable[Input], classifier: Classifier, plan: LoadPlan) -> Iterator[LoadedBatch]:
    """Loaded batches in input order, `plan.threads` of them loading ahead of the one being used."""
    threads = max(1, plan.threads)
    with preprocess_pool(threads, classifier) as pool:
        pending: deque[Future[LoadedBatch]] = deque()
        try:
            for chunk in _chunks(items, max(1, plan.batch_size)):
                pending.append(pool.submit(load_batch, chunk, classifier, plan))
                if len(pending) > threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # the consumer stopped early (an error, `| head`): drop what has not started
            for future in pending:
                future.cancel()
