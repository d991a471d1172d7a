"""Training streams a manifest written as parts (issue 25 item 2; imgclf.train._stream, hashsplit.ValRule):
a real data directory of bundled Fashion-MNIST PNGs whose manifest is rewritten as parts of 11 rows
by download's own parts writer; real tiny training (seconds), real DataLoader workers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
import torch
from conftest import TINY_CLASSES, tiny_config
from helpers import make_data_dir
from torch.utils.data import DataLoader

from imgclf import hashsplit, manifest, presets
from imgclf.download._report import _Parts
from imgclf.errors import ConfigError, DataError
from imgclf.stages import train
from imgclf.train import _stream


def to_parts(data_dir: Path, rows: int) -> pd.DataFrame:
    """Rewrite DATA_DIR's manifest as parts of `rows` rows (manifest.parquet is removed); the frame."""
    frame = manifest.read_manifest(data_dir)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    _Parts(data_dir, rows).write(iter([table.slice(i, 5) for i in range(0, table.num_rows, 5)]))
    assert manifest.is_parts(data_dir) and not (data_dir / manifest.MANIFEST_NAME).exists()
    return frame


@pytest.fixture(scope="module")
def parts_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    dest = make_data_dir(tmp_path_factory.mktemp("parts"), TINY_CLASSES, n_train=24, n_test=10)
    return dest, to_parts(dest, 11)


def _rule_sides(frame: pd.DataFrame, rule: hashsplit.ValRule) -> tuple[set[int], set[int]]:
    """(train rows, val rows) as the rule says, computed from the whole frame (what the stream avoids)."""
    pool = frame[(frame["split"] == "train") & (frame["status"] == "ok")]
    side = rule.is_val(pool["sha256"].tolist())
    return set(pool.loc[~side, "row"]), set(pool.loc[side, "row"])


def test_the_val_rule_is_seeded_per_image_and_near_the_fraction() -> None:
    import hashlib

    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(20_000)]
    rule = hashsplit.ValRule(0, 0.15)
    side = rule.is_val(shas)
    assert abs(side.mean() - 0.15) < 0.01
    assert (rule.is_val(shas[::-1])[::-1] == side).all()  # a row's side depends on its sha256 alone
    assert (hashsplit.ValRule(1, 0.15).is_val(shas) != side).mean() > 0.2  # another seed, another draw
    assert not hashsplit.ValRule(0, 0.15).is_val(["", "not hex"]).any()
    assert hashsplit.ValRule.from_json(rule.as_json(), "run.json") == rule


def test_train_on_parts_uses_the_rule_and_records_it(parts_dir, tmp_path: Path) -> None:
    data_dir, frame = parts_dir
    result = train.run(train.TrainOptions(tiny_config("trainer.epochs=1"), data_dir, tmp_path / "run"))
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    rule = hashsplit.ValRule(tiny_config().seed, 0.15)
    train_rows, val_rows = _rule_sides(frame, rule)
    assert info["status"] == "done" and info["class_names"] == sorted(TINY_CLASSES) == result.class_names
    assert info["split_rule"] == {**rule.as_json(), "train_rows": len(train_rows),
                                  "val_rows": len(val_rows)}
    assert 0 < len(val_rows) < len(train_rows)
    assert not (tmp_path / "run" / "split.csv").exists()  # the rule replaces it
    assert (tmp_path / "run" / "batch_preview.png").is_file()

    # Resume, asking for another val_fraction: the recorded rule wins, so the val rows stay the same.
    train.run(train.TrainOptions(tiny_config("trainer.epochs=2", "data.val_fraction=0.5"), data_dir, tmp_path / "run",
                                 resume=True))
    again = json.loads((tmp_path / "run" / "run.json").read_text())
    assert again["epochs_run"] == 2 and again["split_rule"] == info["split_rule"]


def _dataset(split: _stream.StreamSplit, subset: str, batch: int, **kw) -> _stream.StreamImages:
    pre = presets.Preprocessing.from_config(tiny_config().data)
    return _stream.StreamImages(split, subset, split.class_names, batch, presets.eval_resize(pre), pre, seed=0, **kw)


def _reader_rows(dataset: _stream.StreamImages, worker: int, workers: int) -> list[list[int]]:
    return [rows["row"].tolist() for rows in dataset.own_batches(worker, workers)]


