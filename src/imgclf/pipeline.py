"""Stages composed for the user (top layer, beside cli and api): `train --data FOLDER`, where an image
folder or archive is ingested for the user, as `imgclf download` would, then trained on.

Photo users hand train the folder they have (`[split/]label/image`) or an archive of it. Train
runs the download stage's ingest on it into a data directory beside the run directory,
`<RUN_DIR>_data` (never inside the source: download refuses that), says so in one log line,
and trains on that data directory. A rerun (or `--resume`) finds it and download resumes
incrementally: files already stored are not read again, new files are added.

The source's own `test/` folder becomes `split == "test"` rows, which train never reads: the
test images stay out of training and validation (the trap of a loader that takes every image
under a path). Tables (CSV/Parquet of URLs) are not ingested here: they carry download options
(columns, politeness) that belong on `imgclf download`'s command line.
"""

from __future__ import annotations

import logging
from pathlib import Path

from imgclf import storage
from imgclf.manifest import MANIFEST_NAME, make_data_dir_hint

log = logging.getLogger("imgclf.train")  # its lines belong to `imgclf train`


def data_dir_for(run_dir: Path) -> Path:
    """Where train puts the data directory it makes from an image folder: beside RUN_DIR."""
    run_dir = Path(run_dir)
    if not run_dir.name:  # `--out .`: name it after the folder itself
        run_dir = run_dir.resolve()
    return run_dir.parent / f"{run_dir.name}_data"


def is_image_source(data: Path | str) -> bool:
    """True for a local image folder or archive that is not a data directory (no manifest)."""
    if storage.is_url(data):
        return False
    path = Path(data)
    return not (path / MANIFEST_NAME).is_file() and bool(make_data_dir_hint(path))


def ingest(source: Path, run_dir: Path) -> Path:
    """Run download on `source` into `data_dir_for(run_dir)`; one log line; return the data directory."""
    from imgclf.stages import download

    out = data_dir_for(run_dir)
    reused = (out / MANIFEST_NAME).is_file()
    # The download defaults (512 px longer side), quietly: one log line below says what happened.
    result = download.run(download.DownloadOptions(sources=(Path(source),), out=out, show_progress=False,
                                                   print_summary=False))
    counts = result.counts
    ok = counts.get("ok", 0)
    others = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()) if status != "ok")
    splits = _split_counts(result.manifest_path)
    log.info("%s is an image %s, not a data directory: %s %s (%d rows, %d ok%s; %s; %d file(s) read "
             "this run); using it as --data", source, "archive" if Path(source).is_file() else "folder",
             "updated the data directory" if reused else "made the data directory", out, result.total, ok,
             f", {others}" if others else "", splits, result.fetched)
    return out


def data_for_training(data: Path | str, run_dir: Path | str) -> Path | str:
    """`data` itself when it is a data directory (or a URL, or missing: train says what is wrong),
    else the data directory made from the image folder or archive it names."""
    return ingest(Path(data), Path(run_dir)) if is_image_source(data) else data


def _split_counts(manifest_path: Path) -> str:
    from imgclf.manifest import read_manifest

    frame = read_manifest(manifest_path.parent)
    counts = frame.loc[frame["status"] == "ok", "split"].value_counts()
    return " ".join(f"{split} {counts[split]}" for split in sorted(counts.index)) or "no usable images"
