"""Batch predict on Ray: `imgclf predict --engine ray`, for inputs too many for one process.

    imgclf predict --engine ray --model RUN_DIR DATA_DIR -o preds.csv             # a private local Ray
    imgclf predict --engine ray --address HOST:6379 --model m.onnx s3://b/data list.csv -o preds.jsonl

Inputs are what `imgclf predict` takes (files, folders, globs, URLs, CSV of them) and also data
directories (a folder or an s3:// URL holding manifest.parquet, or a folder whose manifest is written as
parts): their rows with status ok, read with `imgclf.storage.read_row` from either layout, named by
their `url` column. A parts manifest is never read by the driver: it is cut into slices of at most
`shard_size` rows of one row group (from the parts' Parquet footers), and each worker reads its own
slice, so a billion-row DATA_DIR costs the driver a few hundred bytes per slice, not a row per image.
The inputs are cut into shards of `shard_size` rows in input order; each shard is one Ray task that
opens the model once per worker process (kept for the next shard), predicts with the single-process
code, and hands its rows back as text; the driver writes `<output>.parts/part-00000.<fmt>` (atomically)
as shards finish, and when every shard is there, the merged file `<output>` in input order, then removes
the parts folder. A killed run leaves finished parts: the same command again skips them (the parts
folder records which inputs, model and options they belong to). At most two shards per worker are in
flight; a task whose worker dies is retried by Ray, one that fails is sent again `shard_retries` times,
then the command stops naming the shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from imgclf import manifest, storage
from imgclf._files import atomic_path, write_atomic
from imgclf.errors import ConfigError, DataError, ImgclfError, first_line
from imgclf.images import Rejected, decode_image
from imgclf.inference import PREDICT_LIMITS, Classifier, load_classifier
from imgclf.manifest import MANIFEST_NAME, read_manifest, row_refs, usable_rows
from imgclf.predict import Prediction, PredictOptions, PredictResult, predict, write_predictions
from imgclf.predict._inputs import Input, expand_inputs, is_url

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # an existing cluster; None: a private local one, stopped at the end
    workers: int = 1  # Ray worker processes (CPUs) for a private cluster; tasks in flight: 2 per worker
    shard_size: int = 1000  # inputs per task (and per part file)
    shard_retries: int = 2  # a shard whose task raised is sent again this many times


@dataclass(frozen=True)
class RowInput:
    """A manifest row: its name in the output (the row's url) and where its stored image is."""

    source: str
    data_dir: str
    ref: storage.RowRef


@dataclass(frozen=True)
class PartSlice:
    """Rows [start, stop) of row group `group` of one manifest part, read by the worker that predicts them.
    `stamp` (the part's size and mtime) puts a rewritten manifest into another resume plan."""

    data_dir: str
    part: str
    group: int
    start: int
    stop: int
    stamp: str

    @property
    def source(self) -> str:  # how an error names the shard
        return f"{self.part} row group {self.group} rows {self.start}-{self.stop}"


Unit = Input | RowInput | PartSlice
_ROW_COLUMNS = ("url", "path", "status", "shard", "offset", "bytes")


def is_data_dir(arg: str) -> bool:
    """A folder or an object-store prefix holding manifest.parquet (never asked of an http(s) image URL)."""
    if is_url(arg):
        return False
    if storage.is_url(arg):
        return storage.exists(arg, MANIFEST_NAME)
    return Path(arg).is_dir() and (Path(arg) / MANIFEST_NAME).is_file()


def part_slices(data_dir: str, size: int) -> Iterator[PartSlice]:
    """A parts manifest as slices of at most `size` rows, one row group each: read from the footers only."""
    import pyarrow.parquet as pq

    for part in manifest.part_files(data_dir):
        stat = part.stat()
        stamp, name = f"{stat.st_size}-{stat.st_mtime_ns}", str(part)
        try:
            meta = pq.ParquetFile(part).metadata
        except (OSError, ValueError) as err:  # a corrupt part: pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"{part}: unreadable manifest part ({err.__class__.__name__})") from None
        for group in range(meta.num_row_groups):
            rows = meta.row_group(group).num_rows
            for start in range(0, rows, size):
                yield PartSlice(data_dir, name, group, start, min(rows, start + size), stamp)


def _slice_rows(unit: PartSlice) -> list[RowInput]:
    """The ok rows of one slice (in the worker): one row group read, only the columns a row needs."""
    import pyarrow.parquet as pq

    try:
        source = pq.ParquetFile(unit.part)
        columns = [c for c in _ROW_COLUMNS if c in source.schema_arrow.names]
        table = source.read_row_group(unit.group, columns=columns).slice(unit.start, unit.stop - unit.start)
    except (OSError, ValueError) as err:
        raise DataError(f"{unit.part}: unreadable manifest part ({err.__class__.__name__})") from None
    rows = usable_rows(table.to_pandas())
    return [RowInput(str(url), unit.data_dir, ref) for url, ref in zip(rows["url"], row_refs(rows), strict=True)]


def _weight(unit: Unit) -> int:
    """Inputs a unit stands for (a slice holds up to shard_size rows; filtered rows are counted too)."""
    return unit.stop - unit.start if isinstance(unit, PartSlice) else 1


def cut_shards(units: list[Unit], size: int) -> list[list[Unit]]:
    """Consecutive shards of about `size` inputs each (a slice is never split; it is at most `size`)."""
    shards: list[list[Unit]] = []
    current: list[Unit] = []
    held = 0
    for unit in units:
        if current and held + _weight(unit) > size:
            shards.append(current)
            current, held = [], 0
        current.append(unit)
        held += _weight(unit)
    if current:
        shards.append(current)
    return shards


def expand_units(arguments: list[str], slice_rows: int = 1000) -> list[Unit]:
    """The inputs in order: a data directory becomes its ok rows (a parts manifest: slices of at most
    `slice_rows` rows, read by the workers), anything else what predict expands it to.

    Local paths are made absolute (Ray workers need not share the driver's working directory);
    the output keeps the names the user gave."""
    units: list[Unit] = []
    for arg in arguments:
        if not is_url(arg) and manifest.is_parts(arg):  # is_parts: local folders only
            units += part_slices(storage.display(arg), slice_rows)
        elif is_data_dir(arg):
            data_dir = storage.display(arg)
            rows = usable_rows(read_manifest(data_dir))
            units += [RowInput(str(url), data_dir, ref) for url, ref in zip(rows["url"], row_refs(rows), strict=True)]
        else:
            units += expand_inputs([arg])
    return units


# ---- inside a Ray worker -------------------------------------------------------------------------
_CLASSIFIERS: dict[tuple[str, str], Classifier] = {}  # one per worker process, reused by its next shards


def _classifier(model: str, backend: str, options: PredictOptions) -> Classifier:
    key = (model, backend)
    if key not in _CLASSIFIERS:
        _CLASSIFIERS.clear()
        _CLASSIFIERS[key] = load_classifier(model, backend)
    classifier = _CLASSIFIERS[key]
    if getattr(options, "tta", "none") != "none":  # test-time augmentation, as the single-process predict
        classifier.tta = options.tta
    return classifier


def _readable(unit: Input, cwd: str) -> Input:
    """The same input with an absolute path (the output row still shows `unit.source`)."""
    if unit.kind != "file" or os.path.isabs(unit.source):
        return unit
    return replace(unit, source=os.path.join(cwd, unit.source))


def _predict_rows(rows: list[RowInput], classifier: Classifier, options: PredictOptions) -> Iterator[Prediction]:
    limits = PREDICT_LIMITS.for_resize(classifier.preprocessing.resize_size)
    for start in range(0, len(rows), options.batch_size):
        batch = rows[start:start + options.batch_size]
        prepared: list[Any] = []
        for row in batch:
            try:
                decoded = decode_image(storage.read_row(row.data_dir, row.ref), limits)
                prepared.append(f"{decoded.status}: {decoded.reason}" if isinstance(decoded, Rejected)
                                else classifier.prepare(decoded.image))
            except (OSError, ValueError, DataError) as err:  # removed or cut since download: its row says so
                prepared.append(f"unreadable: {first_line(err)}")
        good = [p for p in prepared if not isinstance(p, str)]
        outs = iter(classifier.outputs(classifier.probabilities(good), options.top_k) if good else [])
        for row, value in zip(batch, prepared, strict=True):
            if isinstance(value, str):
                yield Prediction(row.source, [], value)
            else:
                top, labels = next(outs)
                yield Prediction(row.source, top, labels=labels)


def predict_shard(model: str, backend: str, units: list[Unit], options: PredictOptions, fmt: str,
                  cwd: str) -> tuple[str, int, int]:
    """One shard's predictions as the text of a part file (header included), with (ok, failed)."""
    classifier = _classifier(model, backend, options)
    units = [row for unit in units for row in (_slice_rows(unit) if isinstance(unit, PartSlice) else [unit])]
    found: dict[int, Prediction] = {}
    files = [(i, u) for i, u in enumerate(units) if isinstance(u, Input)]
    rows = [(i, u) for i, u in enumerate(units) if isinstance(u, RowInput)]
    readable = [_readable(u, cwd) for _, u in files]
    for (i, unit), pred in zip(files, predict(readable, classifier, options), strict=True):
        found[i] = replace(pred, input=unit.source)
    for (i, _), pred in zip(rows, _predict_rows([u for _, u in rows], classifier, options), strict=True):
        found[i] = pred
    text = io.StringIO()
    ok, failed = write_predictions((found[i] for i in range(len(units))), text, fmt, options.top_k,
                                   multilabel=classifier.multilabel)
    return text.getvalue(), ok, failed


# ---- the driver --------------------------------------------------------------------------------
def run(options: PredictOptions, ray_options: RayOptions | None = None) -> PredictResult:
    """Predict every input of `options` on Ray into `options.out` (merged, input order)."""
    from imgclf import _ray

    ray_options = ray_options or RayOptions()
    inputs, model, output, backend = list(options.inputs), options.model, options.out, options.backend
    options = replace(options, inputs=())  # the tasks get their shard, not every input again
    if model is None:
        raise ConfigError("predict: give a model: --model MODEL")
    if output is None:
        raise ConfigError("predict --engine ray: give -o/--output FILE (parts are written next to it)")
    if ray_options.shard_size < 1 or ray_options.workers < 1 or options.top_k < 1 or options.batch_size < 1:
        raise ConfigError("predict --engine ray: --shard-size, --workers, --top-k and --batch-size must be >= 1")
    fmt = options.output_format()
    model_path = str(Path(model).resolve())
    load_classifier(model_path, backend)  # a bad model is one line now, before Ray starts
    units = expand_units(inputs, ray_options.shard_size)
    shards = cut_shards(units, ray_options.shard_size)
    parts = _Parts(output, fmt, _plan_key(model_path, backend, units, options, fmt, ray_options.shard_size))
    todo = [n for n in range(len(shards)) if not parts.done(n)]
    if len(todo) < len(shards):
        log.info("%d of %d shards already done (%s): resuming", len(shards) - len(todo), len(shards), parts.dir)
    started = time.perf_counter()
    with _ray.connect(ray_options.address, ray_options.workers) as ray:
        task = ray.remote(num_cpus=1, max_retries=2)(predict_shard)
        _run_shards(ray, task, shards, todo, parts, (model_path, backend, options, fmt, os.getcwd()),
                    ray_options, options.progress)
    ok, failed = parts.merge(len(shards))
    log.info("predicted %d inputs in %d shards in %.1fs", ok + failed, len(shards), time.perf_counter() - started)
    return PredictResult(ok, failed, output)


def _run_shards(ray: Any, task: Any, shards: list[list[Unit]], todo: list[int], parts: _Parts,
                args: tuple, ray_options: RayOptions, progress: bool) -> None:
    """Submit shards with a bounded window (never all at once), retry failed ones, write parts."""
    model, backend, options, fmt, cwd = args
    window = 2 * max(1, ray_options.workers)
    queue, running, tries = deque(todo), {}, dict.fromkeys(todo, 0)
    total = sum(_weight(u) for n in todo for u in shards[n])
    bar = tqdm(total=total, unit="img", disable=not progress, file=sys.stderr)
    try:
        while queue or running:
            while queue and len(running) < window:
                n = queue.popleft()
                running[task.remote(model, backend, shards[n], options, fmt, cwd)] = n
            ready, _ = ray.wait(list(running), num_returns=1)
            n = running.pop(ready[0])
            try:
                text, ok, failed = ray.get(ready[0])
            except ray.exceptions.RayError as raised:
                err = getattr(raised, "cause", None) or raised  # the task's own exception, when it raised one
                if isinstance(err, ImgclfError):
                    raise err from None  # the model or the config: retrying cannot help
                tries[n] += 1
                if tries[n] > ray_options.shard_retries:
                    raise ImgclfError(f"predict --engine ray: shard {n} (inputs {shards[n][0].source} .. "
                                      f"{shards[n][-1].source}) failed {tries[n]} times: {first_line(err)}") from None
                log.warning("shard %d failed (%s); sending it again", n, first_line(err))
                queue.append(n)
                continue
            parts.write(n, text, ok, failed)
            bar.update(sum(_weight(u) for u in shards[n]))
    finally:
        bar.close()
        for ref in running:
            ray.cancel(ref, force=True)


def _plan_key(model: str, backend: str, units: list[Unit], options: PredictOptions, fmt: str, size: int) -> str:
    """What the parts depend on: the model, the options, the inputs in order and the shard size."""
    h = hashlib.sha256(json.dumps([model, backend, options.top_k, fmt, size]).encode())
    for unit in units:
        h.update(repr(unit).encode(errors="surrogateescape"))
    return h.hexdigest()


class _Parts:
    """`<output>.parts/`: one file per finished shard, and plan.json naming what they belong to."""

    def __init__(self, output: Path, fmt: str, key: str) -> None:
        self.output, self.fmt = Path(output), fmt
        self.dir = self.output.with_name(self.output.name + ".parts")
        plan = self.dir / "plan.json"
        if self.dir.is_dir() and (not plan.is_file() or json.loads(plan.read_text()).get("key") != key):
            shutil.rmtree(self.dir)  # parts of other inputs, model or options: start over
        self.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(plan, json.dumps({"key": key}))

    def path(self, n: int, suffix: str | None = None) -> Path:
        return self.dir / f"part-{n:05d}.{suffix or self.fmt}"

    def done(self, n: int) -> bool:
        return self.path(n, "json").is_file()  # written last: the part before it is complete

    def write(self, n: int, text: str, ok: int, failed: int) -> None:
        write_atomic(self.path(n), text.encode("utf-8", errors="surrogateescape"))
        write_atomic(self.path(n, "json"), json.dumps({"ok": ok, "failed": failed}))

    def merge(self, count: int) -> tuple[int, int]:
        """Concatenate the parts in order (one CSV header) into the output; sum their counts."""
        ok = failed = 0
        with atomic_path(self.output) as tmp, open(tmp, "wb") as out:
            for n in range(count):
                data = self.path(n).read_bytes()
                if self.fmt == "csv" and n > 0:
                    data = data.split(b"\n", 1)[1] if b"\n" in data else b""  # the header is one line
                out.write(data)
                counts = json.loads(self.path(n, "json").read_text())
                ok, failed = ok + counts["ok"], failed + counts["failed"]
        shutil.rmtree(self.dir)
        return ok, failed
