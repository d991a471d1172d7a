"""Issue 27, scale: embeddings are saved as they stream (float16 parts), so an interrupted audit
resumes; the indexed near-duplicate and neighbour searches find what the all-pairs searches find."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import make_data_dir

from imgclf.audit import _duplicates, _embed
from imgclf.manifest import read_manifest, usable_rows

pytest.importorskip("imagehash")

SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "fashion_mnist_mobilenet_v3_small.pt"


def test_an_interrupted_embedding_resumes_from_the_cache(tmp_path: Path, monkeypatch, caplog) -> None:
    data = make_data_dir(tmp_path / "data", ["Bag", "Sneaker"], n_train=12, n_test=0)
    frame = usable_rows(read_manifest(data))
    embedder = _embed.load_embedder(SHIPPED)
    monkeypatch.setattr(_embed, "PART_SIZE", 8)
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
    with caplog.at_level(logging.INFO, logger="imgclf"):
        resumed = _embed.embed(frame, data, embedder, tmp_path / "cache", batch_size=4)
    assert resumed.reused == 8  # the two batches before the interruption were kept
    # Progress in a log: the closing line says how many images were embedded now, and how fast.
    assert "embedding 16 image(s) (8 from cache)" in caplog.text
    assert re.search(r"embed: 16 images in \d+s \([\d.,]+ images/s\)", caplog.text), caplog.text
    fresh = _embed.embed(frame, data, embedder, tmp_path / "fresh", batch_size=24)
    assert len(list((tmp_path / "cache").glob("embeddings-*/part-*.npz"))) == 3  # 8 before; 8 and 8 after
    assert resumed.features.dtype == np.float16 and resumed.readable.all()
    # float16 in the cache: equal to a fresh run up to float16's precision (batches of 4 vs 24 differ in the last bits)
    np.testing.assert_allclose(resumed.features.astype(np.float32), fresh.features.astype(np.float32),
                               rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(resumed.phash, fresh.phash)


def _all_pairs_reference(hashes: np.ndarray, settings: _duplicates.DuplicateSettings) -> list[list[int]]:
    """The search of earlier versions, written plainly: every whole image against every whole image and
    crop, within max_distance bits and within `prefilter` on the 64 lowest-frequency bits."""
    n = len(hashes)
    low = np.stack([_duplicates._low64(hashes[:, c]) for c in range(hashes.shape[1])], axis=1)
    found = set()
    for c in range(hashes.shape[1]):
        full = np.bitwise_count(hashes[:, None, 0] ^ hashes[None, :, c]).sum(-1)
        low_d = np.bitwise_count(low[:, None, 0] ^ low[None, :, c])
        for i, j in zip(*np.nonzero((full <= settings.max_distance) & (low_d <= settings.prefilter)), strict=True):
            if i != j and (c > 0 or i < j):
                found.add((min(i, j), max(i, j)))
    assert len(found) < n
    return sorted(map(list, found))


def _planted_hashes(n: int, seed: int) -> np.ndarray:
    """Random 256-bit hashes with copies: re-encoded (a few bits moved), cropped (the crop's hash),
    and one group of five (a picture copied four times)."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**63, size=(n, 3, 4), dtype=np.int64).astype(np.uint64)
    for a, b in ((3, 200), (50, n - 1), (120, 121)):
        hashes[b] = hashes[a]
        hashes[b, 0, 2] ^= np.uint64(0b111)
    hashes[250, 0] = hashes[10, 1]  # 250 is a centred crop of 10
    hashes[260, 0] = hashes[11, 2]
    hashes[260, 0, 3] ^= np.uint64(1 << 40 | 1 << 7)
    for b in (400, 401, 402, 403):
        hashes[b] = hashes[399]
        hashes[b, 0, 1] ^= np.uint64(1 << b % 64)
    return hashes


def test_duplicate_search_finds_what_all_pairs_finds_exact_and_indexed() -> None:
    """The faiss searches (exact below exact_below images, an inverted file above) give exactly the
    pairs, and distances, of the plain all-pairs search."""
    hashes = _planted_hashes(1200, seed=3)
    exact = _duplicates.DuplicateSettings()
    expected = _all_pairs_reference(hashes, exact)
    assert [3, 200] in expected and [10, 250] in expected and [11, 260] in expected and len(expected) == 15
    valid = np.ones(len(hashes), bool)
    flat = _duplicates.duplicate_pairs(hashes, valid, exact)
    indexed = _duplicates.duplicate_pairs(hashes, valid, _duplicates.DuplicateSettings(exact_below=100))
    assert flat[0].tolist() == indexed[0].tolist() == expected
    np.testing.assert_array_equal(flat[1], indexed[1])
    assert flat[1][flat[0].tolist().index([120, 121])] == 1 - 3 / 256
    # Invalid (unreadable) rows are left out, and row numbers stay those of the frame.
    valid[200] = False
    assert [3, 200] not in _duplicates.duplicate_pairs(hashes, valid, exact)[0].tolist()


def test_indexed_neighbours_keep_the_outliers_of_the_exact_search() -> None:
    """Above exact_below the outlier score comes from IVF candidates on a PCA, rescored exactly: on
    clustered float16 embeddings with planted outliers, nearly every true neighbour is found, the
    similarities of what is found are exact, and the same images are flagged."""
    from imgclf.audit import _outliers

    rng = np.random.default_rng(0)
    # Like a network's embeddings: a few directions carry almost everything (16 latent dimensions
    # spread over 128), so a 64-dimension PCA keeps the neighbourhoods; 12 classes, a little noise.
    latent = rng.normal(size=(12, 16))[rng.integers(0, 12, 4000)] * 3 + rng.normal(size=(4000, 16))
    features = (latent @ rng.normal(size=(16, 128)) + 0.05 * rng.normal(size=(4000, 128))).astype(np.float16)
    features[[7, 700, 3100]] = rng.normal(size=(3, 128)) * 20  # far from every cluster
    exact = _duplicates.nearest_neighbours(features, 10)
    indexed = _duplicates.nearest_neighbours(features, 10, _duplicates.DuplicateSettings(exact_below=500))
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact.index, indexed.index, strict=True)])
    assert recall >= 0.9
    assert (indexed.index != np.arange(4000)[:, None]).all()  # never its own neighbour
    same = indexed.index == exact.index
    np.testing.assert_allclose(indexed.similarity[same], exact.similarity[same], rtol=1e-5, atol=1e-6)
    valid = np.ones(4000, bool)
    flagged_exact = _outliers.find_outliers(exact, valid).flagged
    flagged_indexed = _outliers.find_outliers(indexed, valid).flagged
    assert {7, 700, 3100} <= set(flagged_exact.tolist())
    assert flagged_indexed.tolist() == flagged_exact.tolist()
