"""The evaluate stage's work: resolve the options into a Plan, choose the split, score, write every file.

`imgclf.evaluate.run` is `run` here; `_scoring` opens the model and predicts, `_metrics` computes,
`_plots` and `_html` draw. What is written is listed in the evaluate package's docstring.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import classification_report

from imgclf import storage
from imgclf._dictresult import ReadsAsDict
from imgclf._files import write_atomic
from imgclf.csvfile import write_frame
from imgclf.curves import training_curves
from imgclf.data import SPLIT_NAME, read_split
from imgclf.errors import ConfigError, DataError
from imgclf.evaluate import _html, _metrics, _multilabel, _plots, _scale
from imgclf.evaluate._scoring import drop_unreadable, open_model, predict_proba
from imgclf.inference import _tta as tta
from imgclf.manifest import REPORT_NAME, is_parts, read_manifest, usable_rows
from imgclf.rundir import RunDir, require_model
from imgclf.version import __version__

log = logging.getLogger("imgclf.evaluate")  # the stage's logger, as before this module was split out

SCHEMA_VERSION = 1
TOP_K = 5
# The model is "clearly above" weighted random when the lower end of its F1-macro interval
# clears the baseline's simulated mean by this many baseline standard deviations.
CLEAR_MARGIN_STD = 2.0


@dataclass(frozen=True)
class EvaluateOptions:
    model: Path | None = None  # a run directory, checkpoint, .onnx or TorchScript file
    data: Path | str | None = None  # DATA_DIR, a folder or s3://... (default: the run's own)
    split: str = "test"
    out: Path | None = None
    seed: int = 0
    batch_size: int = 128
    num_workers: int | None = None  # None: the run config's data.num_workers
    device: str = "auto"  # auto: cuda when available, else cpu
    bootstrap_resamples: int = _metrics.BOOTSTRAP_RESAMPLES
    baseline_simulations: int = _metrics.BASELINE_SIMULATIONS
    gallery_size: int = 24
    max_unreadable: float = 0.05  # share of images that may be unreadable (skipped, counted) before it stops
    progress: bool = True  # a bar in a terminal, throttled lines in a log
    tta: str = "none"  # test-time augmentation (imgclf.inference._tta): none, flip, crops
    sample: int | None = None  # a parts manifest: evaluate a seeded sample of about this many images (_scale)


@dataclass(frozen=True, eq=False)
class EvaluateResult(ReadsAsDict):
    """What `evaluate.run` returns: `result["f1_macro"]` reads metrics.json as before; `summary()` is what the
    CLI prints."""

    metrics: dict[str, Any]  # the content of metrics.json
    out: Path  # the folder written into (the run directory, --out, or DATA_DIR/evaluations/...)
    files: dict[str, Path]  # what was written there: metrics, report, predictions, confusion_matrix, ...

    @classmethod
    def of(cls, metrics: dict[str, Any]) -> EvaluateResult:
        out = Path(metrics["out_dir"])
        return cls(metrics, out, {name: out / file for name, file in metrics.get("files", {}).items()})

    def as_dict(self) -> dict[str, Any]:
        return self.metrics

    def summary(self) -> str:
        return format_summary(self.metrics)


@dataclass
class Plan:
    """Where everything comes from and goes to, resolved once from the options."""

    model_source: Path
    data_dir: Path | str  # a folder, or an object-store URL (see imgclf.storage)
    out_dir: Path
    run_dir: Path | None
    run_info: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalSet:
    frame: pd.DataFrame  # row, path, label, url (the user's file or URL, from the manifest; "" if unknown)
    images_root: Path | str
    split: str  # what was evaluated: the requested split, or "val" after the fallback
    source: str  # "manifest" or "run split.csv (val subset)"
    note: str = ""


# ---------------------------------------------------------------- resolving inputs


def _read_run_info(run_dir: Path) -> dict[str, Any]:
    info = RunDir(run_dir).read_info()
    return info.model_dump() if info is not None else {}


def resolve(opts: EvaluateOptions) -> Plan:
    if opts.model is None:
        raise ConfigError("evaluate: give a model: a run directory, checkpoint, .onnx or TorchScript file")
    model = require_model(Path(opts.model))  # a typo is named before anything asks for --data
    if model.is_dir():
        info = _read_run_info(model)
        data = opts.data or info.get("data_dir") or None
        if data is None:
            raise ConfigError(f"{model}: run.json names no data_dir; pass --data DATA_DIR")
        return Plan(model, storage.location(data), Path(opts.out or model), model, info)
    if opts.data is None:
        raise ConfigError(f"evaluate {model}: a model file needs --data DATA_DIR "
                          "(a run directory knows its data)")
    data = storage.location(opts.data)
    if opts.out is None and storage.is_url(data):
        raise ConfigError(f"evaluate {model}: --data {data} is object storage; pass --out DIR (a local folder)")
    out = opts.out or Path(data) / "evaluations" / f"{model.stem}-{opts.split}"
    return Plan(model, data, Path(out), None)


def _read_split_csv(run_dir: Path | None) -> pd.DataFrame | None:
    return None if run_dir is None else read_split(run_dir)



def select_eval_set(plan: Plan, manifest: pd.DataFrame, split: str,
                    split_csv: pd.DataFrame | None) -> EvalSet:
    rows = usable_rows(manifest, split)
    if not rows.empty:
        return EvalSet(rows[["row", "path", "label", "url"]], plan.data_dir, split, "manifest")
    # Only the held-out splits fall back: a data directory from a single CSV has no test rows, but
    # the run's validation subset is held out. Any other missing name is a typo worth an error.
    if split in ("test", "val") and split_csv is not None and (split_csv["subset"] == "val").any():
        val = split_csv[split_csv["subset"] == "val"].reset_index(drop=True)
        note = (f"no '{split}' images in {plan.data_dir}: evaluating on the run's validation subset "
                f"({len(val)} images, the ones that chose the best checkpoint, so expect optimistic figures)")
        log.warning(note)
        root = storage.location(plan.run_info.get("data_dir") or plan.data_dir)
        frame = _with_urls(val[["row", "path", "label"]], manifest)
        return EvalSet(frame, root, "val", f"run {SPLIT_NAME} (val subset)", note)
    have = sorted(set(usable_rows(manifest)["split"]))
    fallback = ", and no run validation subset to fall back on" if split in ("test", "val") else ""
    raise DataError(f"{plan.data_dir}: no downloaded images with split '{split}' (splits here: "
                    f"{', '.join(have) or 'none'}){fallback}")


def _with_urls(frame: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """split.csv rows with the manifest's `url` where the same row holds the same stored path ("" else)."""
    known = manifest[["row", "path", "url"]].drop_duplicates("row")
    merged = frame.merge(known, on="row", how="left", suffixes=("", "_manifest"))
    same = merged["path"] == merged["path_manifest"]  # a split.csv of another data directory: no name
    return frame.assign(url=merged["url"].where(same, "").fillna("").astype(str).to_numpy())


