"""The download stage: URL lists, image folders and archives in; validated images +
manifest.parquet + download_report.json out.

    imgclf download train.csv test.csv --out DATA_DIR          # run again to resume
    imgclf download photos/ more_photos.zip --out DATA_DIR     # local sources (see _local, _archive)

Flow: the sources are read in chunks into DATA_DIR/.state.sqlite (one line per input row, one
per distinct URL); every unfinished URL is fetched once by an asyncio/aiohttp pool (`_fetch`),
its body validated, resized and stored by content hash in worker processes (`_store`), and the
outcome committed. Local files and archive members are listed like rows (`_local`, `_archive`)
and handed to the same workers by reference (`_feed`): the worker reads the file itself and
validates it with the same `_store.process_body`. Finally the manifest (one row per input row,
see imgclf.manifest) and the report (counts per status and per split/label, duplicates,
train/test leakage, skipped local files) are written from the state (`_report`). Train,
evaluate and predict read only the manifest and images/.

    from imgclf.stages import download
    result = download.run(download.DownloadOptions(sources=(Path("train.csv"),), out="data", show_progress=False))
    print(result.summary())
"""

from __future__ import annotations

import logging
import shutil
import time

from imgclf import sources as _sources
from imgclf.download import _engine_local
from imgclf.download._commit import remove_orphans
from imgclf.download._local import check_out_dir
from imgclf.download._merge import merge
from imgclf.download._options import DownloadOptions, StoreSettings
from imgclf.download._report import print_summary, write_outputs
from imgclf.download._result import DownloadResult
from imgclf.download._sink import Target
from imgclf.download._state import STATE_NAME, State
from imgclf.download._store import TMP_DIR
from imgclf.errors import DataError
from imgclf.manifest import MANIFEST_NAME, REPORT_NAME
from imgclf.net.http import check_url

__all__ = ["DownloadOptions", "DownloadResult", "run", "merge", "check_url", "STATE_NAME"]

def run(options: DownloadOptions) -> DownloadResult:
    """Download every row of `options.sources` into `options.out` (a folder or an object-store URL, see
    _sink); resumes whatever an earlier run left."""
    paths, out_dir = list(options.sources), options.out
    if not paths:
        raise DataError("download: give at least one source (a table, a folder or an archive)")
    if out_dir is None:
        raise DataError("download: give --out, the data directory to write into")
    for path in paths:
        _sources.source_kind(path)  # a one-line error for a missing or unsupported source
    target = Target.resolve(out_dir, options.state_dir)
    data_dir = target.work_dir  # the local --out itself, or the local state folder of a URL --out
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"{data_dir}: --out exists and is not a directory")
    if not target.remote:
        check_out_dir(paths, data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    state = State(data_dir)
    try:
        state.check_storage(options.storage_key(), data_dir)
        keep = job.filter() if (job := options.job()) else None  # --shard i/n: this job's rows only
        state.ingest(paths, options.chunk_rows, options.columns(), options.max_bytes, keep, options.follow_links)
        if crowded := keep and keep.note():  # one host in one job: say so (docs/scale.md)
            logging.getLogger("imgclf.download").warning("%s", crowded)
        if options.retry_failed:
            state.reopen_retryable()
        crashed = state.begin_run()
        shutil.rmtree(data_dir / TMP_DIR, ignore_errors=True)  # partial files of a killed run
        fetched, ok, interrupted = 0, 0, False
        fetch_started = time.monotonic()
        try:
            fetched, ok = _fetch_all(state, options.store_settings(target.out), options, target)
        except KeyboardInterrupt as err:
            interrupted = True  # committed results stay; the manifest below marks the rest pending
            fetched, ok = getattr(err, "done", fetched), getattr(err, "ok", ok)  # the summary counts them
        fetch_s = time.monotonic() - fetch_started
        if not interrupted:
            if crashed:
                remove_orphans(state, target)
            state.end_run()
        extra = {"fetched_this_run": fetched, "ok_this_run": ok, "fetch_s": round(fetch_s, 3),
                 "images_per_s": round(ok / fetch_s, 2) if fetched and fetch_s > 0 else 0.0,
                 "interrupted": interrupted, "options": options.storage_key(),
                 "skipped": state.skipped_report(), **({"job_note": crowded} if crowded else {}),
                 **({"label_sep": options.label_sep} if options.label_sep is not None else {})}
        manifest, report_path, report = write_outputs(state, data_dir, extra, parts=not target.remote)
        target.publish(MANIFEST_NAME, REPORT_NAME)  # a URL --out: upload them (local: already there)
    finally:
        state.close()
    elapsed = time.monotonic() - started
    if options.print_summary:
        from rich.console import Console

        print_summary(report, Console())
    if interrupted:
        raise KeyboardInterrupt
    return DownloadResult(report["total_rows"], dict(report["counts"]), manifest, report_path, report,
                          fetched, elapsed)


def _fetch_all(state: State, settings: StoreSettings, options: DownloadOptions, target: Target) -> tuple[int, int]:
    """--engine ray: the URLs go to Ray workers first (see _engine_ray); the rest (local files) is read here."""
    fetched = ok = 0
    if options.engine == "ray":
        from imgclf.download import _engine_ray

        fetched, ok = _engine_ray.fetch_pending(state, settings, options, target)
    more, more_ok = _engine_local.fetch_pending(state, settings, options, target)
    return fetched + more, ok + more_ok
