"""report.html of a multi-label evaluation: headline figures with intervals beside the frequency
baseline, the worst labels, every label, label co-occurrence, and the images with the most wrong
labels. Self-contained (plots and thumbnails embedded), no scripts; values autoescaped (labels and
paths are user data), as the single-label report (evaluate/_html.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
import pandas as pd
import yaml

from imgclf._files import write_atomic
from imgclf.data import image_refs
from imgclf.evaluate._html import _fmt, png_data_uri, shown_url, thumbnail_uri

HEADLINE = [("f1_micro", "micro F1"), ("f1_macro", "macro F1"), ("map", "mAP"),
            ("subset_accuracy", "subset accuracy"), ("hamming_loss", "Hamming loss")]


def _gallery(preds: pd.DataFrame, root: Path | str, size: int) -> list[dict[str, Any]]:
    wrong = preds[preds["errors"] > 0].sort_values(["errors", "row"], ascending=[False, True]).head(size)
    refs = image_refs(wrong, root)
    return [{"uri": thumbnail_uri(root, ref), "path": r.path, "url": shown_url(r.url), "true": r.true,
             "predicted": r.predicted, "errors": int(r.errors)}
            for r, ref in zip(wrong.itertuples(), refs, strict=True)]


def render(metrics: dict[str, Any], preds: pd.DataFrame, root: Path | str, out_dir: Path,
           config: dict[str, Any], gallery_size: int) -> str:
    env = jinja2.Environment(loader=jinja2.PackageLoader("imgclf.evaluate", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = _fmt
    plots = {key: png_data_uri((out_dir / name).read_bytes()) for key, name in metrics["files"].items()
             if name.endswith(".png") and (out_dir / name).is_file()}
    return env.get_template("report_multilabel.html.j2").render(
        m=metrics, base=metrics["baselines"]["frequency"], headline=HEADLINE, plots=plots,
        gallery=_gallery(preds, root, gallery_size), config=yaml.safe_dump(config, sort_keys=False))


def write_report(path: Path, metrics: dict[str, Any], preds: pd.DataFrame, root: Path | str, out_dir: Path,
                 config: dict[str, Any], gallery_size: int) -> Path:
    write_atomic(path, render(metrics, preds, root, out_dir, config, gallery_size), errors="surrogateescape")
    return path