def training_labels(manifest: pd.DataFrame, split_csv: pd.DataFrame | None,
                    eval_set: EvalSet) -> tuple[pd.Series, str]:
    """The labels whose shares define the weighted-random baseline, and where they came from."""
    if split_csv is not None and (split_csv["subset"] == "train").any():
        return split_csv.loc[split_csv["subset"] == "train", "label"], f"run {SPLIT_NAME} (train subset)"
    train = usable_rows(manifest, "train")
    if not train.empty:
        return train["label"], "manifest split 'train'"
    log.warning("no training data found: the weighted-random baseline uses the evaluated split's own shares")
    return eval_set.frame["label"], f"evaluated split '{eval_set.split}' (no training data found)"


def _parts_inputs(plan: Plan, opts: EvaluateOptions, names: list[str]
                  ) -> tuple[EvalSet, np.ndarray, str, dict[str, Any]]:
    """The eval set, training shares and data summary of a parts manifest (evaluate/_scale.py)."""
    frame, split, source, note = _scale.eval_rows(plan.data_dir, opts.split, plan.run_info, opts.sample, opts.seed)
    eval_set = EvalSet(frame[["row", "path", "label", "url"]], plan.data_dir, split, source, note)
    counts, shares_source = _scale.train_counts(plan.data_dir, plan.run_info)
    if not any(counts.get(n) for n in names):
        log.warning("no training data found: the weighted-random baseline uses the evaluated split's own shares")
        counts = frame["label"].value_counts().to_dict()
        shares_source = f"evaluated split '{split}' (no training data found)"
    shares = np.array([float(counts.get(n, 0)) for n in names])
    return eval_set, shares / max(shares.sum(), 1.0), shares_source, _scale.data_summary(plan.data_dir, split)


