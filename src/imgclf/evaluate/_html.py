"""report.html: one self-contained page (PNG plots and thumbnails embedded as base64 data URIs).

The page has no scripts and no external resources, so it opens offline, from an e-mail
attachment or a CI artifact, exactly as written. Jinja2 autoescapes every value: class
names and paths come from user data.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import jinja2
import pandas as pd
import yaml

from imgclf._files import write_atomic
from imgclf.data import image_refs, read_image
from imgclf.errors import DataError
from imgclf.storage import RowRef

THUMB_SIDE = 128


@dataclass
class ReportInputs:
    predictions: pd.DataFrame  # evaluate.predictions_frame
    images_root: Path
    out_dir: Path
    config: dict[str, Any]
    download_report: dict[str, Any] | None = None
    gallery_size: int = 24
    run_curves: Path | None = None  # the run's own curves.png, used when we drew no training curves


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def thumbnail_uri(data_dir: Path, ref: RowRef) -> str | None:
    """A PNG thumbnail of a stored image, or None when it cannot be read (the gallery says so).

    Read like training reads it (`data.read_image`: confined to DATA_DIR, regular files only,
    the same size limits), so a hostile manifest or split.csv cannot put another file in the page."""
    try:
        image = read_image(data_dir, ref)
    except (OSError, ValueError, DataError):
        return None
    image.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return png_data_uri(buf.getvalue())


def gallery(inputs: ReportInputs) -> list[dict[str, Any]]:
    """The highest-loss misclassified images, worst first."""
    wrong = inputs.predictions[~inputs.predictions["correct"]].nlargest(inputs.gallery_size, "loss")
    refs = image_refs(wrong, inputs.images_root)
    return [{"uri": thumbnail_uri(inputs.images_root, ref), "path": r.path, "url": shown_url(getattr(r, "url", "")),
             "true": r.true, "predicted": r.predicted, "confidence": r.confidence, "loss": r.loss}
            for r, ref in zip(wrong.itertuples(), refs, strict=True)]


def shown_url(url: object) -> str:
    """The image's own name for the gallery: the user's file path or URL, without credentials or query.

    The stored path is a content hash nobody recognises; the manifest's `url` is what the user
    gave. A shared report should not carry a password (`user:pw@host`) or a signed query string.
    """
    text = str(url or "")
    parts = urlsplit(text)
    if parts.scheme.lower() not in ("http", "https", "s3", "gs", "ftp") or not parts.netloc:
        return text  # a local path or archive!member: as given
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _plot_uris(metrics: dict[str, Any], inputs: ReportInputs) -> dict[str, str]:
    uris = {}
    for key, name in metrics.get("files", {}).items():
        path = inputs.out_dir / name
        if name.endswith(".png") and path.is_file():
            uris[key] = png_data_uri(path.read_bytes())
    if "training_curves" not in uris and inputs.run_curves and inputs.run_curves.is_file():
        uris["training_curves"] = png_data_uri(inputs.run_curves.read_bytes())
    return uris


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "∞" if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


def render(metrics: dict[str, Any], inputs: ReportInputs) -> str:
    env = jinja2.Environment(loader=jinja2.PackageLoader("imgclf.evaluate", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = _fmt
    template = env.get_template("report.html.j2")
    data = metrics.get("data", {})
    splits = sorted({s for counts in data.get("class_counts", {}).values() for s in counts})
    return template.render(
        m=metrics,
        plots=_plot_uris(metrics, inputs),
        gallery=gallery(inputs),
        data=data,
        splits=splits,
        download_report=(yaml.safe_dump(inputs.download_report, sort_keys=False)
                         if inputs.download_report else None),
        config=yaml.safe_dump(inputs.config, sort_keys=False),
    )


def write_report(path: Path, metrics: dict[str, Any], inputs: ReportInputs) -> Path:
    # surrogateescape: a data directory whose name is not UTF-8 is written back as its own bytes.
    write_atomic(path, render(metrics, inputs), errors="surrogateescape")
    return path

