"""Multi-label input: label cells with a separator, a Parquet list column, the same image in several
class folders (merged by content), images without labels, and the iteratively stratified split.
Real encoded images (the bundled Fashion-MNIST sample) through the real downloader."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import demo_images

from imgclf import data, multilabel
from imgclf.errors import DataError
from imgclf.manifest import read_manifest
from imgclf.stages import download

QUIET = dict(show_progress=False, print_summary=False, processes=1)


def _download(sources: list[Path], out: Path, **kw) -> pd.DataFrame:
    download.run(download.DownloadOptions(sources=sources, out=out, **{**QUIET, **kw}))
    return read_manifest(out)


def test_same_image_in_several_class_folders_becomes_one_image_with_both_labels(tmp_path):
    bag, shoe, other = demo_images("train", "Bag", 3)
    tree = tmp_path / "tree" / "train"
    for folder, files in {"red": [bag, shoe], "dress": [bag], "outdoor": [bag, other]}.items():
        (tree / folder).mkdir(parents=True)
        for f in files:
            shutil.copyfile(f, tree / folder / f.name)
    manifest = _download([tmp_path / "tree"], tmp_path / "data")
    assert (manifest["status"] == "duplicate").sum() == 2  # the downloader's view: the bag twice again

    split = data.make_split(tmp_path / "data", 0.34, seed=0, label_sep="|")
    assert len(split) == 3  # one row per image, not per folder
    by_path = dict(zip(split["path"], split["label"], strict=True))
    bag_path = manifest.loc[manifest["url"].str.endswith(f"dress/{bag.name}"), "path"].item()
    assert by_path[bag_path] == "dress|outdoor|red"
    assert sorted(by_path.values()) == ["dress|outdoor|red", "outdoor", "red"]
    assert data.class_names_of(split, "|") == ["dress", "outdoor", "red"]
    # single-label reading of the same data is unchanged: the first copy with its own folder's label
    single = data.make_split(tmp_path / "data", 0.34, seed=0)
    assert len(single) == 3 and set(single["label"]) <= {"red", "dress", "outdoor"}


def _table(tmp_path: Path, cells: list[str]) -> Path:
    files = demo_images("train", "Sneaker", len(cells))
    table = tmp_path / "list.csv"
    pd.DataFrame({"path": [str(f) for f in files], "label": cells}).to_csv(table, index=False)
    return table


def test_label_cells_with_a_separator_and_an_image_without_labels(tmp_path, caplog):
    table = _table(tmp_path, ["dress;red", "red", "", "dress"])
    # Without --label-sep an empty cell is a row without a label, as it always was.
    plain = _download([table], tmp_path / "plain")
    assert plain["status"].tolist().count("missing_label") == 1
    # With it, the image is fetched and kept: an image with no label.
    manifest = _download([table], tmp_path / "data", label_sep=";")
    assert (manifest["status"] == "ok").all() and manifest["label"].tolist() == ["dress;red", "red", "", "dress"]
    report = (tmp_path / "data" / "download_report.json").read_text()
    assert '"label_sep": ";"' in report
    with caplog.at_level("INFO", logger="imgclf.data"):
        split = data.make_split(tmp_path / "data", 0.25, seed=1, label_sep=";")
    assert "1 of 4 images have no label" in caplog.text
    assert sorted(split["label"]) == ["", "dress", "dress;red", "red"]
    sets = [multilabel.parse_labels(c, ";") for c in split["label"]]
    assert multilabel.encode(sets, ["dress", "red"]).sum() == 4


def test_parquet_list_column_is_stored_joined(tmp_path):
    files = demo_images("train", "Trouser", 3)
    table = tmp_path / "tags.parquet"
    pd.DataFrame({"path": [str(f) for f in files],
                  "labels": [["red", "dress"], [], ["outdoor"]]}).to_parquet(table)
    manifest = _download([table], tmp_path / "data", label_sep="|")
    assert manifest["label"].tolist() == ["red|dress", "", "outdoor"]
    assert (manifest["status"] == "ok").all()

    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"path": [str(f) for f in files], "labels": [["a"], ["b|c"], ["d"]]}).to_parquet(bad)
    with pytest.raises(DataError, match=r"bad.parquet: data row 2: label 'b\|c' contains the label separator"):
        _download([bad], tmp_path / "bad")


def test_iterative_stratification_keeps_each_labels_share_in_validation():
    rng = np.random.default_rng(0)
    labels = ["a", "b", "c", "rare"]
    sets = []
    for _ in range(400):
        chosen = [name for name, p in zip(labels, (0.5, 0.3, 0.2, 0.03), strict=True) if rng.random() < p]
        sets.append(tuple(chosen))
    is_val = multilabel.stratified_split(sets, 0.2, seed=3)
    assert abs(int(is_val.sum()) - 80) <= 4  # the algorithm fills labels first: sizes are approximate
    targets = multilabel.encode(sets, labels)
    share_val = targets[is_val].mean(0)
    share_all = targets.mean(0)
    assert np.abs(share_val - share_all).max() < 0.03  # within a few images of the same share
    assert targets[is_val, 3].sum() >= 1  # the rare label is validated too
    assert (multilabel.stratified_split(sets, 0.2, seed=3) == is_val).all()  # seeded
    assert not (multilabel.stratified_split(sets, 0.2, seed=4) == is_val).all()


def test_no_label_anywhere_is_one_clear_error():
    frame = pd.DataFrame({"label": ["", ""], "subset": ["train", "val"]})
    with pytest.raises(DataError, match="no image carries a label"):
        data.class_names_of(frame, "|")


def test_json_lines_with_a_labels_list(tmp_path):
    files = demo_images("train", "Bag", 3)
    table = tmp_path / "tags.jsonl"
    lines = [f'{{"path": "{files[0]}", "labels": ["red", "dress"]}}',
             f'{{"path": "{files[1]}", "labels": []}}',
             f'{{"path": "{files[2]}", "labels": ["outdoor"], "split": "test"}}']
    table.write_text("\n".join(lines) + "\n")
    manifest = _download([table], tmp_path / "data", label_sep="|")
    assert manifest["label"].tolist() == ["red|dress", "", "outdoor"]
    assert manifest["split"].tolist() == ["train", "train", "test"] and (manifest["status"] == "ok").all()

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"path": "a.png", "labels": ["x"]}\n{"path": \n')
    with pytest.raises(DataError, match="broken.jsonl: cannot parse as JSON Lines"):
        _download([broken], tmp_path / "broken")
