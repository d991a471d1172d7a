"""audit._embed: the images are preprocessed in batches by the one eval preprocessor that predict and
evaluate use, and the embeddings are those of the per-image `presets.eval_transform` road."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from imgclf import presets, storage
from imgclf.audit import _embed
from imgclf.images import ImageLimits, decode_image
from imgclf.manifest import read_manifest, row_refs, usable_rows

pytest.importorskip("imagehash")


def _per_image(data_dir: Path, frame, pre: presets.Preprocessing) -> torch.Tensor:
    """The road _embed took before: presets.eval_transform on each decoded image, stacked."""
    transform = presets.eval_transform(pre)
    limits = ImageLimits(min_side=1).for_resize(pre.resize_size)
    return torch.stack([transform(decode_image(storage.read_row(data_dir, ref), limits).image)
                        for ref in row_refs(frame)])


def test_the_batched_collate_is_bitwise_the_per_image_transform(tiny_run: Path, tiny_data_dir: Path) -> None:
    embedder = _embed.load_embedder(tiny_run)
    frame = usable_rows(read_manifest(tiny_data_dir)).head(7)
    images = _embed._Images(tiny_data_dir, row_refs(frame), embedder.preprocessing)
    batch, hashes, ok = _embed._Collate(embedder.preprocessing)([images[i] for i in range(len(images))])
    assert ok.all() and hashes.shape == (7, len(_embed.CROPS), _embed.HASH_WORDS)
    assert torch.equal(batch, _per_image(tiny_data_dir, frame, embedder.preprocessing))


def test_embeddings_equal_the_per_image_road_and_unreadable_rows_stay_values(tiny_run: Path, tiny_data_dir: Path,
                                                                             tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    frame = usable_rows(read_manifest(data)).head(9).reset_index(drop=True)
    broken = data / frame.loc[4, "path"]
    broken.write_bytes(broken.read_bytes()[:40])  # truncated since download: a value, not an exception
    embedder = _embed.load_embedder(tiny_run)
    got = _embed.embed(frame, data, embedder, tmp_path / "cache", batch_size=4)
    readable = np.arange(len(frame)) != 4
    assert got.readable.tolist() == readable.tolist()
    want = embedder.features(_per_image(data, frame[readable], embedder.preprocessing))
    # The cache keeps float16: equal within its precision.
    np.testing.assert_allclose(got.features[readable].astype(np.float32), want, rtol=2e-3, atol=2e-3)
