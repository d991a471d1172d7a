"""Benchmark `imgclf audit` on the bundled Fashion-MNIST sample with injected noise and copies.

    .venv/bin/python benchmarks/audit.py --workdir /tmp/audit_bench                 # model trained for the audit
    .venv/bin/python benchmarks/audit.py --workdir /tmp/audit_bench --model weights/fashion_mnist_mobilenet_v3_small.pt
    .venv/bin/python benchmarks/audit.py --workdir /tmp/audit_bench --compare-minutes 6   # + cleaned vs noisy training
    .venv/bin/python benchmarks/audit.py --workdir /tmp/audit_bench --compare-epochs 20   # the same, by epochs

1. Label errors: the sample's 3,000 training images with a seeded 5% (--noise) of labels flipped to
   another class (chosen uniformly); `imgclf audit` runs over it; precision and recall of the flagged
   training images against the flips, and the precision of the ranking at recall 0.7.
2. Cleaned vs noisy training (--compare-minutes M): the same config and time budget, once on the noisy
   data and once with data.exclude=AUDIT_DIR/audit.csv; test F1-macro of both with bootstrap intervals.
3. Leakage: --copies training images copied into the test split, each re-encoded (JPEG q60-90), resized
   (x0.75, 1.5, 2), centre-cropped (keeping 80-90% of each side, jitter <= 2%) or cropped off-centre;
   recall of the leakage finder per kind, and the groups found among the untouched images.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from imgclf import auditdir
from imgclf.manifest import write_manifest
from imgclf.stages import audit

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "imgclf" / "demo_data" / "fashion_mnist"
COPY_KINDS = ("jpeg", "resize", "center_crop", "offcenter_crop")


def store(data: Path, payload: bytes, ext: str) -> tuple[str, str]:
    sha = hashlib.sha256(payload).hexdigest()
    rel = f"images/{sha[:2]}/{sha}.{ext}"
    (data / rel).parent.mkdir(parents=True, exist_ok=True)
    (data / rel).write_bytes(payload)
    return sha, rel


def sample_rows(data: Path) -> pd.DataFrame:
    rows = []
    for split in ("train", "test"):
        for folder in sorted((SAMPLE / split).iterdir()):
            for src in sorted(folder.glob("*.png")):
                payload = src.read_bytes()
                sha, rel = store(data, payload, "png")
                rows.append({"row": len(rows), "source": f"{split}.csv", "url": f"http://sample.invalid/{src.name}",
                             "label": folder.name, "split": split, "status": "ok", "sha256": sha, "path": rel,
                             "width": 28, "height": 28, "bytes": len(payload), "duplicate_of": -1})
    return pd.DataFrame(rows)


def flip_labels(frame: pd.DataFrame, rate: float, seed: int) -> set[int]:
    rng = np.random.default_rng(seed)
    train = np.flatnonzero(frame["split"] == "train")
    chosen = rng.choice(train, round(rate * len(train)), replace=False)
    classes = sorted(frame["label"].unique())
    for i in chosen:
        others = [c for c in classes if c != frame.at[i, "label"]]
        frame.at[i, "label"] = others[rng.integers(len(others))]
    return {int(frame.at[i, "row"]) for i in chosen}


def variant(image: Image.Image, kind: str, rng: np.random.Generator) -> tuple[bytes, str]:
    w, h = image.size
    if kind == "resize":
        s = float(rng.choice([0.75, 1.5, 2.0]))
        image = image.resize((round(w * s), round(h * s)), Image.BICUBIC)
    elif kind == "center_crop":
        keep = rng.uniform(0.8, 0.9)
        dx, dy = (w - w * keep) / 2 + rng.uniform(-0.02, 0.02) * w, (h - h * keep) / 2 + rng.uniform(-0.02, 0.02) * h
        image = image.crop((round(dx), round(dy), round(dx + w * keep), round(dy + h * keep)))
    elif kind == "offcenter_crop":
        keep = rng.uniform(0.8, 0.9)
        dx, dy = rng.choice([0.0, w * (1 - keep)]), rng.choice([0.0, h * (1 - keep)])
        image = image.crop((round(dx), round(dy), round(dx + w * keep), round(dy + h * keep)))
    buf = io.BytesIO()
    if kind == "jpeg":
        image.save(buf, "JPEG", quality=int(rng.integers(60, 91)))
        return buf.getvalue(), "jpg"
    image.save(buf, "PNG")
    return buf.getvalue(), "png"


def inject_copies(data: Path, frame: pd.DataFrame, n: int, seed: int) -> tuple[pd.DataFrame, list[tuple]]:
    rng = np.random.default_rng(seed + 1)
    train = rng.choice(np.flatnonzero(frame["split"] == "train"), n, replace=False)
    rows, pairs = [], []
    for k, i in enumerate(train):
        kind = COPY_KINDS[k % len(COPY_KINDS)]
        with Image.open(data / frame.at[i, "path"]) as im:
            payload, ext = variant(im.convert("RGB"), kind, rng)
        sha, rel = store(data, payload, ext)
        row = {**frame.loc[i].to_dict(), "row": len(frame) + k, "split": "test", "sha256": sha, "path": rel,
               "url": f"http://copies.invalid/{kind}/{k}.{ext}", "bytes": len(payload)}
        rows.append(row)
        pairs.append((int(frame.at[i, "row"]), row["row"], kind))
    return pd.concat([frame, pd.DataFrame(rows)], ignore_index=True), pairs


def label_scores(findings: pd.DataFrame, flips: set[int], result: dict) -> dict:
    issues = findings[(findings["kind"] == "label_issue") & (findings["split"] == "train")]
    flagged = set(issues["row"])
    hits = len(flagged & flips)
    ranked = issues.sort_values("score", ascending=False)["row"].tolist()
    at_recall = None
    for k in range(1, len(ranked) + 1):  # precision of the top-k ranking where recall first reaches 0.7
        found = len(set(ranked[:k]) & flips)
        if found >= 0.7 * len(flips):
            at_recall = found / k
            break
    return {"flips": len(flips), "flagged_train": len(flagged), "true_positives": hits,
            "precision": hits / max(len(flagged), 1), "recall": hits / max(len(flips), 1),
            "precision_at_recall_0.7": at_recall, "out_of_sample_accuracy": result["out_of_sample_accuracy"],
            "seconds": result["timing"]}


def leakage_scores(findings: pd.DataFrame, pairs: list[tuple]) -> dict:
    leak = findings[findings["kind"] == "leakage"]
    group = dict(zip(leak["row"], leak["group"], strict=True))
    per_kind: dict[str, list[int]] = {k: [0, 0] for k in COPY_KINDS}
    for original, copy, kind in pairs:
        per_kind[kind][1] += 1
        per_kind[kind][0] += int(original in group and group[original] == group.get(copy))
    copies = {c for _, c, _ in pairs} | {o for o, _, _ in pairs}
    groups = findings[findings["group"] >= 0]
    untouched = groups.groupby("group")["row"].agg(lambda r: not set(r) & copies)
    return {"recall": {k: f"{a}/{b} = {a / max(b, 1):.2f}" for k, (a, b) in per_kind.items()},
            "recall_all": sum(a for a, _ in per_kind.values()) / max(len(pairs), 1),
            "groups_among_untouched_images": int(untouched.sum())}


def compare_training(data: Path, audit_csv: Path, work: Path, minutes: float, seed: int, epochs: int = 0) -> dict:
    """Same config and budget on the noisy data, then without the audit's drop/relabel rows.

    The budget is `minutes` of training, or with `epochs` a number of epochs (the same work for
    both runs whatever else the machine is doing; the cleaned run has fewer images per epoch).
    """
    from imgclf.config import load_config
    from imgclf.stages import evaluate, train

    budget = [f"trainer.epochs={epochs}"] if epochs else [f"trainer.max_time_minutes={minutes}", "trainer.epochs=60"]
    base = [*budget, "trainer.progress_bar=false", "data.num_workers=0", f"seed={seed}"]
    out = {}
    for name, extra in (("noisy", []), ("cleaned", [f"data.exclude={audit_csv}"])):
        config = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml", base + extra)
        run_dir = work / f"run-{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        trained = train.run(train.TrainOptions(config, data, run_dir))
        m = evaluate.run(evaluate.EvaluateOptions(model=run_dir, seed=seed))
        out[name] = {"f1_macro": m["f1_macro"], "f1_macro_ci95": m["f1_macro_ci95"], "accuracy": m["accuracy"],
                     "epochs": trained.epochs_run, "train_images": int((pd.read_csv(run_dir / "split.csv")["subset"]
                                                                        == "train").sum())}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/imgclf_audit_bench"))
    ap.add_argument("--model", type=Path, default=None, help="embed with this model (default: train one)")
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--copies", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare-minutes", type=float, default=0.0, help="train noisy vs cleaned (0: skip)")
    ap.add_argument("--compare-epochs", type=int, default=0,
                    help="train noisy vs cleaned for this many epochs each (a budget the machine's load cannot change)")
    ap.add_argument("--filter-by", default="low_self_confidence", help="cleanlab find_label_issues method")
    ap.add_argument("--max-self-confidence", type=float, default=None,
                    help="imgclf audit's p(given) ceiling (default 0.2/classes; 1: cleanlab's flagged set alone)")
    ap.add_argument("overrides", nargs="*", help="key=value for the model trained for the audit")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    work = args.workdir
    shutil.rmtree(work / "noisy", ignore_errors=True)
    shutil.rmtree(work / "copies", ignore_errors=True)
    noisy, copies = work / "noisy", work / "copies"
    frame = sample_rows(noisy)
    flips = flip_labels(frame, args.noise, args.seed)
    write_manifest(frame, noisy)

    t0 = time.perf_counter()
    result = audit.run(audit.AuditOptions(data=noisy, out=work / "audit-noisy", model=args.model, seed=args.seed,
                                          overrides=args.overrides, filter_by=args.filter_by,
                                          max_self_confidence=args.max_self_confidence))
    findings = auditdir.read_findings(work / "audit-noisy" / auditdir.CSV)
    report = {"label_errors": label_scores(findings, flips, result), "audit_seconds": time.perf_counter() - t0,
              "model": result["model"]["source"]}
    print(json.dumps(report, indent=2), flush=True)

    clean = sample_rows(copies)
    with_copies, pairs = inject_copies(copies, clean, args.copies, args.seed)
    write_manifest(with_copies, copies)
    embedder = args.model or work / "audit-noisy" / auditdir.EMBEDDER
    # Same model, same untouched images: the noisy audit's cache spares their decoding (only copies are new).
    shutil.rmtree(work / "audit-copies", ignore_errors=True)
    shutil.copytree(work / "audit-noisy" / auditdir.CACHE, work / "audit-copies" / auditdir.CACHE)
    result = audit.run(audit.AuditOptions(data=copies, out=work / "audit-copies", model=embedder, seed=args.seed))
    report["leakage"] = leakage_scores(auditdir.read_findings(work / "audit-copies" / auditdir.CSV), pairs)
    report["leakage"]["seconds"] = result["timing"]
    print(json.dumps(report["leakage"], indent=2), flush=True)

    if args.compare_minutes > 0 or args.compare_epochs > 0:
        report["training"] = compare_training(noisy, work / "audit-noisy" / auditdir.CSV, work,
                                              args.compare_minutes, args.seed, args.compare_epochs)
        print(json.dumps(report["training"], indent=2), flush=True)
    (work / "report.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
