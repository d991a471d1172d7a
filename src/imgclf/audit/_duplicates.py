"""Near-duplicates: images that are the same picture after re-encoding, resizing or cropping.

The signal is the 256-bit DCT perceptual hash (imagehash.phash, hash_size=16) of each image and
of its centred 90% and 80% crops (see _embed.CROPS): re-encoding and resizing move few bits, and
a copy cut to about such a centred crop can match the original's crop hash (on 28-pixel
Fashion-MNIST, 10-20% crops mostly moved too many bits: docs/benchmarks.md). Pairs are found in two steps that
stay cheap at tens of thousands of images: a blocked all-pairs popcount on the 64 lowest-frequency
bits (a prefilter: those bits change least under re-encoding and resizing), then the full 256-bit
distance for the pairs it passes, block by block (memory bounded at any N). Pairs are grouped
into connected components (scipy), so a picture copied five
times is one group.

Embeddings are not used for duplicates: a trained classifier's penultimate features collapse
within a class (distinct Fashion-MNIST images of one class had median nearest-neighbour cosine
0.998, while resized copies scored lower), so similarity there says "same class", not "same picture".
They serve the outlier score instead (`nearest_neighbours`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

# Rows per block are chosen so that one block of distances holds about this many cells (64 MB as
# float32): memory stays bounded at any N.
BLOCK_CELLS = 1 << 24


def _block(n: int) -> int:
    return max(16, BLOCK_CELLS // max(n, 1))


@dataclass(frozen=True)
class DuplicateSettings:
    # Bits (of 256) two hashes may differ by and still be one picture. Measured on Fashion-MNIST,
    # the hardest case (small, centred, similar items): distinct images >= 26 apart, re-encoded
    # and resized copies mostly <= 20 (docs/benchmarks.md).
    max_distance: int = 24
    # Bits (of the 64 lowest frequencies) the prefilter allows. Not lossless (a pair within
    # max_distance could differ in more low bits), so it is wide: random pairs differ in ~32.
    prefilter: int = 18
    neighbours: int = 10  # nearest neighbours per image in embedding space (outlier score)


@dataclass
class Neighbours:
    index: np.ndarray  # (N, k) nearest other images, most similar first
    similarity: np.ndarray  # (N, k) cosine similarity


def _unit(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return (features / np.clip(norms, 1e-12, None)).astype(np.float32)


def nearest_neighbours(features: np.ndarray, k: int) -> Neighbours:
    """Top-k cosine neighbours of every row (itself excluded), in row blocks."""
    n = len(features)
    k = max(0, min(k, n - 1))
    unit = _unit(features)
    index = np.zeros((n, k), dtype=np.int64)
    sim = np.zeros((n, k), dtype=np.float32)
    step = _block(n)
    for start in range(0, n, step):
        block = unit[start:start + step] @ unit.T
        rows = np.arange(block.shape[0])
        block[rows, rows + start] = -np.inf  # not its own neighbour
        if k == 0:
            continue
        top = np.argpartition(-block, k - 1, axis=1)[:, :k]
        top_sim = np.take_along_axis(block, top, axis=1)
        order = np.argsort(-top_sim, axis=1, kind="stable")
        index[start:start + len(rows)] = np.take_along_axis(top, order, axis=1)
        sim[start:start + len(rows)] = np.take_along_axis(top_sim, order, axis=1)
    return Neighbours(index, sim)


def _low64(words: np.ndarray) -> np.ndarray:
    """The 8x8 lowest-frequency bits of (N, 4) uint64 256-bit hashes, as (N,) uint64."""
    as_bytes = words.astype(">u8").view(np.uint8).reshape(len(words), 32)
    # Row-major 16x16 bits: byte 2r holds row r's first 8 columns; rows 0-7 are the low frequencies.
    return np.ascontiguousarray(as_bytes[:, 0:16:2]).view(">u8").ravel().astype(np.uint64)


def hamming256(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit distance between rows of two (M, 4) uint64 arrays."""
    return np.bitwise_count(np.bitwise_xor(a, b)).sum(axis=-1).astype(np.int64)


def _close_pairs(full: np.ndarray, other: np.ndarray, same: bool,
                 settings: DuplicateSettings) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(i, j, distance) of pairs whose whole-image hash `full[i]` is within max_distance of `other[j]`.

    Row blocks of the prefilter are checked at full 256 bits as they come, so memory holds one block
    of the prefilter and its survivors, never all candidate pairs at once: on Fashion-MNIST, where
    many items share their low frequencies, the candidates of 70,000 images took 14.8 GB (issue 27).
    """
    keys_a, keys_b = _low64(full), _low64(other)
    step = _block(len(keys_b)) // 2  # the XOR is 8 bytes a cell
    for start in range(0, len(keys_a), step):
        dist = np.bitwise_count(np.bitwise_xor(keys_a[start:start + step, None], keys_b[None, :]))
        i, j = np.nonzero(dist <= settings.prefilter)
        del dist
        i = i + start
        keep = i < j if same else i != j
        i, j = i[keep], j[keep]
        d = hamming256(full[i], other[j])
        ok = d <= settings.max_distance
        yield i[ok], j[ok], d[ok]


def duplicate_pairs(hashes: np.ndarray, valid: np.ndarray,
                    settings: DuplicateSettings) -> tuple[np.ndarray, np.ndarray]:
    """(M, 2) near-duplicate pairs (i < j, row positions) and their similarity 1 - distance/256.

    `hashes` is (N, crops, 4): the whole image first, then its centred crops. The whole image of
    one is compared with the whole image and with every crop of the other.
    """
    ids = np.flatnonzero(valid)
    h = hashes[ids]
    full = h[:, 0]
    found = [np.zeros((0, 3), np.int64)]
    for crop in range(h.shape[1]):
        for i, j, dist in _close_pairs(full, np.ascontiguousarray(h[:, crop]), crop == 0, settings):
            a, b = ids[i], ids[j]
            found.append(np.stack([np.minimum(a, b), np.maximum(a, b), dist], axis=1))
    every = np.concatenate(found)
    every = every[np.lexsort((every[:, 2], every[:, 1], every[:, 0]))]  # closest first within a pair
    pairs, first = np.unique(every[:, :2], axis=0, return_index=True)
    return pairs.reshape(-1, 2).astype(np.int64), 1.0 - every[first, 2] / 256.0


def group(n: int, pairs: np.ndarray) -> np.ndarray:
    """Group id per row (connected components of the pair graph); -1 for rows in no pair."""
    if not len(pairs):
        return np.full(n, -1)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    in_pair = np.zeros(n, dtype=bool)
    in_pair[pairs.ravel()] = True
    # Renumber the components that hold pairs 0, 1, 2, ... in order of their first row.
    ids = np.full(n, -1)
    seen: dict[int, int] = {}
    for row in np.flatnonzero(in_pair):
        ids[row] = seen.setdefault(int(component[row]), len(seen))
    return ids


def best_similarity(n: int, pairs: np.ndarray, similarity: np.ndarray) -> np.ndarray:
    """Per row, the similarity of its closest near-duplicate (0 when it has none)."""
    best = np.zeros(n)
    np.maximum.at(best, pairs[:, 0], similarity)
    np.maximum.at(best, pairs[:, 1], similarity)
    return best
