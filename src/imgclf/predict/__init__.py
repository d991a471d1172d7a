"""Predict stage: classify files, folders, globs, URLs or a CSV of them, in batches.

    imgclf predict --model RUN_DIR photos/ 'more/**/*.jpg' https://host/a.jpg -o preds.csv
    imgclf predict --model model.onnx list.csv -o preds.jsonl     # the table download read: url/path columns

A model is a run directory or checkpoint (PyTorch), or a file written by `imgclf export`
(ONNX via onnxruntime, or TorchScript); each carries its class names and its eval
preprocessing, applied to each batch by `Classifier.prepare_batch` (bitwise
`presets.eval_transform` for PyTorch; without torch for ONNX, see imgclf.inference).
Output: one row per input (CSV or JSONL) with the top-k labels and probabilities, written as
batches finish; an input that cannot be read or decoded gets its error in its row and the
batch goes on. Inputs stream (predict._inputs is lazy, predict._loader reads ahead in
threads): memory stays flat however many images there are. With an ONNX model, torch is
never imported. The model is opened by `imgclf.inference.load_classifier`, as serve does.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from imgclf.csvfile import RowWriter
from imgclf.errors import ConfigError
from imgclf.inference import Classifier, load_classifier
from imgclf.inference._tta import check_mode as check_tta
from imgclf.predict._inputs import Input, TableColumns, expand_inputs, passed_through
from imgclf.predict._loader import LoadPlan, load_batches
from imgclf.prediction import Prediction
from imgclf.progress import track

log = logging.getLogger(__name__)

__all__ = ["PredictOptions", "PredictResult", "Prediction", "load_classifier", "predict", "run", "write_predictions"]


@dataclass(frozen=True)
class PredictOptions:
    # What: the model, the inputs, and where the rows go (`out` None: stdout; `format` None: from out's suffix)
    model: str | Path | None = None  # a run directory, checkpoint, .onnx or TorchScript file
    inputs: tuple[str, ...] = ()  # files, folders, globs, URLs, tables
    out: Path | None = None
    backend: str = "auto"  # auto: the model file's own (imgclf.inference.OPENERS)
    format: str | None = None  # csv or jsonl
    # How
    top_k: int = 5
    batch_size: int = 64
    progress: bool = True
    timeout: float = 15.0  # seconds per URL fetch (private addresses allowed: the user's own command)
    read_threads: int = min(4, os.cpu_count() or 1)  # batches read, decoded and preprocessed ahead
    tta: str = "none"  # test-time augmentation: none, flip or crops (imgclf.inference._tta)
    columns: TableColumns = TableColumns()  # --url-col / --path-col of table inputs (as in download)

    def __post_init__(self) -> None:
        inputs = (self.inputs,) if isinstance(self.inputs, str | Path) else self.inputs
        object.__setattr__(self, "inputs", tuple(str(i) for i in inputs))  # frozen: normalised once
        if self.out is not None:
            object.__setattr__(self, "out", Path(self.out))

    def output_format(self) -> str:
        """csv or jsonl: `format` when given, else jsonl for an `out` named .jsonl/.ndjson, else csv."""
        if self.format:
            return self.format
        if self.out is not None and self.out.suffix.lower() in (".jsonl", ".ndjson"):
            return "jsonl"
        return "csv"


@dataclass(frozen=True)
class PredictResult:
    """Rows written (`ok` classified, `failed` with their error), and where (None: stdout)."""

    ok: int
    failed: int
    out: Path | None

    def summary(self) -> str:
        """What the CLI prints on stderr: the inputs that could not be classified ("" when there are none;
        the predictions themselves are the command's output)."""
        if not self.failed:
            return ""
        return (f"imgclf predict: {self.failed} of {self.ok + self.failed} inputs could not be classified "
                "(see the error column)")


def predict(items: Iterable[Input], classifier: Classifier, options: PredictOptions) -> Iterator[Prediction]:
    """Yield one Prediction per input, in input order, as batches come (inputs are consumed lazily).

    Reading, decoding and preprocessing run in `read_threads` threads ahead of the model
    (predict._loader), so memory stays bounded however many inputs there are.
    """
    plan = LoadPlan(options.batch_size, options.read_threads, options.timeout)
    for batch in load_batches(items, classifier, plan):
        outs = iter(classifier.outputs(classifier.probabilities(batch.inputs), options.top_k)
                    if batch.inputs is not None else ())
        for item, error in zip(batch.items, batch.errors, strict=True):
            if error:
                yield Prediction(item.source, [], error, item.columns)
            else:
                top, labels = next(outs)
                yield Prediction(item.source, top, columns=item.columns, labels=labels)


class CsvWriter:
    """input,status,error,label_1,probability_1,...[,the input tables' other columns]: one row per input,
    spreadsheet-safe. A passed-through column named like one of ours is written as input_<name>.
    A multi-label model adds `labels,scores` after `error`: the labels above their thresholds joined by
    `|`, and their probabilities in the same order."""

    def __init__(self, stream: IO[str], k: int, passed: list[str] | None = None, multilabel: bool = False) -> None:
        self._writer = RowWriter(stream)
        self._k = k
        self._passed = list(passed or [])
        self._multilabel = multilabel
        header = ["input", "status", "error"] + (["labels", "scores"] if multilabel else [])
        for i in range(1, k + 1):
            header += [f"label_{i}", f"probability_{i}"]
        self._writer.writerow(header + [f"input_{c}" if c in header else c for c in self._passed])

    def write(self, pred: Prediction) -> None:
        # Inputs, errors and labels are user data: a cell a spreadsheet would run as a formula gets a
        # leading apostrophe (RowWriter: imgclf.csvfile); JSONL keeps the raw text.
        row: list[Any] = [pred.input, pred.status, pred.error]
        if self._multilabel:
            chosen = pred.labels or []
            row += ["|".join(label for label, _ in chosen), "|".join(f"{p:.6f}" for _, p in chosen)]
        for label, probability in pred.top[: self._k]:
            row += (label, f"{probability:.6f}")
        row += ("", "") * (self._k - min(len(pred.top), self._k))
        cells = dict(pred.columns)
        row += [cells.get(c, "") for c in self._passed]
        self._writer.writerow(row)


class JsonlWriter:
    """One JSON object per line: {"input", "status", "error", "top": [{"label", "probability"}]},
    and "columns": {name: value} with an input table row's other cells. A multi-label model adds
    "task": "multilabel" and "labels": [{"label", "score"}] (the labels above their thresholds)."""

    def __init__(self, stream: IO[str], k: int, passed: list[str] | None = None, multilabel: bool = False) -> None:
        self._stream = stream
        self._multilabel = multilabel

    def write(self, pred: Prediction) -> None:
        top = [{"label": label, "probability": round(p, 6)} for label, p in pred.top]
        row: dict[str, Any] = {"input": pred.input, "status": pred.status, "error": pred.error, "top": top}
        if self._multilabel:
            row["task"] = "multilabel"
            row["labels"] = [{"label": label, "score": round(p, 6)} for label, p in pred.labels or []]
        if pred.columns:
            row["columns"] = dict(pred.columns)
        # ensure_ascii: a file name that is not UTF-8 (surrogate escapes) stays a valid JSON escape.
        self._stream.write(json.dumps(row, ensure_ascii=True) + "\n")


def write_predictions(preds: Iterable[Prediction], stream: IO[str], fmt: str, k: int,
                      passed: list[str] | None = None, multilabel: bool = False) -> tuple[int, int]:
    """Write rows as they come; returns (ok, failed) counts. `passed`: the table columns carried through;
    `multilabel`: the model's predictions carry label sets (the labels/scores columns)."""
    writer = (JsonlWriter if fmt == "jsonl" else CsvWriter)(stream, k, passed, multilabel)
    ok = failed = 0
    for pred in preds:
        writer.write(pred)
        ok, failed = (ok + 1, failed) if pred.status == "ok" else (ok, failed + 1)
    return ok, failed



def run(options: PredictOptions) -> PredictResult:
    """Predict every input of `options.inputs` into `options.out` (stdout when None)."""
    if options.top_k < 1 or options.batch_size < 1:
        raise ConfigError("predict: --top-k and --batch-size must be at least 1")
    if options.model is None:
        raise ConfigError("predict: give a model: --model MODEL")
    out, inputs = options.out, list(options.inputs)
    classifier = load_classifier(options.model, options.backend)
    classifier.tta = check_tta(options.tta)
    items = expand_inputs(inputs, options.columns)  # lazy: a folder or table is read as the predictions go
    passed = passed_through(inputs, options.columns)
    fmt = options.output_format()
    # The count is unknown until the inputs are consumed: the progress shows images done and images/s.
    preds = track(predict(items, classifier, options), "predict", unit="images", enabled=options.progress)
    # surrogateescape: a file name that is not valid UTF-8 is written back as its own bytes (it
    # round-trips when read with the same handler), in a file and on stdout, instead of failing.
    if out is None:
        if hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(errors="surrogateescape")
        return PredictResult(*write_predictions(preds, sys.stdout, fmt, options.top_k, passed, classifier.multilabel),
                             None)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8", errors="surrogateescape") as stream:
        return PredictResult(*write_predictions(preds, stream, fmt, options.top_k, passed, classifier.multilabel),
                             out)