# ---------------------------------------------------------------- data summary


def _read_download_report(data_dir: Path | str) -> dict[str, Any] | None:
    try:
        report = json.loads(storage.read_bytes(data_dir, REPORT_NAME))
    except (OSError, json.JSONDecodeError):
        return None
    return report if isinstance(report, dict) else None


def data_summary(manifest: pd.DataFrame) -> dict[str, Any]:
    """Counts per status, class distribution per split, duplicates and train/test leakage.

    Computed from the manifest (a stable contract) so it is there even without a download report.
    leakage_found: rows of each non-training split (ok or duplicate) whose content (sha256) also
    appears in train/val rows; most are already marked duplicate and so never evaluated.
    leakage_evaluated: evaluable (ok) rows whose content is in the ok train/val rows the model saw.
    """
    ok = usable_rows(manifest)
    hashed = manifest[(manifest["sha256"] != "") & manifest["status"].isin(["ok", "duplicate"])]
    fit = hashed["split"].isin(["train", "val"])
    seen_any = set(hashed.loc[fit, "sha256"])
    seen_ok = set(hashed.loc[fit & (hashed["status"] == "ok"), "sha256"])
    found, evaluated = {}, {}
    for split in sorted(set(hashed["split"]) - {"train", "val"}):
        rows = hashed[hashed["split"] == split]
        found[split] = int(rows["sha256"].isin(seen_any).sum())
        evaluated[split] = int(rows.loc[rows["status"] == "ok", "sha256"].isin(seen_ok).sum())
    classes = ok.groupby(["label", "split"]).size().unstack(fill_value=0)
    return {
        "rows": int(len(manifest)),
        "status_counts": {k: int(v) for k, v in manifest["status"].value_counts().items()},
        "class_counts": {label: {split: int(n) for split, n in row.items()}
                         for label, row in classes.iterrows()},
        "duplicates": int((manifest["status"] == "duplicate").sum()),
        "leakage_found": found,
        "leakage_evaluated": evaluated,
    }


# ---------------------------------------------------------------- metrics


def compute_metrics(y_true: np.ndarray, proba: np.ndarray, class_names: list[str], train_shares: np.ndarray,
                    opts: EvaluateOptions) -> dict[str, Any]:
    k = len(class_names)
    y_pred = proba.argmax(axis=1)
    head = _metrics.classification_metrics(y_true, proba)
    ci = _metrics.bootstrap_ci(y_true, y_pred, k, opts.bootstrap_resamples, opts.seed)
    weighted = _metrics.random_baseline(y_true, train_shares, opts.baseline_simulations, opts.seed)
    uniform = _metrics.random_baseline(y_true, np.full(k, 1 / k), opts.baseline_simulations, opts.seed)
    majority = _metrics.majority_baseline(y_true, train_shares)
    cm = _metrics.confusion(y_true, y_pred, k)
    clear_bar = weighted["f1_macro"] + CLEAR_MARGIN_STD * weighted["f1_macro_std"]
    return {
        **head,
        "accuracy_ci95": ci["accuracy"],
        "f1_macro_ci95": ci["f1_macro"],
        "bootstrap": {"resamples": opts.bootstrap_resamples, "seed": opts.seed, "method": "percentile",
                      "level": _metrics.CI_LEVEL},
        "per_class": _metrics.per_class(y_true, y_pred, class_names),
        "baselines": {
            "weighted_random": {**weighted, "class_shares": dict(zip(class_names, train_shares.tolist(),
                                                                     strict=True))},
            "majority": {"class": class_names[majority.pop("class_index")], **majority},
            "uniform_random": {k_: v for k_, v in uniform.items() if k_ != "log_loss"},
        },
        "vs_weighted_random": {
            "f1_macro_gain": head["f1_macro"] - weighted["f1_macro"],
            "accuracy_gain": head["accuracy"] - weighted["accuracy"],
            "clearly_above": bool(ci["f1_macro"][0] > clear_bar and ci["accuracy"][0] > weighted["accuracy"]),
        },
        "most_confused": [{"true": class_names[t], "predicted": class_names[p], "count": c,
                           "share_of_true": c / max(int(cm[t].sum()), 1)}
                          for t, p, c in _metrics.most_confused(cm)],
        "confusion_matrix": cm.tolist(),
    }


