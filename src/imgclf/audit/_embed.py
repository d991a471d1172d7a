"""Embeddings and perceptual hashes of every audited image, batched and cached by content.

The embedding is the model's penultimate layer (its head removed), on the model's own eval
preprocessing. Exported models (ONNX, TorchScript) expose no inner layer: their log-probabilities
are the embedding. Both caches live in AUDIT_DIR/cache and are keyed by image sha256 (and, for
embeddings, by a fingerprint of the model file and preprocessing), so a rerun decodes only
images it has not seen with that model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from imgclf import presets, storage
from imgclf._files import atomic_path
from imgclf.errors import DataError, first_line
from imgclf.images import ImageLimits, Rejected, decode_image
from imgclf.inference import ModelHandle, load
from imgclf.manifest import RowRef, row_refs

log = logging.getLogger(__name__)


@dataclass
class Embedder:
    """A function from a normalised batch to features, with what it needs to know about itself."""

    features: Callable[[torch.Tensor], np.ndarray]
    preprocessing: presets.Preprocessing
    class_names: list[str]
    key: str  # fingerprint of weights + preprocessing: the embedding cache's name
    source: str  # the model path, for audit.json
    kind: str  # "penultimate layer" or "log-probabilities"


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def headless(model: nn.Module) -> nn.Module:
    """A copy of the classifier whose output is the input of its last linear layer."""
    body = copy.deepcopy(model).eval()
    if hasattr(body, "reset_classifier"):  # timm models know how to drop their own head
        body.reset_classifier(0)
        return body
    for attr in ("fc", "classifier", "head"):
        head = getattr(body, attr, None)
        if isinstance(head, nn.Linear):
            setattr(body, attr, nn.Identity())
            return body
        if isinstance(head, nn.Sequential) and isinstance(head[-1], nn.Linear):
            head[-1] = nn.Identity()
            return body
    raise DataError(f"cannot find the classification head of {type(model).__name__} to take embeddings from")


def _torch_features(body: nn.Module) -> Callable[[torch.Tensor], np.ndarray]:
    from imgclf.models import fast_layout

    def run(batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return torch.flatten(body(fast_layout(batch)), 1).float().numpy()

    return run


def load_embedder(path: str | Path) -> Embedder:
    """An embedder from a run directory, checkpoint, .onnx or TorchScript file (inference.load)."""
    return embedder(load(path))


def embedder(handle: ModelHandle) -> Embedder:
    """The handle's penultimate layer (a torch module), or its log-probabilities (an exported file)."""
    if handle.module is not None:
        key = _fingerprint(_file_digest(handle.path), handle.preprocessing, "penultimate")
        return Embedder(_torch_features(headless(handle.module)), handle.preprocessing, handle.class_names,
                        key, str(handle.path), "penultimate layer")
    backend = handle.backend

    def logprobs(batch: torch.Tensor) -> np.ndarray:
        return np.log(np.clip(backend.probabilities(batch), 1e-7, None)).astype(np.float32)

    key = _fingerprint(_file_digest(handle.path), handle.preprocessing, "logprob")
    return Embedder(logprobs, handle.preprocessing, handle.class_names, key, str(handle.path), "log-probabilities")


def _fingerprint(weights_digest: str, pre: presets.Preprocessing, layer: str) -> str:
    plain = json.dumps({"weights": weights_digest, "pre": pre.to_plain(), "layer": layer}, sort_keys=True)
    return hashlib.sha256(plain.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- decoding


# Centred crops hashed besides the whole image: a copy cropped to a fraction of the original (a
# thumbnail cut to square, a trimmed border) matches the original's hash at about that fraction.
CROPS = (1.0, 0.9, 0.8)
HASH_WORDS = 4  # 256-bit hashes (imagehash.phash with hash_size=16) as 4 x uint64


def phash256(image) -> np.ndarray:
    """(len(CROPS), 4) uint64: the 256-bit DCT perceptual hash of the image and of its centred crops."""
    out = np.zeros((len(CROPS), HASH_WORDS), dtype=np.uint64)
    width, height = image.size
    for n, fraction in enumerate(CROPS):
        part = image
        if fraction < 1.0:
            dx, dy = round(width * (1 - fraction) / 2), round(height * (1 - fraction) / 2)
            part = image.crop((dx, dy, width - dx, height - dy))
        bits = imagehash.phash(part, hash_size=16).hash
        out[n] = np.packbits(bits.ravel()).view(">u8").astype(np.uint64)
    return out


class _Images(Dataset):
    """(normalised tensor, phash, ok) per row; an unreadable file is a value (ok False), not an exception."""

    def __init__(self, data_dir: str | Path, refs: list[RowRef], pre: presets.Preprocessing) -> None:
        self.data_dir = data_dir
        self.refs = refs
        self.transform = presets.eval_transform(pre)
        # Stored images were validated at download; any size is fine, but the resize bounds the work.
        self.limits = ImageLimits(min_side=1).for_resize(pre.resize_size)
        self.blank = torch.zeros(3, pre.image_size, pre.image_size)

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, np.ndarray, bool]:
        try:
            decoded = decode_image(storage.read_row(self.data_dir, self.refs[i]), self.limits)
            if isinstance(decoded, Rejected):
                raise ValueError(f"{decoded.status}: {decoded.reason}")
            image = decoded.image
            # int64 view: the default collate makes tensors, and torch has no uint64 dtype to collate into
            return self.transform(image), phash256(image).view(np.int64), True
        except (OSError, ValueError, SyntaxError, DataError) as err:  # truncated, removed, outside DATA_DIR
            log.warning("cannot read %s: %s", self.refs[i].path, first_line(err))
            return self.blank, np.zeros((len(CROPS), HASH_WORDS), np.int64), False


