"""Near-duplicates: images that are the same picture after re-encoding, resizing or cropping.

The signal is the 256-bit DCT perceptual hash (imagehash.phash, hash_size=16) of each image and
of its centred 90% and 80% crops (see _embed.CROPS): re-encoding and resizing move few bits, and
a copy cut to about such a centred crop can match the original's crop hash (on 28-pixel
Fashion-MNIST, 10-20% crops mostly moved too many bits: docs/benchmarks.md). Every whole-image
hash is looked up, within max_distance bits, among all hashes (whole and crops) in a faiss binary
index: an exact one (every pair, SIMD popcounts) up to `exact_below` images, above that an
inverted file (IVF: the hashes clustered into about sqrt(entries)/2 lists, each lookup scanning the
`probes` nearest lists), so the work grows as N^1.5, not N^2; on all 70,000 Fashion-MNIST images it
found the same 320 pairs as the exact search, in a quarter of its time (docs/benchmarks.md). A pair must also pass the
64-lowest-frequency-bit test of the earlier search (`prefilter`), so the results are those of
earlier versions. Pairs are grouped into connected components (scipy), so a picture copied five
times is one group.

Embeddings are not used for duplicates: a trained classifier's penultimate features collapse
within a class (distinct Fashion-MNIST images of one class had median nearest-neighbour cosine
0.998, while resized copies scored lower), so similarity there says "same class", not "same picture".
They serve the outlier score instead (`nearest_neighbours`: exact cosine top-k up to `exact_below`
images, above that candidates from a faiss IVF index on a 64-dimension PCA of the embeddings,
rescored with the exact cosine).
"""

from __future__ import annotations

import math
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
    # Up to this many images the searches compare every pair (exact; 20,000 take seconds), above it
    # they use an inverted-file index. probes: lists scanned per lookup (on Fashion-MNIST's 70,000
    # images 8 found 319 of the 320 pairs, 12 all of them: docs/benchmarks.md).
    exact_below: int = 20_000
    probes: int = 12


@dataclass
class Neighbours:
    index: np.ndarray  # (N, k) nearest other images, most similar first
    similarity: np.ndarray  # (N, k) cosine similarity


def _unit(features: np.ndarray) -> np.ndarray:
    features = features.astype(np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.clip(norms, 1e-12, None)


def nearest_neighbours(features: np.ndarray, k: int, settings: DuplicateSettings | None = None) -> Neighbours:
    """Top-k cosine neighbours of every row (itself excluded); `features` may be float16."""
    settings = settings or DuplicateSettings()
    n = len(features)
    k = max(0, min(k, n - 1))
    if n <= settings.exact_below or k == 0:
        return _exact_neighbours(features, k)
    return _indexed_neighbours(features, k, settings)


def _exact_neighbours(features: np.ndarray, k: int) -> Neighbours:
    """Every pair, in row blocks (memory bounded at any N, time N^2)."""
    n = len(features)
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


PCA_DIMS = 64  # the index searches a PCA of the embeddings: a 1024-float scan per candidate was the cost
ROWS = 8_192  # rows converted to float32 at a time (the float16 features are never copied whole)


def _indexed_neighbours(features: np.ndarray, k: int, settings: DuplicateSettings) -> Neighbours:
    """Candidates (2k + 1 per row) from an IVF index on the PCA of the unit embeddings, kept by exact cosine."""
    import faiss

    n, dims = features.shape
    rng = np.random.default_rng(0)  # a fixed sample: the same audit gives the same index
    sample = _unit(features[np.sort(rng.choice(n, min(n, 20_000), replace=False))])
    project = None
    if dims > PCA_DIMS:
        project = faiss.PCAMatrix(dims, PCA_DIMS)
        project.train(sample)
    reduced = np.concatenate([_unit(_project(project, _unit(features[s:s + ROWS]))) for s in range(0, n, ROWS)])
    nlist = max(1, round(math.sqrt(n)))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(reduced.shape[1]), reduced.shape[1], nlist,
                               faiss.METRIC_INNER_PRODUCT)
    index.nprobe = settings.probes
    index.train(reduced[np.sort(rng.choice(n, min(n, 64 * nlist), replace=False))])
    index.add(reduced)
    found = np.zeros((n, k), dtype=np.int64)
    sim = np.zeros((n, k), dtype=np.float32)
    for start in range(0, n, ROWS):
        _, cand = index.search(reduced[start:start + ROWS], min(n, 2 * k + 1))
        rows = np.arange(start, start + len(cand))
        exact = np.einsum("nd,nkd->nk", _unit(features[rows]), _unit(features[np.maximum(cand, 0).ravel()])
                          .reshape(len(rows), cand.shape[1], dims))
        exact[(cand < 0) | (cand == rows[:, None])] = -np.inf  # no candidate there, or the row itself
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        found[rows], sim[rows] = np.take_along_axis(cand, order, axis=1), np.take_along_axis(exact, order, axis=1)
    return Neighbours(found, sim)


