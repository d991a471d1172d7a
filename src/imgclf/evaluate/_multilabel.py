"""Evaluate for task: multilabel: a model that gives each image a set of labels.

Called by `evaluate.run` when the model says so (checkpoint metadata `task: multilabel`). Same
inputs and output folder as single-label, other contents:

    metrics.json               task "multilabel": micro/macro F1, mAP, subset accuracy, Hamming loss,
                               each with a bootstrap CI; per label P/R/F1/AP with CIs and the
                               threshold used; the frequency baseline; worst labels; co-occurrence
    predictions.csv            row, path, url, true, predicted (labels joined by "|"), exact_match,
                               errors (wrong labels), top_k (JSON [label, probability] pairs)
    classification_report.csv  one row per label (precision, recall, f1, ap, support, threshold)
    per_label_f1.png, cooccurrence.png, training_curves.png (when the run has metrics.csv)
    report.html                one self-contained page

Images are the manifest's rows of the split with their copies merged (multilabel.merge_by_content),
as training sees them; label cells are split with the run's data.label_sep.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from imgclf import multilabel, storage
from imgclf._files import write_atomic
from imgclf.csvfile import write_frame
from imgclf.curves import literal_text, save_figure, training_curves
from imgclf.data import read_split
from imgclf.errors import DataError
from imgclf.evaluate import _multilabel_metrics as mm
from imgclf.evaluate import _plots
from imgclf.evaluate._scoring import EvalModel, drop_unreadable, predict_proba
from imgclf.manifest import read_manifest
from imgclf.rundir import RunDir
from imgclf.version import __version__

log = logging.getLogger("imgclf.evaluate")

SCHEMA_VERSION = 1
TOP_K = 5
WORST = 10  # labels listed as the worst in metrics.json and the report
CLEAR_MARGIN_STD = 2.0  # as single-label: the CI's low end must clear the baseline by 2 of its std
OUT_SEP = "|"  # predictions.csv joins label sets with this, whatever the data's separator


@dataclass
class Images:
    frame: pd.DataFrame  # row, path, label (the set, joined with `sep`), url
    root: Path | str
    split: str
    source: str
    note: str = ""


def label_sep(model: EvalModel) -> str:
    return str((model.config.get("data") or {}).get("label_sep") or "|")


def _merged(manifest: pd.DataFrame, sep: str) -> pd.DataFrame:
    return multilabel.merge_by_content(manifest[manifest["status"].isin(["ok", "duplicate"])], sep)


def select_images(plan: Any, manifest: pd.DataFrame, split: str, sep: str) -> Images:
    """The split's images (copies merged), or the run's validation subset when the data has none."""
    merged = _merged(manifest, sep)
    rows = merged[merged["split"] == split]
    if not rows.empty:
        return Images(rows[["row", "path", "label", "url"]].reset_index(drop=True), plan.data_dir, split, "manifest")
    split_csv = read_split(plan.run_dir) if plan.run_dir is not None else None
    if split in ("test", "val") and split_csv is not None and (split_csv["subset"] == "val").any():
        val = split_csv[split_csv["subset"] == "val"].reset_index(drop=True)
        note = (f"no '{split}' images in {plan.data_dir}: evaluating on the run's validation subset "
                f"({len(val)} images, the ones that chose the best checkpoint and the thresholds, so expect "
                "optimistic figures)")
        log.warning(note)
        urls = manifest[["row", "url"]].drop_duplicates("row")
        frame = val[["row", "path", "label"]].merge(urls, on="row", how="left").fillna({"url": ""})
        root = storage.location(plan.run_info.get("data_dir") or plan.data_dir)
        return Images(frame, root, "val", "run split.csv (val subset)", note)
    have = sorted(set(merged["split"]))
    raise DataError(f"{plan.data_dir}: no downloaded images with split '{split}' (splits here: "
                    f"{', '.join(have) or 'none'})")


def train_frequencies(plan: Any, manifest: pd.DataFrame, images: Images, sep: str,
                      classes: list[str]) -> tuple[np.ndarray, str]:
    """Each label's share of the training images: the frequency baseline's rates, and their source."""
    split_csv = read_split(plan.run_dir) if plan.run_dir is not None else None
    if split_csv is not None and (split_csv["subset"] == "train").any():
        cells, source = split_csv.loc[split_csv["subset"] == "train", "label"], "run split.csv (train subset)"
    else:
        merged = _merged(manifest, sep)
        train = merged[merged["split"] == "train"]
        cells, source = (train["label"], "manifest split 'train'") if not train.empty else \
            (images.frame["label"], f"evaluated split '{images.split}' (no training data found)")
    known = set(classes)
    sets = [tuple(x for x in multilabel.parse_labels(c, sep) if x in known) for c in cells]
    return multilabel.frequencies(multilabel.encode(sets, classes)), source


def known_labels_only(images: Images, classes: list[str], sep: str) -> tuple[Images, dict[str, int]]:
    """The split's label cells without labels the model does not know (it cannot score them), and
    how many images carried each of those: a tag seen only in the test split is common in tag data,
    so it is reported (metrics.json `labels_unknown_to_model`, a warning), not a stop."""
    known, unknown = set(classes), Counter()
    cells = []
    for cell in images.frame["label"].tolist():
        labels = multilabel.parse_labels(cell, sep)
        unknown.update(label for label in labels if label not in known)
        cells.append(multilabel.join_labels((label for label in labels if label in known), sep))
    if not unknown:
        return images, {}
    shown = ", ".join(f"{label!r} ({n})" for label, n in unknown.most_common(5))
    log.warning("%d label(s) of split '%s' are not known to the model and are left out of the scores: %s%s",
                len(unknown), images.split, shown, ", ..." if len(unknown) > 5 else "")
    frame = images.frame.assign(label=cells)
    return Images(frame, images.root, images.split, images.source, images.note), dict(unknown.most_common())



def compute(y: np.ndarray, proba: np.ndarray, classes: list[str], thresholds: list[float],
            train_freq: np.ndarray, opts: Any) -> dict[str, Any]:
    """Every figure of metrics.json that depends on the predictions (pure: arrays in, dict out)."""
    pred = (proba >= np.asarray(thresholds)[None, :]).astype(np.uint8)
    head = mm.point_metrics(y, proba, pred)
    boot = mm.bootstrap(y, proba, pred, opts.bootstrap_resamples, opts.seed, 0.95)
    per = mm.per_label(y, proba, pred, classes, thresholds)
    for j, name in enumerate(classes):
        for key in ("precision", "recall", "f1", "ap"):
            per[name][f"{key}_ci95"] = boot["per_label"][key][j]
    base = mm.frequency_baseline(y, train_freq, opts.baseline_simulations, opts.seed)
    for j, name in enumerate(classes):
        per[name]["baseline_f1"] = base["per_label_f1"][j]
        per[name]["baseline_ap"] = base["per_label_ap"][j]
        per[name]["train_frequency"] = float(train_freq[j])
    ci = boot["headline"]
    clear = (ci["f1_macro"] is not None and ci["map"] is not None and base["map"] is not None
             and ci["f1_macro"][0] > base["f1_macro"] + CLEAR_MARGIN_STD * base["f1_macro_std"]
             and ci["map"][0] > base["map"])
    scored = [name for name in classes if per[name]["support"] > 0]
    return {
        **head,
        **{f"{k}_ci95": ci[k] for k in mm.HEADLINE},
        "bootstrap": {"resamples": opts.bootstrap_resamples, "seed": opts.seed, "method": "percentile",
                      "level": 0.95},
        "per_label": per,
        "baselines": {"frequency": {k: v for k, v in base.items() if not k.startswith("per_label")}},
        "vs_frequency": {
            "f1_macro_gain": None if head["f1_macro"] is None else head["f1_macro"] - base["f1_macro"],
            "f1_micro_gain": head["f1_micro"] - base["f1_micro"],
            "map_gain": None if head["map"] is None else head["map"] - base["map"],
            "clearly_above": bool(clear),
        },
        "worst_labels": sorted(scored, key=lambda name: (per[name]["f1"], name))[:WORST],
        "labels_without_positives": [name for name in classes if per[name]["support"] == 0],
        "label_cardinality": {"true": float(y.sum(1).mean()), "predicted": float(pred.sum(1).mean())},
        "images_without_labels": int((y.sum(1) == 0).sum()),
        "cooccurrence": mm.cooccurrence(y).tolist(),
    }


def predictions_frame(images: Images, y: np.ndarray, proba: np.ndarray, classes: list[str],
                      thresholds: list[float]) -> pd.DataFrame:
    names = np.array(classes)
    pred = proba >= np.asarray(thresholds)[None, :]
    k = min(TOP_K, len(classes))
    top = np.argsort(-proba, axis=1, kind="stable")[:, :k]
    decoded = multilabel.decode(proba, classes, thresholds)
    return pd.DataFrame({
        "row": images.frame["row"].to_numpy(),
        "path": images.frame["path"].to_numpy(),
        "url": images.frame["url"].to_numpy(),
        "true": [OUT_SEP.join(names[np.flatnonzero(row)]) for row in y],
        "predicted": [OUT_SEP.join(label for label, _ in row) for row in decoded],
        "exact_match": (pred == y.astype(bool)).all(axis=1),
        "errors": (pred != y.astype(bool)).sum(axis=1),
        "top_k": [json.dumps([[str(names[j]), round(float(proba[i, j]), 4)] for j in row], ensure_ascii=False)
                  for i, row in enumerate(top)],
    })


@literal_text()
def cooccurrence_plot(counts: np.ndarray, classes: list[str], path: Path) -> Path:
    """Heatmap of how often two labels are on the same image (diagonal: each label's count)."""
    from matplotlib.figure import Figure

    k = len(classes)
    lay = _plots.layout_for(k)
    fig = Figure(figsize=(lay.side, lay.side * 0.85))
    ax = fig.add_subplot()
    image = ax.imshow(counts, cmap="Blues")
    ticks = [_plots.short(c) for c in classes]
    ax.set_xticks(range(k), ticks, rotation=lay.rotation, ha="right", fontsize=lay.tick_fontsize)
    ax.set_yticks(range(k), ticks, fontsize=lay.tick_fontsize)
    if lay.annotate:
        top = counts.max() if counts.size else 0
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=lay.cell_fontsize,
                        color="white" if counts[i, j] > top / 2 else "black")
    fig.colorbar(image, ax=ax)
    ax.set_title("label co-occurrence (true labels, images carrying both)")
    return save_figure(fig, path)