# ---------------------------------------------------------------- cache


def _read_cache(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as err:  # a damaged cache is recomputed, never trusted
        log.warning("ignoring damaged cache %s (%s)", path, err.__class__.__name__)
        return {}


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


# Newly embedded images between two cache writes: a killed audit of 70,000 images loses at most
# this many (a write of the whole cache costs about a second per 100,000 images).
SAVE_EVERY = 10_000


@dataclass
class Embedded:
    features: np.ndarray  # (N, D) float32, rows in frame order
    phash: np.ndarray  # (N, len(CROPS), 4) uint64
    readable: np.ndarray  # (N,) bool
    reused: int  # images taken from the cache


def embed(frame: pd.DataFrame, data_dir: str | Path, embedder: Embedder, cache_dir: Path,
          batch_size: int = 128, num_workers: int = 0) -> Embedded:
    """Embeddings and hashes for every row of `frame` (manifest rows), from cache when possible."""
    emb_path, hash_path = cache_dir / f"embeddings-{embedder.key}.npz", cache_dir / "phash256.npz"
    emb_cache, hash_cache = _read_cache(emb_path), _read_cache(hash_path)
    known_emb = dict(zip(emb_cache.get("sha256", np.array([], str)).tolist(), emb_cache.get("vectors", []),
                         strict=True))
    known_hash = dict(zip(hash_cache.get("sha256", np.array([], str)).tolist(),
                          hash_cache.get("phash", np.zeros((0, len(CROPS), HASH_WORDS), np.uint64)), strict=True))
    shas = frame["sha256"].tolist()
    todo = sorted({s for s in shas if s not in known_emb or s not in known_hash})
    first_ref = dict(zip(shas, row_refs(frame), strict=True))
    unreadable: set[str] = set()
    if todo:
        log.info("embedding %d image(s) (%d from cache)", len(todo), len(set(shas)) - len(todo))
        dataset = _Images(data_dir, [first_ref[s] for s in todo], embedder.preprocessing)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
        done, saved = 0, 0
        for images, hashes, ok in loader:
            vectors = embedder.features(images)
            for j in range(len(ok)):
                sha = todo[done + j]
                if bool(ok[j]):
                    known_emb[sha] = vectors[j].astype(np.float32)
                    known_hash[sha] = hashes[j].numpy().view(np.uint64)
                else:
                    unreadable.add(sha)
            done += len(ok)
            if done - saved >= SAVE_EVERY:  # an interrupted audit resumes from here (the cache is by sha256)
                _save(emb_path, hash_path, known_emb, known_hash)
                saved = done
                log.info("embedded %d / %d image(s)", done, len(todo))
        _save(emb_path, hash_path, known_emb, known_hash)
    dim = len(next(iter(known_emb.values()))) if known_emb else 1
    blank = np.zeros(dim, np.float32)
    no_hash = np.zeros((len(CROPS), HASH_WORDS), np.uint64)
    return Embedded(
        features=np.stack([known_emb.get(s, blank) for s in shas]) if shas else np.zeros((0, dim), np.float32),
        phash=np.stack([known_hash.get(s, no_hash) for s in shas]) if shas else no_hash[None][:0],
        readable=np.array([s not in unreadable and s in known_emb for s in shas], dtype=bool),
        reused=len(set(shas)) - len(todo))


def _save(emb_path: Path, hash_path: Path, emb: dict[str, np.ndarray], hashes: dict[str, np.ndarray]) -> None:
    keys = sorted(emb)
    _write_cache(emb_path, {"sha256": np.array(keys, dtype=str),
                            "vectors": np.stack([emb[k] for k in keys]) if keys else np.zeros((0, 1), np.float32)})
    hkeys = sorted(hashes)
    _write_cache(hash_path, {"sha256": np.array(hkeys, dtype=str),
                             "phash": np.stack([hashes[k] for k in hkeys]) if hkeys
                             else np.zeros((0, len(CROPS), HASH_WORDS), np.uint64)})