def test_ranks_and_workers_read_disjoint_equal_shares_reshuffled_per_epoch(parts_dir) -> None:
    data_dir, frame = parts_dir
    split = _stream.stream_split(tiny_config(), data_dir, Path("unused"), resume=False)
    train_rows, val_rows = _rule_sides(frame, split.rule)
    per_rank = []
    for rank in (0, 1):
        got = [r for w in (0, 1) for b in _reader_rows(_dataset(split, "train", 4, rank=rank, world=2), w, 2)
               for r in b]
        assert len(got) == len(_dataset(split, "train", 4, rank=rank, world=2)) * 4
        per_rank.append(got)
    assert len(per_rank[0]) == len(per_rank[1]) == len(train_rows) // 8 * 4  # equal steps on every rank
    seen = per_rank[0] + per_rank[1]
    assert len(seen) == len(set(seen)) and set(seen) <= train_rows  # disjoint, never a val row
    assert len(train_rows) - len(seen) < 8  # only the tail that makes no full batch on every rank

    epoch0 = _reader_rows(_dataset(split, "train", 4), 0, 1)
    assert epoch0 == _reader_rows(_dataset(split, "train", 4), 0, 1)  # seeded
    assert epoch0 != _reader_rows(_dataset(split, "train", 4, epoch=1), 0, 1)  # reshuffled per epoch

    val = [r for b in _reader_rows(_dataset(split, "val", 4), 0, 1) for r in b]
    assert sorted(val) == sorted(val_rows)  # every val row, once


def test_a_dataloader_with_workers_yields_every_val_image_decoded(parts_dir) -> None:
    data_dir, _ = parts_dir
    split = _stream.stream_split(tiny_config(), data_dir, Path("unused"), resume=False)
    dataset = _dataset(split, "val", 3)
    batches = list(DataLoader(dataset, batch_size=None, num_workers=2))
    assert len(batches) == len(dataset) == -(-split.rows("val") // 3)
    images = torch.cat([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches])
    assert images.shape == (split.rows("val"), 3, 32, 32) and images.dtype == torch.uint8
    counts = torch.bincount(targets, minlength=3).tolist()
    assert counts == [split.counts["val"].get(n, 0) for n in split.class_names]
    assert dataset.failures.count() == 0


def test_options_that_need_every_row_are_refused_in_one_line(parts_dir, tmp_path: Path) -> None:
    data_dir, _ = parts_dir
    with pytest.raises(ConfigError, match=r"written as parts.*data\.balanced_sampler.*docs/scale\.md"):
        train.run(train.TrainOptions(tiny_config("data.balanced_sampler=true"), data_dir, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_an_unreadable_image_is_counted_and_stood_in_for_within_its_batch(parts_dir, tmp_path: Path) -> None:
    data_dir, frame = parts_dir
    broken = tmp_path / "d"
    shutil.copytree(data_dir, broken)
    split = _stream.stream_split(tiny_config(), broken, Path("unused"), resume=False)
    dataset = _dataset(split, "val", 4)
    first = next(dataset.own_batches(0, 1))
    victim = broken / first["path"].iloc[0]
    victim.write_bytes(victim.read_bytes()[:40])  # a truncated PNG
    images, targets = dataset.decode(first)
    assert images.shape[0] == len(first) == len(targets) and dataset.failures.count() == 1
    index = {n: i for i, n in enumerate(split.class_names)}
    readable = [index[label] for label in first["label"].iloc[1:]]
    assert sorted(targets.tolist()) == sorted(readable + [readable[0]])  # a readable image of the batch, its label
    dataset.failures.reset()
    assert dataset.failures.count() == 0


def test_data_exclude_leaves_its_rows_out_of_the_stream(parts_dir, tmp_path: Path) -> None:
    data_dir, frame = parts_dir
    config = tiny_config(f"data.exclude={tmp_path / 'drop.csv'}")
    whole = _stream.stream_split(tiny_config(), data_dir, Path("unused"), resume=False)
    pool = frame[frame["split"] == "train"]
    side = whole.rule.is_val(pool["sha256"].tolist())
    dropped = pool.loc[~side, "row"].tolist()[:3] + pool.loc[side, "row"].tolist()[:1]
    pd.DataFrame({"row": dropped}).to_csv(tmp_path / "drop.csv", index=False)  # a hand-made row list
    split = _stream.stream_split(config, data_dir, Path("unused"), resume=False)
    assert (split.rows("train"), split.rows("val")) == (whole.rows("train") - 3, whole.rows("val") - 1)
    seen = {r for subset in ("train", "val") for b in _reader_rows(_dataset(split, subset, 1), 0, 1) for r in b}
    assert seen == set(pool["row"]) - set(dropped)

    pd.DataFrame({"row": [10**9]}).to_csv(tmp_path / "drop.csv", index=False)
    with pytest.raises(DataError, match=r"drop\.csv: manifest row 1000000000 does not exist"):
        _stream.stream_split(config, data_dir, Path("unused"), resume=False)


def test_too_few_train_images_for_one_batch_is_one_line(parts_dir, tmp_path: Path) -> None:
    data_dir, _ = parts_dir
    with pytest.raises(DataError, match=r"train images make no full batch of trainer.batch_size=512; lower it"):
        train.run(train.TrainOptions(tiny_config("trainer.batch_size=512"), data_dir, tmp_path / "run"))
    assert not (tmp_path / "run").exists()
