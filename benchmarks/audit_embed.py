"""Audit's embedding input road timed before and after issue 21 (the batched eval preprocessor).

Before: `presets.eval_transform` one image at a time in the DataLoader's dataset, default collate.
Now (`audit._embed`): the images are decoded in the dataset and preprocessed a batch at a time by
predict's and evaluate's preprocessor (`inference.eval_preprocessor`) in the collate. The
embeddings must agree (the script prints the largest difference) and it prints images/s for both,
best of --repeats, rounds alternating, in the same process.

    python benchmarks/audit_embed.py [--copies 1] [--batch-size 128] [--workers 0] [--repeats 3]

Images: the bundled Fashion-MNIST test images (1,000 PNGs, 28x28), ingested by the download stage
into a temporary data directory (`--copies` folders of them); model: the shipped
weights/fashion_mnist_mobilenet_v3_small.pt on CPU, its penultimate layer (what `audit --model` embeds).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from imgclf import presets, storage
from imgclf.audit import _embed
from imgclf.images import ImageLimits, decode_image
from imgclf.manifest import read_manifest, row_refs, usable_rows
from imgclf.stages import download

ROOT = Path(__file__).resolve().parents[1]
TEST_IMAGES = ROOT / "src" / "imgclf" / "demo_data" / "fashion_mnist" / "test"
WEIGHTS = ROOT / "weights" / "fashion_mnist_mobilenet_v3_small.pt"


class PerImage(Dataset):
    """The road before: eval_transform per image (readable images only: the bundled ones all are)."""

    def __init__(self, data_dir: Path, refs: list, pre: presets.Preprocessing) -> None:
        self.data_dir, self.refs, self.transform = data_dir, refs, presets.eval_transform(pre)
        self.limits = ImageLimits(min_side=1).for_resize(pre.resize_size)

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = decode_image(storage.read_row(self.data_dir, self.refs[i]), self.limits).image
        return self.transform(image)


def embed(loader: DataLoader, embedder: _embed.Embedder, batched: bool) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    parts = [embedder.features(batch[0] if batched else batch) for batch in loader]
    return np.concatenate(parts), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)  # a shared machine: one thread each, the same for both roads
    with tempfile.TemporaryDirectory() as tmp:
        sources = []
        for n in range(args.copies):  # distinct folders: each copy is its own rows (same content, same sha)
            shutil.copytree(TEST_IMAGES, Path(tmp) / f"copy{n}" / "test")
            sources.append(Path(tmp) / f"copy{n}")
        data = Path(tmp) / "data"
        download.run(download.DownloadOptions(sources=tuple(sources), out=data, show_progress=False,
                                              print_summary=False, resize="none"))
        frame = usable_rows(read_manifest(data))
        refs = row_refs(frame)
        embedder = _embed.load_embedder(WEIGHTS)
        pre = embedder.preprocessing
        loaders = {
            "before (eval_transform per image)": (DataLoader(PerImage(data, refs, pre), batch_size=args.batch_size,
                                                             num_workers=args.workers), False),
            "now (batched eval_preprocessor)": (DataLoader(_embed._Images(data, refs, pre), batch_size=args.batch_size,
                                                           num_workers=args.workers, collate_fn=_embed._Collate(pre)),
                                                True),
        }
        best: dict[str, float] = {}
        features: dict[str, np.ndarray] = {}
        for _ in range(args.repeats):
            for name, (loader, batched) in loaders.items():
                features[name], seconds = embed(loader, embedder, batched)
                best[name] = min(best.get(name, float("inf")), seconds)
        names = list(loaders)
        diff = float(np.abs(features[names[0]] - features[names[1]]).max())
        print(f"{len(frame)} images ({args.copies} x the bundled test PNGs), batch {args.batch_size}, "
              f"{args.workers} worker(s), best of {args.repeats}; max |embedding difference| {diff:.2e}")
        for name in names:
            print(f"  {name:36} {len(frame) / best[name]:8.1f} images/s")
        print(f"  ratio now / before: {best[names[0]] / best[names[1]]:.2f}")


if __name__ == "__main__":
    main()
