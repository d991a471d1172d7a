"""audit.html: one self-contained page, thumbnails embedded as PNG data URIs, no scripts.

Like evaluate's report.html it opens offline, from an e-mail or a CI artifact, and makes no
network request. Jinja2 autoescapes every value: labels, paths and URLs are user data.
Galleries are capped (`gallery_size` images or groups per section); audit.csv has every finding.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from imgclf import storage
from imgclf._files import write_atomic
from imgclf.errors import DataError
from imgclf.images import ImageLimits, Rejected, decode_image
from imgclf.manifest import RowRef

THUMB_SIDE = 112
_LIMITS = ImageLimits(min_side=1).for_resize(THUMB_SIDE)


class Thumbnails:
    """PNG thumbnails of stored images as data URIs, each made once; None when unreadable (the page says so)."""

    def __init__(self, data_dir: str | Path, refs: dict[int, RowRef]) -> None:
        self.data_dir = data_dir
        self.refs = refs
        self.made: dict[int, str | None] = {}

    def __call__(self, row: int) -> str | None:
        if row not in self.made:
            self.made[row] = thumbnail_uri(self.data_dir, self.refs[row])
        return self.made[row]


def thumbnail_uri(data_dir: str | Path, ref: RowRef) -> str | None:
    uri = None
    try:
        decoded = decode_image(storage.read_row(data_dir, ref), _LIMITS)
        if not isinstance(decoded, Rejected):
            image = decoded.image
            image.thumbnail((THUMB_SIDE, THUMB_SIDE))
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    except (OSError, ValueError, DataError):
        uri = None
    return uri


def _cards(frame: pd.DataFrame, thumbs: Thumbnails) -> list[dict[str, Any]]:
    return [{**r, "uri": thumbs(int(r["row"]))} for r in frame.to_dict("records")]


def _groups(frame: pd.DataFrame, kind: str, limit: int, thumbs: Thumbnails) -> tuple[list[dict[str, Any]], int]:
    rows = frame[frame["kind"] == kind]
    ids = list(dict.fromkeys(rows["group"].tolist()))
    shown = [{"id": g, "members": _cards(rows[rows["group"] == g], thumbs)} for g in ids[:limit]]
    return shown, len(ids)


def render(summary: dict[str, Any], findings: pd.DataFrame, thumbs: Thumbnails, gallery_size: int) -> str:
    env = jinja2.Environment(loader=jinja2.PackageLoader("imgclf.audit", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    template = env.get_template("audit.html.j2")
    issues = findings[findings["kind"] == "label_issue"]
    outliers = findings[findings["kind"] == "outlier"]
    groups = {kind: _groups(findings, kind, gallery_size, thumbs)
              for kind in ("leakage", "conflict", "near_duplicate")}
    return template.render(
        s=summary,
        issues=_cards(issues.head(gallery_size), thumbs), n_issues=len(issues),
        outliers=_cards(outliers.head(gallery_size), thumbs), n_outliers=len(outliers),
        groups=groups,
        unreadable=findings[findings["kind"] == "unreadable"].to_dict("records"),
    )


def write(path: Path, summary: dict[str, Any], findings: pd.DataFrame, thumbs: Thumbnails,
          gallery_size: int) -> Path:
    return write_atomic(path, render(summary, findings, thumbs, gallery_size))
