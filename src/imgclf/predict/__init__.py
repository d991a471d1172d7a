"""Predict stage: classify files, folders, globs, URLs or a CSV of them, in batches.

    imgclf predict --model RUN_DIR photos/ 'more/**/*.jpg' https://host/a.jpg --out preds.csv
    imgclf predict --model model.onnx --backend onnx list.csv --out preds.jsonl

A model is a run directory or checkpoint (PyTorch), or a file written by `imgclf export`
(ONNX via onnxruntime, or TorchScript); each carries its class names and its eval
preprocessing, which is applied with `presets.eval_transform`, never re-implemented.
Output: one row per input (CSV or JSONL) with the top-k labels and probabilities; an input
that cannot be read or decoded gets its error in its row and the batch goes on.
The model is opened by `imgclf.inference.load_classifier`, as serve and evaluate do.
"""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from tqdm import tqdm

from imgclf.errors import ConfigError
from imgclf.images import Rejected, decode_image
from imgclf.inference import PREDICT_LIMITS, Classifier, load_classifier, preprocess_pool
from imgclf.net.guard import FetchedBody, FetchOptions, fetch_all
from imgclf.predict._inputs import Input, expand_inputs

log = logging.getLogger(__name__)

__all__ = ["PredictOptions", "Prediction", "load_classifier", "predict", "run", "write_predictions"]


@dataclass(frozen=True)
class PredictOptions:
    top_k: int = 5
    batch_size: int = 64
    progress: bool = True
    fetch: FetchOptions = FetchOptions(allow_private=True)  # the user's own command may read their LAN
    read_threads: int = min(4, os.cpu_count() or 1)


@dataclass(frozen=True)
class Prediction:
    input: str
    top: list[tuple[str, float]]
    error: str = ""

    @property
    def status(self) -> str:
        return "error" if self.error else "ok"


def _read_file(path: str) -> bytes | str:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as err:
        return f"{err.strerror or err.__class__.__name__}"


def _load_batch(items: list[Input], classifier: Classifier, options: PredictOptions,
                pool: ThreadPoolExecutor) -> list[torch.Tensor | str]:
    """Each input as a preprocessed tensor, or the reason it is unusable (a value, not an exception)."""
    urls = [item.source for item in items if item.kind == "url"]
    fetched = iter(asyncio.run(fetch_all(urls, options.fetch)) if urls else [])

    def one(item: Input, body: Any) -> torch.Tensor | str:
        if item.kind == "missing":
            return item.error
        if item.kind == "url":
            if not isinstance(body, FetchedBody):
                return f"{body.code}: {body.reason}"
            body = body.data
        else:
            body = _read_file(item.source)
            if isinstance(body, str):
                return body
        decoded = decode_image(body, PREDICT_LIMITS)
        if isinstance(decoded, Rejected):
            return f"{decoded.status}: {decoded.reason}"
        return classifier.prepare(decoded.image)

    bodies = [next(fetched) if item.kind == "url" else None for item in items]
    return list(pool.map(one, items, bodies))


def _chunks(items: list[Input], size: int) -> Iterator[list[Input]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def predict(items: list[Input], classifier: Classifier, options: PredictOptions) -> Iterator[Prediction]:
    """Yield one Prediction per input, in input order; reading of batch i+1 overlaps inference on batch i."""
    with preprocess_pool(options.read_threads) as pool, ThreadPoolExecutor(1) as reader:
        chunks = _chunks(items, options.batch_size)
        pending: Future | None = None
        current = next(chunks, None)
        while current is not None:
            loaded = (pending.result() if pending else _load_batch(current, classifier, options, pool))
            following = next(chunks, None)
            pending = (reader.submit(_load_batch, following, classifier, options, pool)
                       if following is not None else None)
            good = [t for t in loaded if isinstance(t, torch.Tensor)]
            probs = iter(classifier.probabilities(good) if good else [])
            for item, value in zip(current, loaded, strict=True):
                if isinstance(value, str):
                    yield Prediction(item.source, [], value)
                else:
                    yield Prediction(item.source, classifier.top_k(next(probs), options.top_k))
            current = following


class CsvWriter:
    """input,status,error,label_1,probability_1,...: one row per input, spreadsheet-friendly."""

    def __init__(self, stream: IO[str], k: int) -> None:
        self._writer = csv.writer(stream)
        self._k = k
        header = ["input", "status", "error"]
        for i in range(1, k + 1):
            header += [f"label_{i}", f"probability_{i}"]
        self._writer.writerow(header)

    def write(self, pred: Prediction) -> None:
        row: list[Any] = [pred.input, pred.status, pred.error]
        for i in range(self._k):
            row += [pred.top[i][0], f"{pred.top[i][1]:.6f}"] if i < len(pred.top) else ["", ""]
        self._writer.writerow(row)


class JsonlWriter:
    """One JSON object per line: {"input", "status", "error", "top": [{"label", "probability"}]}."""

    def __init__(self, stream: IO[str], k: int) -> None:
        self._stream = stream

    def write(self, pred: Prediction) -> None:
        top = [{"label": label, "probability": round(p, 6)} for label, p in pred.top]
        self._stream.write(json.dumps({"input": pred.input, "status": pred.status, "error": pred.error,
                                       "top": top}) + "\n")


def write_predictions(preds: Iterable[Prediction], stream: IO[str], fmt: str, k: int) -> tuple[int, int]:
    """Write rows as they come; returns (ok, failed) counts."""
    writer = JsonlWriter(stream, k) if fmt == "jsonl" else CsvWriter(stream, k)
    ok = failed = 0
    for pred in preds:
        writer.write(pred)
        ok, failed = (ok + 1, failed) if pred.status == "ok" else (ok, failed + 1)
    return ok, failed


def _output_format(out: Path | None, fmt: str | None) -> str:
    if fmt:
        return fmt
    if out is not None and out.suffix.lower() in (".jsonl", ".ndjson"):
        return "jsonl"
    return "csv"


def run(inputs: list[str], model: str | Path, out: Path | None = None, backend: str = "auto",
        options: PredictOptions = PredictOptions(), fmt: str | None = None) -> tuple[int, int]:
    """Predict every input into `out` (stdout when None); returns (ok, failed) counts."""
    if options.top_k < 1 or options.batch_size < 1:
        raise ConfigError("predict: --top-k and --batch-size must be at least 1")
    classifier = load_classifier(model, backend)
    items = expand_inputs(inputs)
    fmt = _output_format(out, fmt)
    preds = predict(items, classifier, options)
    preds = tqdm(preds, total=len(items), unit="img", disable=not options.progress, file=sys.stderr)
    if out is None:
        return write_predictions(preds, sys.stdout, fmt, options.top_k)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as stream:
        return write_predictions(preds, stream, fmt, options.top_k)
