"""A multi-label corpus built from real images: composites of 2-4 real pictures, labelled with what they hold.

    .venv/bin/python benchmarks/multilabel_corpus.py --out /tmp/mlcorpus --images 400            # Fashion-MNIST
    .venv/bin/python benchmarks/multilabel_corpus.py --out /tmp/mlcorpus --source tuxpaint --root /tmp/debroot

Each composite is a 2x2 grid; 2-4 of its cells hold a real image (a Fashion-MNIST photo from the bundled
sample, or a Tux Paint stamp from the Debian package `tuxpaint-stamps-default`, see benchmarks/transfer.py),
each of a different class, the other cells are plain background. Its label set is the classes of the images
it holds. Some composites hold one image (one label) and a few hold none (the empty set: an image with no
label). The same corpus is written three ways, as a user would bring it:

  - `list.csv`: `url,label,split`, the label cell the set joined with `|`, the URLs served over real HTTP
    (the caller serves `images/`, e.g. with imgclf._localserver.LocalServer on 127.0.0.1);
  - `list.parquet`: `path,labels,split` with `labels` a list column (local paths);
  - `tree/<split>/<label>/<name>.png`: the several-folders layout, a composite copied into the folder of each
    of its labels (a composite with no label has no folder, so the tree holds only the labelled ones).

tests/test_multilabel_ship.py and tests/test_multilabel_e2e.py build a small one from the bundled sample;
benchmarks/multilabel.py a larger one.
"""

from __future__ import annotations

import argparse
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FASHION = REPO / "src" / "imgclf" / "demo_data" / "fashion_mnist"
SEP = "|"

TUX = "usr/share/tuxpaint/stamps"
# class -> stamp folders of tuxpaint-stamps-default (the classes of benchmarks/transfer.py's tuxpaint set)
TUXPAINT = {"birds": ["animals/birds"], "mammals": ["animals/mammals"], "insects": ["animals/insects"],
            "fish": ["animals/fish"], "food": ["food"], "plants": ["plants"], "vehicles": ["vehicles"],
            "town": ["town"]}


@dataclass(frozen=True)
class CorpusSpec:
    """How many composites, their shape and how their label sets are drawn (all seeded)."""

    images: int = 120
    cell: int = 28  # pixels per grid cell; the composite is 2 * cell square
    none_fraction: float = 0.05  # composites with no image at all: the empty label set
    single_fraction: float = 0.2  # composites with one image (one label); the rest hold 2-4
    test_fraction: float = 0.25
    seed: int = 0


@dataclass(frozen=True)
class Composite:
    name: str  # file name under images/
    labels: tuple[str, ...]  # sorted
    split: str


@dataclass(frozen=True)
class Corpus:
    root: Path  # images/ (the composites), list.parquet, tree/ and list.csv live here
    classes: list[str]
    items: list[Composite]

    @property
    def images(self) -> Path:
        return self.root / "images"


def fashion_sources(split: str = "train", per_class: int = 60) -> dict[str, list[Path]]:
    """The bundled Fashion-MNIST sample: class -> its first `per_class` images of `split`."""
    return {d.name: sorted(d.glob("*.png"))[:per_class] for d in sorted((FASHION / split).iterdir())}


def tuxpaint_sources(root: Path) -> dict[str, list[Path]]:
    """Tux Paint stamps extracted under `root` (dpkg-deb -x): class -> PNG stamps."""
    found = {label: sorted(p for f in folders for p in (root / TUX / f).rglob("*.png"))
             for label, folders in TUXPAINT.items()}
    missing = [label for label, files in found.items() if not files]
    if missing:
        raise SystemExit(f"{root / TUX}: no PNG stamps for {', '.join(missing)}; extract tuxpaint-stamps-default "
                         "there (apt-get download tuxpaint-stamps-default && dpkg-deb -x *.deb ROOT)")
    return found