def _project(project, unit: np.ndarray) -> np.ndarray:
    return unit if project is None else project.apply(np.ascontiguousarray(unit))


def _low64(words: np.ndarray) -> np.ndarray:
    """The 8x8 lowest-frequency bits of (N, 4) uint64 256-bit hashes, as (N,) uint64."""
    as_bytes = words.astype(">u8").view(np.uint8).reshape(len(words), 32)
    # Row-major 16x16 bits: byte 2r holds row r's first 8 columns; rows 0-7 are the low frequencies.
    return np.ascontiguousarray(as_bytes[:, 0:16:2]).view(">u8").ravel().astype(np.uint64)


def _codes(words: np.ndarray) -> np.ndarray:
    """(M, 4) uint64 hashes as the (M, 32) uint8 codes faiss takes (Hamming distance is the same)."""
    return np.ascontiguousarray(np.ascontiguousarray(words).view(np.uint8).reshape(len(words), 32))


def _binary_index(codes: np.ndarray, images: int, settings: DuplicateSettings):
    import faiss

    if images <= settings.exact_below:
        index = faiss.IndexBinaryFlat(256)
    else:
        # About sqrt(entries)/2 lists: with 12 probes this found every pair of 70,000 images (210,000
        # entries, 229 lists); with more lists each probe scans fewer hashes, but a copy more often
        # sits in a list not probed.
        nlist = max(1, round(math.sqrt(len(codes)) / 2))
        index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(256), 256, nlist)
        index.nprobe = settings.probes
        index.cp.niter = 10  # k-means iterations: the lists need not be optimal, only stable
        rng = np.random.default_rng(0)
        index.train(codes[np.sort(rng.choice(len(codes), min(len(codes), 64 * nlist), replace=False))])
    index.add(codes)
    return index


def _close_pairs(h: np.ndarray, settings: DuplicateSettings) -> np.ndarray:
    """(M, 3) rows (i, j, distance), i < j, where the whole-image hash of one is within max_distance
    bits of the whole image or a crop of the other (and passes the low-frequency prefilter)."""
    n, crops = h.shape[0], h.shape[1]
    entries = np.ascontiguousarray(h.transpose(1, 0, 2).reshape(n * crops, 4))  # id = crop * n + image
    index = _binary_index(_codes(entries), n, settings)
    queries = _codes(h[:, 0])
    found = [np.zeros((0, 3), np.int64)]
    for start in range(0, n, 1 << 16):  # results of one block of lookups at a time
        lims, dist, ids = index.range_search(queries[start:start + (1 << 16)], settings.max_distance + 1)
        i = start + np.repeat(np.arange(len(lims) - 1), np.diff(lims).astype(np.int64))
        ids = ids.astype(np.int64)
        j, crop = ids % n, ids // n
        keep = np.where(crop == 0, i < j, i != j)  # a whole pair once; a crop of any other image
        i, j, ids, dist = i[keep], j[keep], ids[keep], dist[keep].astype(np.int64)
        low = np.bitwise_count(np.bitwise_xor(_low64(h[i, 0]), _low64(entries[ids])))
        ok = low <= settings.prefilter
        found.append(np.stack([np.minimum(i[ok], j[ok]), np.maximum(i[ok], j[ok]), dist[ok]], axis=1))
    return np.concatenate(found)


def duplicate_pairs(hashes: np.ndarray, valid: np.ndarray,
                    settings: DuplicateSettings) -> tuple[np.ndarray, np.ndarray]:
    """(M, 2) near-duplicate pairs (i < j, row positions) and their similarity 1 - distance/256.

    `hashes` is (N, crops, 4): the whole image first, then its centred crops. The whole image of
    one is compared with the whole image and with every crop of the other.
    """
    ids = np.flatnonzero(valid)
    every = _close_pairs(np.ascontiguousarray(hashes[ids]), settings) if len(ids) > 1 else np.zeros((0, 3), np.int64)
    every[:, :2] = ids[every[:, :2]]
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
