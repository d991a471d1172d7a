"""sources.iter_sources: CSV/TSV/Parquet in chunks, splits from column or file stem, row numbers."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from imgclf.errors import DataError
from imgclf.sources import iter_sources, read_sources


def test_rows_are_numbered_across_files_and_chunks(tmp_path: Path) -> None:
    pd.DataFrame({"url": [f"http://h/{i}" for i in range(5)], "label": "a"}).to_csv(tmp_path / "train.csv",
                                                                                    index=False)
    test = pd.DataFrame({"url": ["http://h/t"], "label": [" b "]})
    test.to_csv(tmp_path / "Test.tsv", sep="\t", index=False)
    chunks = list(iter_sources([tmp_path / "train.csv", tmp_path / "Test.tsv"], chunk_rows=2))
    assert [len(c) for c in chunks] == [2, 2, 1, 1]
    frame = pd.concat(chunks, ignore_index=True)
    assert frame["row"].tolist() == list(range(6))
    assert frame["split"].tolist() == ["train"] * 5 + ["test"]
    assert frame["label"].iloc[-1] == "b"


def test_split_column_wins_and_aliases(tmp_path: Path) -> None:
    pd.DataFrame({"url": ["u1", "u2", "u3"], "label": "x", "split": ["Validation", "", "test"]}).to_parquet(
        tmp_path / "all.parquet")
    frame = read_sources([tmp_path / "all.parquet"])
    assert frame["split"].tolist() == ["val", "train", "test"]


def test_bad_sources_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        read_sources([tmp_path / "nope.csv"])
    (tmp_path / "a.json").write_text("{}")
    with pytest.raises(DataError, match="unsupported"):
        read_sources([tmp_path / "a.json"])
    (tmp_path / "b.csv").write_text("link,label\nx,y\n")
    with pytest.raises(DataError, match="missing column"):
        read_sources([tmp_path / "b.csv"])


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_csv_is_a_one_line_error_naming_the_file(tmp_path: Path, content: str) -> None:
    (tmp_path / "empty.csv").write_text(content)
    with pytest.raises(DataError, match=r"empty\.csv: empty file, no header row") as err:
        read_sources([tmp_path / "empty.csv"])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("content", [b"", b"not a parquet file at all", b"PAR1" + b"\0" * 64 + b"PAR1"])
def test_corrupt_parquet_is_a_one_line_error_naming_the_file(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "bad.parquet").write_bytes(content)
    with pytest.raises(DataError, match=r"bad\.parquet: cannot parse") as err:
        read_sources([tmp_path / "bad.parquet"])
    assert "\n" not in str(err.value)


def test_column_names_are_normalised_in_csv_and_parquet(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text(" URL ,Label,SPLIT\nhttp://x/1.png,cat,test\n")
    pd.DataFrame({" URL ": ["http://x/2.png"], "Label": ["dog"], "Split": ["val"]}).to_parquet(
        tmp_path / "b.parquet")
    frame = read_sources([tmp_path / "a.csv", tmp_path / "b.parquet"])
    assert frame["url"].tolist() == ["http://x/1.png", "http://x/2.png"]
    assert frame["label"].tolist() == ["cat", "dog"]
    assert frame["split"].tolist() == ["test", "val"]


@pytest.mark.parametrize(("name", "kind", "stem", "split"), [
    ("test.tar.gz", "archive", "test", "test"), ("Val.ZIP", "archive", "Val", "val"),
    ("x.tgz", "archive", "x", "train"), ("train.tar.zst", "archive", "train", "train"),
    ("a.tar", "archive", "a", "train"),
    ("test.csv", "table", "test", "test"), ("dev.parquet", "table", "dev", "val")])
def test_source_kinds_and_their_split(tmp_path: Path, name: str, kind: str, stem: str, split: str) -> None:
    from imgclf.sources import source_kind, source_stem, split_from_stem

    (tmp_path / name).write_bytes(b"x")
    assert (source_kind(tmp_path / name), source_stem(tmp_path / name), split_from_stem(tmp_path / name)) == \
        (kind, stem, split)


def test_folders_are_sources_and_other_files_are_not(tmp_path: Path) -> None:
    from imgclf.sources import source_kind

    (tmp_path / "testing").mkdir()
    assert source_kind(tmp_path / "testing") == "folder"
    (tmp_path / "photo.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match=r"photo\.jpg: unsupported source type \(use a folder"):
        source_kind(tmp_path / "photo.jpg")
    with pytest.raises(DataError, match="source not found"):
        source_kind(tmp_path / "nope")


def test_columns_are_mapped_and_a_missing_one_names_those_there_are(tmp_path: Path) -> None:
    from imgclf.sources import Columns

    (tmp_path / "t.csv").write_text("Image URL,Category,Fold,File\nhttp://x/1.png,cat,test,a.png\n")
    frame = read_sources_with(tmp_path / "t.csv", Columns(url="image url", label="CATEGORY", split="fold",
                                                          path="file"))
    assert frame[["url", "label", "split", "path"]].values.tolist() == [["http://x/1.png", "cat", "test", "a.png"]]
    with pytest.raises(DataError, match=r"no column 'caption' \(--label-col\); columns: image url, category, fold"):
        read_sources_with(tmp_path / "t.csv", Columns(label="caption"))


def read_sources_with(path: Path, columns) -> pd.DataFrame:  # noqa: ANN001 - a sources.Columns
    return pd.concat(list(iter_sources([path], columns=columns)), ignore_index=True)