def _tile(path: Path, cell: int) -> Image.Image:
    """The image scaled to fit one cell, centred, transparency (stamps) flattened onto white."""
    with Image.open(path) as im:
        im = im.convert("RGBA")
        im.thumbnail((cell, cell), Image.Resampling.LANCZOS)
    tile = Image.new("RGB", (cell, cell), (255, 255, 255))
    tile.paste(im, ((cell - im.width) // 2, (cell - im.height) // 2), im)
    return tile


def _count(rng: random.Random, spec: CorpusSpec, n_classes: int) -> int:
    draw = rng.random()
    if draw < spec.none_fraction:
        return 0
    if draw < spec.none_fraction + spec.single_fraction:
        return 1
    return rng.randint(2, min(4, n_classes))


def compose(tiles: Sequence[Image.Image], cell: int, rng: random.Random) -> Image.Image:
    """Up to 4 tiles in random cells of a 2x2 grid on a light, seeded paper-grain background.

    The grain makes every composite's bytes unique: two composites with the same tiles, or two with
    none, would otherwise be one image to download's content hash."""
    grain = np.random.default_rng(rng.getrandbits(32)).integers(215, 256, (2 * cell, 2 * cell, 1), dtype=np.uint8)
    canvas = Image.fromarray(np.repeat(grain, 3, axis=2))
    for tile, slot in zip(tiles, rng.sample(range(4), len(tiles)), strict=False):
        canvas.paste(tile, ((slot % 2) * cell, (slot // 2) * cell))
    return canvas


def build(out: Path, sources: dict[str, list[Path]], spec: CorpusSpec = CorpusSpec()) -> Corpus:
    """Write `spec.images` composites under out/images and the three listings; returns what was written."""
    rng = random.Random(spec.seed)
    classes = sorted(sources)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(spec.images):
        labels = sorted(rng.sample(classes, _count(rng, spec, len(classes))))
        tiles = [_tile(rng.choice(sources[label]), spec.cell) for label in labels]
        name = f"c{i:05d}.png"
        compose(tiles, spec.cell, rng).save(images / name)
        split = "test" if rng.random() < spec.test_fraction else "train"
        items.append(Composite(name, tuple(labels), split))
    corpus = Corpus(out, classes, items)
    write_parquet(corpus)
    write_tree(corpus)
    return corpus


def write_csv(corpus: Corpus, base_url: str, name: str = "list.csv") -> Path:
    """url,label,split with the set joined by `|` (an empty cell: no label); base_url serves corpus.images."""
    frame = pd.DataFrame({"url": [f"{base_url.rstrip('/')}/{c.name}" for c in corpus.items],
                          "label": [SEP.join(c.labels) for c in corpus.items],
                          "split": [c.split for c in corpus.items]})
    path = corpus.root / name
    frame.to_csv(path, index=False)
    return path


def write_parquet(corpus: Corpus, name: str = "list.parquet") -> Path:
    """path,labels,split with `labels` a list column (absolute local paths)."""
    frame = pd.DataFrame({"path": [str(corpus.images / c.name) for c in corpus.items],
                          "labels": [list(c.labels) for c in corpus.items],
                          "split": [c.split for c in corpus.items]})
    path = corpus.root / name
    frame.to_parquet(path, index=False)
    return path


def write_tree(corpus: Corpus, name: str = "tree") -> Path:
    """tree/<split>/<label>/<composite>: one copy per label (same content in several class folders)."""
    tree = corpus.root / name
    shutil.rmtree(tree, ignore_errors=True)
    for c in corpus.items:
        for label in c.labels:
            dest = tree / c.split / label
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(corpus.images / c.name, dest / c.name)
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--source", choices=("fashion", "tuxpaint"), default="fashion")
    parser.add_argument("--root", type=Path, default=Path("/tmp/debroot"),
                        help="where tuxpaint-stamps-default is extracted")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--cell", type=int, default=None, help="pixels per cell (28 fashion, 64 tuxpaint)")
    args = parser.parse_args()
    sources = fashion_sources() if args.source == "fashion" else tuxpaint_sources(args.root)
    cell = args.cell or (28 if args.source == "fashion" else 64)
    corpus = build(args.out, sources, CorpusSpec(images=args.images, cell=cell))
    counts = pd.Series([len(c.labels) for c in corpus.items]).value_counts().sort_index()
    print(f"{len(corpus.items)} composites of {len(corpus.classes)} classes under {args.out}; labels per image: "
          + ", ".join(f"{k}: {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