# ---------------------------------------------------------------- writing


def predictions_frame(eval_set: EvalSet, y_true: np.ndarray, proba: np.ndarray,
                      class_names: list[str]) -> pd.DataFrame:
    names = np.array(class_names)
    y_pred = proba.argmax(axis=1)
    k = min(TOP_K, len(class_names))
    top = np.argsort(-proba, axis=1, kind="stable")[:, :k]
    true_p = proba[np.arange(len(y_true)), y_true]
    return pd.DataFrame({
        "row": eval_set.frame["row"].to_numpy(),
        "path": eval_set.frame["path"].to_numpy(),
        "url": eval_set.frame["url"].to_numpy(),  # what the user gave: a URL, a file path, archive!member
        "true": names[y_true],
        "predicted": names[y_pred],
        "correct": y_true == y_pred,
        "confidence": proba.max(axis=1),
        "loss": -np.log(np.clip(true_p, 1e-15, None)),
        # JSON pairs, not "label:prob;...": class names may hold ':' and ';' (and commas, quotes).
        "top_k": [json.dumps([[str(names[j]), round(float(proba[i, j]), 4)] for j in row], ensure_ascii=False)
                  for i, row in enumerate(top)],
    })


def write_plots(out: Path, metrics: dict[str, Any], class_names: list[str],
                run_dir: Path | None) -> dict[str, str]:
    cm = np.array(metrics["confusion_matrix"])
    wr_f1 = metrics["baselines"]["weighted_random"]["f1_macro"]
    files = {
        "confusion_matrix": _plots.confusion_matrix(cm, class_names, out / "confusion_matrix.png", False),
        "confusion_matrix_normalized": _plots.confusion_matrix(cm, class_names,
                                                               out / "confusion_matrix_normalized.png", True),
        "per_class_f1": _plots.per_class_f1(
            pd.DataFrame([{"class": c, **v} for c, v in metrics["per_class"].items()]),
            out / "per_class_f1.png", wr_f1),
        "most_confused": _plots.most_confused(
            [(p["true"], p["predicted"], p["count"]) for p in metrics["most_confused"]],
            out / "most_confused.png"),
    }
    history = RunDir(run_dir).metrics if run_dir else None
    if history and history.is_file():
        curves = training_curves(pd.read_csv(history), out / "training_curves.png", wr_f1)
        if curves:
            files["training_curves"] = curves
    return {name: path.name for name, path in files.items()}


def run(opts: EvaluateOptions) -> EvaluateResult:
    """Evaluate, write every file into the output folder; returns metrics.json's content and the files written
    (the result reads as the metrics dict)."""
    return EvaluateResult.of(_evaluate(opts))


