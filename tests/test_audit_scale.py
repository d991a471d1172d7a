"""Issue 27, scale: embeddings are saved as they stream, so an interrupted audit resumes; the
near-duplicate search keeps its pairs when the prefilter runs in many small blocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import make_data_dir

from imgclf.audit import _duplicates, _embed
from imgclf.manifest import read_manifest, usable_rows

pytest.importorskip("imagehash")

SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "fashion_mnist_mobilenet_v3_small.pt"


def test_an_interrupted_embedding_resumes_from_the_cache(tmp_path: Path, monkeypatch) -> None:
    data = make_data_dir(tmp_path / "data", ["Bag", "Sneaker"], n_train=12, n_test=0)
    frame = usable_rows(read_manifest(data))
    embedder = _embed.load_embedder(SHIPPED)
    monkeypatch.setattr(_embed, "SAVE_EVERY", 8)
    calls = {"n": 0}
    real = embedder.features

    def dies_on_the_third_batch(batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the user's Ctrl-C, or a killed job
        return real(batch)

    embedder.features = dies_on_the_third_batch
    with pytest.raises(KeyboardInterrupt):
        _embed.embed(frame, data, embedder, tmp_path / "cache", batch_size=4)
    embedder.features = real
    resumed = _embed.embed(frame, data, embedder, tmp_path / "cache", batch_size=4)
    assert resumed.reused == 8  # the two batches before the interruption were kept
    fresh = _embed.embed(frame, data, embedder, tmp_path / "fresh", batch_size=24)
    np.testing.assert_allclose(resumed.features, fresh.features, rtol=1e-4, atol=1e-5)


def test_duplicate_pairs_are_the_same_in_small_blocks(monkeypatch) -> None:
    rng = np.random.default_rng(3)
    hashes = rng.integers(0, 2**63, size=(300, 3, 4), dtype=np.int64).astype(np.uint64)
    for a, b in ((3, 200), (50, 299), (120, 121)):
        hashes[b] = hashes[a]
        hashes[b, 0, 2] ^= np.uint64(0b111)
    hashes[250, 0] = hashes[10, 1]  # 250 is a centred crop of 10
    whole = _duplicates.duplicate_pairs(hashes, np.ones(300, bool), _duplicates.DuplicateSettings())
    monkeypatch.setattr(_duplicates, "BLOCK_CELLS", 64)  # blocks of 16 rows: many blocks
    blocked = _duplicates.duplicate_pairs(hashes, np.ones(300, bool), _duplicates.DuplicateSettings())
    assert whole[0].tolist() == blocked[0].tolist() == [[3, 200], [10, 250], [50, 299], [120, 121]]
    np.testing.assert_array_equal(whole[1], blocked[1])
