"""Embeddings and perceptual hashes of every audited image, batched and cached by content.

The embedding is the model's penultimate layer (its head removed), on the model's own eval
preprocessing, applied to whole batches by predict's and evaluate's preprocessor
(`inference.eval_preprocessor`, in the loader workers' collate). Exported models (ONNX, TorchScript)
expose no inner layer: their log-probabilities are the embedding. Images stream through in batches;
every PART_SIZE of them are saved as one part of AUDIT_DIR/cache/embeddings-KEY/ (KEY: a fingerprint
of the model file and preprocessing; each image by its sha256), so a rerun, or an audit resumed
after Ctrl-C or a crash, decodes only images it has not seen with that model.
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
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from imgclf import presets, storage
from imgclf._files import atomic_path
from imgclf.errors import DataError, first_line
from imgclf.images import ImageLimits, Rejected, decode_image
from imgclf.inference import ModelHandle, Preprocessor, eval_preprocessor, load
from imgclf.manifest import RowRef, row_refs
from imgclf.progress import track

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
    """(decoded image, phash, ok) per row; an unreadable file is a value (ok False), not an exception."""

    def __init__(self, data_dir: str | Path, refs: list[RowRef], pre: presets.Preprocessing) -> None:
        self.data_dir = data_dir
        self.refs = refs
        # Stored images were validated at download; any size is fine, but the resize bounds the work.
        self.limits = ImageLimits(min_side=1).for_resize(pre.resize_size)

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> tuple[Image.Image | None, np.ndarray, bool]:
        try:
            decoded = decode_image(storage.read_row(self.data_dir, self.refs[i]), self.limits)
            if isinstance(decoded, Rejected):
                raise ValueError(f"{decoded.status}: {decoded.reason}")
            image = decoded.image
            # int64 view: torch has no uint64 dtype to collate into
            return image, phash256(image).view(np.int64), True
        except (OSError, ValueError, SyntaxError, DataError) as err:  # truncated, removed, outside DATA_DIR
            log.warning("cannot read %s: %s", self.refs[i].path, first_line(err))
            return None, np.zeros((len(CROPS), HASH_WORDS), np.int64), False


class _Collate:
    """A loader worker's batch: the readable images preprocessed together by predict's and evaluate's
    preprocessor (`inference.eval_preprocessor`, bitwise `presets.eval_transform`), zeros for the rest;
    (images (N, 3, S, S), hashes (N, crops, 4) int64, ok (N,) bool)."""

    def __init__(self, pre: presets.Preprocessing) -> None:
        self.pre = pre
        self._prepare: Preprocessor | None = None  # built where it runs (a worker): torch modules do not pickle

    def __call__(self, items: list[tuple[Image.Image | None, np.ndarray, bool]]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._prepare is None:
            self._prepare = eval_preprocessor(self.pre)
        ok = torch.tensor([good for _, _, good in items], dtype=torch.bool)
        batch = torch.zeros(len(items), 3, self.pre.image_size, self.pre.image_size)
        if ok.any():
            batch[ok] = torch.from_numpy(self._prepare([image for image, _, good in items if good]))
        return batch, torch.from_numpy(np.stack([hashes for _, hashes, _ in items])), ok


# ---------------------------------------------------------------- cache
#
# AUDIT_DIR/cache/embeddings-KEY/ holds numbered parts, part-000000.npz, ..., each with the sha256,
# float16 embedding and 256-bit hashes of PART_SIZE images as they were embedded. A part is written
# once and never rewritten, so saving costs the same at any N (rewriting one growing file would be
# quadratic in N), and an interrupted audit loses at most the part it was filling.

# Images per part: a killed audit re-embeds at most this many.
PART_SIZE = 4_096


def _parts(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.npz"))


def _part_shas(path: Path) -> np.ndarray | None:
    """The sha256 column of one part (npz reads arrays lazily: not its vectors); None when damaged."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return npz["sha256"]
    except (OSError, ValueError, KeyError) as err:  # a damaged part is recomputed, never trusted
        log.warning("ignoring damaged cache part %s (%s)", path, err.__class__.__name__)
        return None