def _evaluate(opts: EvaluateOptions) -> dict[str, Any]:
    plan = resolve(opts)
    tta.check_mode(opts.tta)
    loaded = open_model(plan.model_source, opts.device)
    loaded = replace(loaded, probabilities=tta.wrap(loaded.probabilities, opts.tta))
    if loaded.task == "multilabel":  # label sets: other metrics, baseline and report (evaluate/_multilabel.py)
        return _multilabel.run(opts, plan, loaded)
    handle, names = loaded.handle, loaded.class_names
    if is_parts(plan.data_dir):  # a manifest written as parts: the split's rows and streamed counts only
        eval_set, shares, shares_source, summary = _parts_inputs(plan, opts, names)
    else:
        manifest = read_manifest(plan.data_dir)
        split_csv = _read_split_csv(plan.run_dir)
        eval_set = select_eval_set(plan, manifest, opts.split, split_csv)
        train_labels, shares_source = training_labels(manifest, split_csv, eval_set)
        index = {n: i for i, n in enumerate(names)}
        known = np.array([index[x] for x in train_labels if x in index], dtype=int)
        shares = _metrics.class_shares(known, len(names))
        summary = data_summary(manifest)

    t0 = time.perf_counter()
    proba, y_true = predict_proba(loaded, eval_set.frame, eval_set.images_root, opts.batch_size, opts.num_workers,
                                  opts.progress)
    seconds = time.perf_counter() - t0
    proba, y_true, eval_set, unreadable = drop_unreadable(proba, y_true, eval_set, opts.max_unreadable)

    metrics: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "imgclf_version": __version__,
        "split": eval_set.split,
        "split_requested": opts.split,
        "split_source": eval_set.source,
        "note": eval_set.note,
        "n_images": int(len(y_true)),
        "unreadable_images": unreadable,
        "n_classes": len(names),
        "class_names": names,
        "tta": opts.tta,
        **compute_metrics(y_true, proba, names, shares, opts),
        "train_shares_source": shares_source,
        "model": {"checkpoint": str(handle.path.resolve()), "arch": handle.arch,
                  "image_size": handle.preprocessing.image_size},
        "data_dir": storage.display(plan.data_dir),
        "run_dir": str(plan.run_dir.resolve()) if plan.run_dir else None,
        "out_dir": str(plan.out_dir.resolve()),
        "data": summary,
        "timing": {"predict_seconds": seconds, "images_per_s": len(y_true) / max(seconds, 1e-9)},
    }
    out = plan.out_dir
    out.mkdir(parents=True, exist_ok=True)
    preds = predictions_frame(eval_set, y_true, proba, names)
    # Text cells spreadsheet-safe (a class named "=cmd..." is not a formula); raw values in metrics.json.
    write_frame(preds, out / "predictions.csv", index=False, errors="surrogateescape")
    report = classification_report(y_true, proba.argmax(axis=1), labels=np.arange(len(names)),
                                   target_names=names, output_dict=True, zero_division=0)
    write_frame(pd.DataFrame(report).T, out / "classification_report.csv", index_label="class")
    files = {"predictions": "predictions.csv", "classification_report": "classification_report.csv",
             **write_plots(out, metrics, names, plan.run_dir),
             "report": "report.html", "metrics": "metrics.json"}
    metrics["files"] = files
    _html.write_report(out / "report.html", metrics, _html.ReportInputs(
        predictions=preds, images_root=eval_set.images_root, out_dir=out,
        config=handle.config.to_plain() if handle.config is not None else {},
        download_report=_read_download_report(plan.data_dir), gallery_size=opts.gallery_size,
        run_curves=RunDir(plan.run_dir).curves if plan.run_dir else None))
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


# ---------------------------------------------------------------- summary


def _pct(x: float) -> str:
    return f"{x:.3f}"


def format_summary(metrics: dict[str, Any]) -> str:
    """A few lines for the terminal: scores with intervals beside the weighted-random baseline."""
    if metrics.get("task") == "multilabel":
        return _multilabel.format_summary(metrics)
    wr = metrics["baselines"]["weighted_random"]
    lo_f, hi_f = metrics["f1_macro_ci95"]
    lo_a, hi_a = metrics["accuracy_ci95"]
    gain = metrics["vs_weighted_random"]
    top5 = metrics.get("top5_accuracy")
    lines = [
        f"evaluated {metrics['n_images']} images of split '{metrics['split']}' "
        f"({metrics['n_classes']} classes)",
        f"F1-macro  {_pct(metrics['f1_macro'])}  95% CI [{_pct(lo_f)}, {_pct(hi_f)}]   weighted random "
        f"{_pct(wr['f1_macro'])} ± {_pct(wr['f1_macro_std'])}   ({gain['f1_macro_gain']:+.3f})",
        f"accuracy  {_pct(metrics['accuracy'])}  95% CI [{_pct(lo_a)}, {_pct(hi_a)}]   weighted random "
        f"{_pct(wr['accuracy'])}           ({gain['accuracy_gain']:+.3f})",
        f"balanced accuracy {_pct(metrics['balanced_accuracy'])}, log loss {metrics['log_loss']:.3f}"
        + (f", top-5 accuracy {_pct(top5)}" if top5 is not None else ""),
    ]
    if metrics.get("note"):
        lines.append(f"note: {metrics['note']}")
    if not gain["clearly_above"]:
        lines.append("WARNING: the model is not clearly above the weighted-random baseline "
                     "(its F1-macro interval reaches within 2 std of the baseline); do not trust it yet")
    leaked = metrics.get("data", {}).get("leakage_evaluated", {}).get(metrics["split"], 0)
    if leaked:
        lines.append(f"WARNING: {leaked} evaluated image(s) also appear in the training data (same content)")
    out = Path(metrics["out_dir"])
    for key in ("report", "confusion_matrix", "metrics"):
        if key in metrics.get("files", {}):
            lines.append(f"{key + ':':18} {out / metrics['files'][key]}")
    return "\n".join(lines)
