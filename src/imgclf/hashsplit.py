"""The validation side of a manifest's rows decided row by row, for manifests too large for a
global pass (a manifest written as parts): `ValRule`, and the per-label counts of each side in one
streaming pass. Train (train/_stream.py), evaluate (evaluate/_scale.py) and audit (--sample,
audit/_rows.py) use the same rule, so one image is on the same side for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.errors import DataError


@dataclass(frozen=True)
class ValRule:
    """The validation subset of a parts manifest's train rows, decided row by row (no global pass).

    An image is in validation when splitmix64(first 16 hex digits of its sha256, as an integer,
    XOR splitmix64(seed)) / 2**64 < fraction: a uniform, seeded coin per content hash. Copies of
    one image share the side (no train/val leakage through duplicates); per-class validation
    counts are binomial around the fraction instead of the stratified split's exact rounding.
    """

    seed: int
    fraction: float
    HASH = "splitmix64(int(sha256[:16], 16) ^ splitmix64(seed)) / 2**64 < fraction"

    def is_val(self, sha256: Any) -> np.ndarray:
        """A boolean per row: True where that sha256 goes to validation (a list, Series or Arrow array)."""
        values = _hex_prefix(sha256)
        return (_splitmix64(values ^ _splitmix64(np.array([self.seed], dtype=np.uint64))) >> np.uint64(11)) \
            < np.uint64(int(self.fraction * 2**53))

    def as_json(self) -> dict[str, object]:
        return {"kind": "hash", "seed": self.seed, "val_fraction": self.fraction, "hash": self.HASH}

    @classmethod
    def from_json(cls, value: object, where: str) -> ValRule:
        try:
            assert isinstance(value, dict) and value.get("kind") == "hash"
            return cls(int(value["seed"]), float(value["val_fraction"]))
        except (AssertionError, KeyError, TypeError, ValueError):
            raise DataError(f"{where}: unreadable split_rule {str(value)[:200]!r}") from None


def _hex_prefix(sha256: Any) -> np.ndarray:
    """The first 16 hex digits of each sha256 as uint64 (0 for an empty or malformed cell), without a
    Python object per cell: the digits are read from the Arrow string buffer as a (n, 16) byte array."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(sha256, pa.ChunkedArray):
        sha256 = sha256.combine_chunks()
    elif not isinstance(sha256, pa.Array):
        sha256 = pa.array(list(sha256), pa.string())
    head = pc.utf8_rpad(pc.utf8_slice_codeunits(pc.fill_null(sha256.cast(pa.string()), ""), 0, 16), 16, "g")
    offsets = np.frombuffer(head.buffers()[1], dtype=np.int32, count=len(head) + 1, offset=4 * head.offset)
    chars = np.frombuffer(head.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]].reshape(len(head), 16)
    digits = np.select([(chars >= 48) & (chars <= 57), (chars >= 97) & (chars <= 102), (chars >= 65) & (chars <= 70)],
                       [chars - 48, chars - 87, chars - 55], 255).astype(np.uint64)
    valid = (digits != 255).all(axis=1)  # "g" pads a short cell: malformed, as any non-hex digit
    shifts = np.arange(60, -1, -4, dtype=np.uint64)
    return np.where(valid, (digits << shifts).sum(axis=1, dtype=np.uint64), np.uint64(0))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (Steele et al.): a bijective 64-bit mix; uint64 arithmetic wraps."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def subset_label_counts(data_dir: str | Path, rule: ValRule,
                        excluded: frozenset[int] = frozenset()) -> dict[str, dict[str, int]]:
    """Usable rows per label of a parts manifest, in one streaming pass over its split, label and
    sha256 columns: "given_val" (the manifest's own val split), and its train split cut by `rule`
    into "train" and "val"; rows numbered in `excluded` (data.exclude) left out. Memory: one Arrow
    batch of those columns (no Python object per cell), and a count per label."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from imgclf.manifest import scan_arrow

    tallies: dict[str, dict[str, int]] = {"train": {}, "val": {}, "given_val": {}}

    def add(name: str, labels: Any) -> None:
        for item in pc.value_counts(labels).to_pylist():
            tallies[name][item["values"]] = tallies[name].get(item["values"], 0) + item["counts"]

    left_out = pa.array(sorted(excluded), pa.int64())
    for batch in scan_arrow(data_dir, ["row", "split", "label", "sha256"], status="ok"):
        if excluded:
            batch = batch.filter(pc.invert(pc.is_in(batch["row"], value_set=left_out)))
        add("given_val", pc.filter(batch["label"], pc.equal(batch["split"], "val")))
        train = batch.filter(pc.equal(batch["split"], "train"))
        side = rule.is_val(train["sha256"])
        add("val", train["label"].filter(side))
        add("train", train["label"].filter(~side))
    return tallies