def _write_part(folder: Path, shas: list[str], vectors: list[np.ndarray], hashes: list[np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    existing = _parts(folder)
    number = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
    with atomic_path(folder / f"part-{number:06d}.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, sha256=np.array(shas, dtype=str), vectors=np.stack(vectors).astype(np.float16),
                     phash=np.stack(hashes))


@dataclass
class Embedded:
    features: np.ndarray  # (N, D) float16 (half the memory of float32; cosine and the linear head do not
    #                       need more digits), rows in frame order
    phash: np.ndarray  # (N, len(CROPS), 4) uint64
    readable: np.ndarray  # (N,) bool
    reused: int  # images taken from the cache


def embed(frame: pd.DataFrame, data_dir: str | Path, embedder: Embedder, cache_dir: Path,
          batch_size: int = 128, num_workers: int = 0) -> Embedded:
    """Embeddings and hashes for every row of `frame` (manifest rows), from cache when possible.

    Memory holds the result (N x D float16) and at most one part in the making, never a second copy
    of all embeddings; progress is a line every few seconds (imgclf.progress) with rate and time left.
    """
    folder = cache_dir / f"embeddings-{embedder.key}"
    shas = frame["sha256"].to_numpy(dtype=str)
    uniq = np.unique(shas)
    cached = [c for c in map(_part_shas, _parts(folder)) if c is not None]
    known = np.unique(np.concatenate(cached)) if cached else np.array([], str)
    todo = uniq[~np.isin(uniq, known)].tolist()
    unreadable = _embed_missing(todo, frame, data_dir, embedder, folder, batch_size, num_workers)
    return _assemble(shas, uniq, _parts(folder), unreadable, reused=len(uniq) - len(todo))


def _embed_missing(todo: list[str], frame: pd.DataFrame, data_dir: str | Path, embedder: Embedder,
                   folder: Path, batch_size: int, num_workers: int) -> set[str]:
    """Embed the images of `todo` (sha256s) into new cache parts; the sha256s that could not be read."""
    unreadable: set[str] = set()
    if not todo:
        return unreadable
    log.info("embedding %d image(s) (%d from cache)", len(todo), frame["sha256"].nunique() - len(todo))
    first_ref = dict(zip(frame["sha256"].tolist(), row_refs(frame), strict=True))
    dataset = _Images(data_dir, [first_ref[s] for s in todo], embedder.preprocessing)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False,
                        collate_fn=_Collate(embedder.preprocessing))
    done = 0
    part: tuple[list[str], list[np.ndarray], list[np.ndarray]] = ([], [], [])
    for images, hashes, ok in track(loader, "embed", total=len(todo), unit="images", size=lambda b: len(b[2])):
        vectors = embedder.features(images)
        for j in range(len(ok)):
            sha = todo[done + j]
            if bool(ok[j]):
                part[0].append(sha)
                part[1].append(vectors[j])
                part[2].append(hashes[j].numpy().view(np.uint64))
            else:
                unreadable.add(sha)  # not cached: a file fixed later is read again
        done += len(ok)
        if len(part[0]) >= PART_SIZE:  # an interrupted audit resumes from here (the cache is by sha256)
            _write_part(folder, *part)
            part = ([], [], [])
    if part[0]:
        _write_part(folder, *part)
    return unreadable


def _assemble(shas: np.ndarray, uniq: np.ndarray, parts: list[Path], unreadable: set[str],
              reused: int) -> Embedded:
    """Rows in frame order, filled part by part (one part in memory besides the result)."""
    _, inverse = np.unique(shas, return_inverse=True)  # row -> its sha's position in `uniq`
    order = np.argsort(inverse, kind="stable")  # rows grouped by sha, so a sha's rows are one slice
    starts = np.searchsorted(inverse[order], np.arange(len(uniq) + 1))
    features: np.ndarray | None = None
    phash = np.zeros((len(shas), len(CROPS), HASH_WORDS), np.uint64)
    readable = np.zeros(len(shas), dtype=bool)
    for path in parts:
        try:
            with np.load(path, allow_pickle=False) as npz:
                part_shas, vectors, hashes = npz["sha256"], npz["vectors"], npz["phash"]
        except (OSError, ValueError, KeyError):
            continue  # warned about in embed(); its images were embedded again into a new part
        if features is None:
            features = np.zeros((len(shas), vectors.shape[1]), np.float16)
        pos = np.searchsorted(uniq, part_shas)
        wanted = (pos < len(uniq)) & (uniq[np.minimum(pos, len(uniq) - 1)] == part_shas)
        # The rows of sha k are order[starts[k]:starts[k + 1]] (usually one): spread each part row over them.
        ks = np.flatnonzero(wanted)
        first, count = starts[pos[ks]], starts[pos[ks] + 1] - starts[pos[ks]]
        src = np.repeat(ks, count)
        rows = order[np.repeat(first, count) + np.arange(len(src)) - np.repeat(np.cumsum(count) - count, count)]
        features[rows], phash[rows], readable[rows] = vectors[src], hashes[src], True
    if features is None:
        features = np.zeros((len(shas), 1), np.float16)
    readable &= ~np.isin(shas, list(unreadable))
    return Embedded(features=features, phash=phash, readable=readable, reused=reused)
