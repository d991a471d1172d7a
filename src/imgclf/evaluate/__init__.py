"""Evaluate stage: a trained model on one split -> metrics with intervals and baselines, plots, report.

    imgclf evaluate --model RUN_DIR [--data DATA_DIR] [--split test]
    imgclf evaluate --model weights/model.ckpt --data DATA_DIR [--out DIR]

Reads the model (`inference.load`), the images of the chosen split (manifest rows
with status ok; when the data has no such rows, the run's validation subset from split.csv),
predicts with the checkpoint's own eval preprocessing, and writes into the output folder:

    metrics.json               stable keys, documented in docs/evaluate.md (the returned EvaluateResult reads as it)
    predictions.csv            row, path, url, true, predicted, correct, confidence, loss, top_k
    classification_report.csv  scikit-learn's per-class precision/recall/F1/support
    confusion_matrix.png, confusion_matrix_normalized.png, per_class_f1.png,
    most_confused.png, training_curves.png (when the run has metrics.csv)
    report.html                one self-contained page (images embedded)

The output folder is the run directory, `--out` when given, and for a model file without
`--out`: DATA_DIR/evaluations/<weights file stem>-<split>/. Nothing reaches the next stage
except these files; predict/export/serve load the checkpoint themselves.
"""

from __future__ import annotations

from imgclf.evaluate._run import (
    SCHEMA_VERSION,
    EvalSet,
    EvaluateOptions,
    EvaluateResult,
    Plan,
    compute_metrics,
    data_summary,
    format_summary,
    resolve,
    run,
)

__all__ = ["SCHEMA_VERSION", "EvalSet", "EvaluateOptions", "EvaluateResult", "Plan", "compute_metrics", "data_summary",
           "format_summary", "resolve", "run"]