def write_files(out: Path, metrics: dict[str, Any], preds: pd.DataFrame, classes: list[str],
                run_dir: Path | None) -> dict[str, str]:
    write_frame(preds, out / "predictions.csv", index=False, errors="surrogateescape")
    table = pd.DataFrame([{"label": name, **{k: v for k, v in row.items() if not k.endswith("_ci95")}}
                          for name, row in metrics["per_label"].items()])
    write_frame(table, out / "classification_report.csv", index=False)
    f1_table = table.rename(columns={"label": "class"})[["class", "f1", "support"]]
    files = {
        "per_label_f1": _plots.per_class_f1(f1_table, out / "per_label_f1.png").name,
        "cooccurrence": cooccurrence_plot(np.array(metrics["cooccurrence"]), classes, out / "cooccurrence.png").name,
    }
    history = RunDir(run_dir).metrics if run_dir else None
    if history and history.is_file():
        curves = training_curves(pd.read_csv(history), out / "training_curves.png",
                                 metrics["baselines"]["frequency"]["f1_macro"])
        if curves:
            files["training_curves"] = curves.name
    return {"predictions": "predictions.csv", "classification_report": "classification_report.csv", **files,
            "report": "report.html", "metrics": "metrics.json"}


def run(opts: Any, plan: Any, model: EvalModel) -> dict[str, Any]:
    """evaluate.run for a multi-label model: every file into plan.out_dir; the metrics.json content."""
    from imgclf.evaluate import _multilabel_html

    sep = label_sep(model)
    classes = model.class_names
    thresholds = model.thresholds or [multilabel.DEFAULT_THRESHOLD] * len(classes)
    manifest = read_manifest(plan.data_dir)
    images = select_images(plan, manifest, opts.split, sep)
    images, unknown = known_labels_only(images, classes, sep)
    train_freq, freq_source = train_frequencies(plan, manifest, images, sep, classes)
    t0 = time.perf_counter()
    proba, y = predict_proba(model, images.frame, images.root, opts.batch_size, opts.num_workers, opts.progress,
                             label_sep=sep)
    seconds = time.perf_counter() - t0
    proba, y, images, unreadable = drop_unreadable(proba, y, images, opts.max_unreadable)
    y = y.astype(np.uint8)
    metrics: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "imgclf_version": __version__, "task": multilabel.TASK,
        "split": images.split, "split_requested": opts.split, "split_source": images.source, "note": images.note,
        "n_images": int(len(y)), "unreadable_images": unreadable, "n_classes": len(classes),
        "class_names": classes, "thresholds": [float(t) for t in thresholds], "label_sep": sep, "tta": opts.tta,
        **compute(y, proba, classes, thresholds, train_freq, opts),
        "train_frequency_source": freq_source,
        "labels_unknown_to_model": unknown,
        "model": {"checkpoint": str(Path(model.path).resolve()), "arch": model.arch,
                  "image_size": model.preprocessing.image_size},
        "data_dir": storage.display(plan.data_dir),
        "run_dir": str(plan.run_dir.resolve()) if plan.run_dir else None,
        "out_dir": str(plan.out_dir.resolve()),
        "data": {"rows": int(len(manifest)),
                 "status_counts": {k: int(v) for k, v in manifest["status"].value_counts().items()}},
        "timing": {"predict_seconds": seconds, "images_per_s": len(y) / max(seconds, 1e-9)},
    }
    out = plan.out_dir
    out.mkdir(parents=True, exist_ok=True)
    preds = predictions_frame(images, y, proba, classes, thresholds)
    metrics["files"] = write_files(out, metrics, preds, classes, plan.run_dir)
    _multilabel_html.write_report(out / "report.html", metrics, preds, images.root, out, model.config,
                                  opts.gallery_size)
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def _ci(pair: list[float] | None) -> str:
    return f"[{pair[0]:.3f}, {pair[1]:.3f}]" if pair else "[n/a]"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_summary(metrics: dict[str, Any]) -> str:
    """A few lines for the terminal: headline figures with intervals beside the frequency baseline."""
    base = metrics["baselines"]["frequency"]
    lines = [f"evaluated {metrics['n_images']} images of split '{metrics['split']}' "
             f"({metrics['n_classes']} labels, multi-label; {metrics['images_without_labels']} without labels)"]
    for key, name, std in (("f1_micro", "micro F1", True), ("f1_macro", "macro F1", True), ("map", "mAP", False),
                           ("subset_accuracy", "subset accuracy", True), ("hamming_loss", "Hamming loss", True)):
        spread = f" ± {base[key + '_std']:.3f}" if std else ""
        lines.append(f"{name:16} {_num(metrics[key])}  95% CI {_ci(metrics[key + '_ci95'])}   "
                     f"frequency baseline {_num(base[key])}{spread}")
    worst = metrics["worst_labels"][:5]
    if worst:
        lines.append("worst labels (F1): " + ", ".join(f"{n} {metrics['per_label'][n]['f1']:.2f}" for n in worst))
    if metrics.get("note"):
        lines.append(f"note: {metrics['note']}")
    if not metrics["vs_frequency"]["clearly_above"]:
        lines.append("WARNING: the model is not clearly above the frequency baseline (its macro-F1 interval reaches "
                     "within 2 std of the baseline, or its mAP interval reaches the baseline's); do not trust it yet")
    out = Path(metrics["out_dir"])
    for key in ("report", "metrics"):
        lines.append(f"{key + ':':18} {out / metrics['files'][key]}")
    return "\n".join(lines)
