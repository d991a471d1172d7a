"""RUN_DIR/batch_preview.png: augmented training images as the model sees them (before normalisation),
with their labels, as fastai's `show_batch`: the first thing to look at when a run learns nothing."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from imgclf._files import atomic_path
from imgclf.curves import literal_text
from imgclf.errors import DataError, first_line

log = logging.getLogger("imgclf.train")

PREVIEW_NAME = "batch_preview.png"


def write_batch_preview(dataset: Dataset, class_names: list[str], run_dir: Path, count: int = 16,
                        seed: int = 0) -> Path | None:
    """`count` images drawn (seeded) from the training set, each through the training augmentation.

    A picture for the user, never a reason to stop training: a failure to draw it is one warning
    (a data problem, DataError, still stops the run as the first epoch would). The augmentations
    draw from the global random generators; their state is restored afterwards, so the run trains
    exactly as it would without the preview (same seed, same figures)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            return _write(dataset, class_names, run_dir, count, seed)
    except DataError:
        raise
    except Exception as err:  # matplotlib and decoders raise assorted types
        log.warning("%s not written (%s)", PREVIEW_NAME, first_line(err))
        return None
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _title(target: torch.Tensor, class_names: list[str]) -> str:
    """A class name, or for task: multilabel (a {0, 1} row) the labels joined by ' | ' ('-' for none)."""
    if target.ndim == 0:
        return class_names[int(target)]
    labels = [class_names[j] for j in torch.nonzero(target).flatten().tolist()]
    return " | ".join(labels) if labels else "-"


@literal_text()  # class names are data: `$\frac{$` is drawn as written, not parsed as mathtext
def _write(dataset: Dataset, class_names: list[str], run_dir: Path, count: int, seed: int) -> Path:
    from matplotlib.figure import Figure

    generator = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(dataset), generator=generator)[:count].tolist()  # type: ignore[arg-type]
    items = [dataset[i] for i in picks]
    cols = 4
    rows = (len(items) + cols - 1) // cols
    fig = Figure(figsize=(2.2 * cols, 2.4 * rows), dpi=100)
    for k, (image, target) in enumerate(items):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(image.permute(1, 2, 0).numpy())
        ax.set_title(_title(target, class_names), fontsize=9)
        ax.axis("off")
    fig.suptitle("training batch after augmentation")
    fig.tight_layout()
    path = run_dir / PREVIEW_NAME
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    log.info("augmented training images: %s", path)
    return path
