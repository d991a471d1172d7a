"""A manifest written as parts with an index (issue 25 item 2; imgclf.manifest, download/_report.py):
a real download against the 127.0.0.1 test server with PART_ROWS lowered, so a 40-row manifest is
written as parts of 7 rows; read back whole, scanned by split and columns, walked as a shuffled
epoch, replaced by the next write, and refused in one line when its index or a part is broken."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
from fault_server import FaultServer
from PIL import Image

from imgclf import manifest
from imgclf.errors import DataError
from imgclf.stages import download

FAST = dict(timeout=3.0, retries=1, backoff=0.05, processes=1, show_progress=False, print_summary=False)


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), (i % 256, 30, 200)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("src")
    with FaultServer() as srv:
        urls = [srv.add(f"{i}.png", _png(i), "image/png") for i in range(36)] + [srv.url("status/404")] * 2
        urls += [srv.url("file/3.png"), "ftp://not/fetched.png"]
        splits = ["test" if i % 4 == 0 else "train" for i in range(len(urls))]
        pd.DataFrame({"url": urls, "label": [f"c{i % 3}" for i in range(len(urls))], "split": splits}).to_csv(
            tmp / "urls.csv", index=False)
        one = download.run(download.DownloadOptions(sources=[tmp / "urls.csv"], out=tmp / "one", **FAST))
        yield tmp / "urls.csv", pd.read_parquet(one.manifest_path), srv


def _parts_run(src: Path, out: Path, monkeypatch: pytest.MonkeyPatch, rows: int = 7):
    monkeypatch.setattr(manifest, "PART_ROWS", rows)
    return download.run(download.DownloadOptions(sources=[src], out=out, **FAST))


def test_a_large_manifest_is_parts_with_an_index_and_reads_as_one(source, tmp_path: Path, monkeypatch) -> None:
    src, single, _ = source
    result = _parts_run(src, tmp_path / "d", monkeypatch)
    index = json.loads((tmp_path / "d" / "manifest" / "_index.json").read_text())
    assert [p["rows"] for p in index["parts"]] == [7, 7, 7, 7, 7, 5] and index["total_rows"] == 40
    assert not (tmp_path / "d" / "manifest.parquet").exists()
    assert result.manifest_path == tmp_path / "d" / "manifest"
    pd.testing.assert_frame_equal(manifest.read_manifest(tmp_path / "d"), manifest.normalize(single))
    assert result.counts == {"ok": 36, "http_error": 2, "duplicate": 1, "invalid_url": 1}


def test_scan_reads_one_split_and_the_columns_asked(source, tmp_path: Path, monkeypatch) -> None:
    src, single, _ = source
    _parts_run(src, tmp_path / "d", monkeypatch)
    got = manifest.scan(tmp_path / "d", columns=["row", "path", "label"], split="test", status="ok")
    want = single[(single["split"] == "test") & (single["status"] == "ok")][["row", "path", "label"]]
    assert list(got.columns) == ["row", "path", "label"] and len(got) == 9
    pd.testing.assert_frame_equal(got.reset_index(drop=True), manifest.normalize(single)[
        ["row", "path", "label"]].loc[want.index].reset_index(drop=True))
    # the single-file manifest answers the same way
    pd.testing.assert_frame_equal(manifest.scan(src.parent / "one", columns=["row", "path", "label"], split="test",
                                                status="ok"), got)


def test_an_epoch_visits_each_usable_row_once_in_a_seeded_order(source, tmp_path: Path, monkeypatch) -> None:
    src, single, _ = source
    _parts_run(src, tmp_path / "d", monkeypatch)

    def epoch(seed: int) -> list[int]:
        return [r for batch in manifest.epoch_batches(tmp_path / "d", "train", seed, ["row", "path"], batch_rows=5,
                                                      groups_in_memory=2) for r in batch["row"].tolist()]

    want = single[(single["split"] == "train") & (single["status"] == "ok")]["row"].tolist()
    first = epoch(1)
    assert sorted(first) == sorted(want) and len(first) == len(want) == 27
    assert epoch(1) == first and epoch(2) != first and first != sorted(first)


def test_the_next_write_replaces_the_parts(source, tmp_path: Path, monkeypatch) -> None:
    src, single, _ = source
    _parts_run(src, tmp_path / "d", monkeypatch)
    _parts_run(src, tmp_path / "d", monkeypatch, rows=10)  # a resumed run: a new write of parts
    folders = [p for p in (tmp_path / "d" / "manifest").iterdir() if p.is_dir()]
    assert len(folders) == 1 and len(list(folders[0].glob("*.parquet"))) == 4  # the old write is gone
    _parts_run(src, tmp_path / "d", monkeypatch, rows=1000)  # small again: one file
    assert (tmp_path / "d" / "manifest.parquet").is_file() and not (tmp_path / "d" / "manifest").exists()
    pd.testing.assert_frame_equal(manifest.read_manifest(tmp_path / "d"), manifest.normalize(single))


def test_a_broken_index_or_a_missing_part_is_one_line(source, tmp_path: Path, monkeypatch) -> None:
    src, _, _ = source
    _parts_run(src, tmp_path / "d", monkeypatch)
    index = tmp_path / "d" / "manifest" / "_index.json"
    listed = json.loads(index.read_text())
    part = index.parent / listed["parts"][2]["path"]
    part.unlink()
    with pytest.raises(DataError, match=r"_index.json: names a part that is missing: .*part-00002.parquet"):
        manifest.read_manifest(tmp_path / "d")
    index.write_text("{not json")
    with pytest.raises(DataError, match=r"_index.json: unreadable manifest index \(JSONDecodeError\)"):
        manifest.scan(tmp_path / "d", columns=["row"])


def test_merge_of_shard_jobs_writes_parts_at_that_size(source, tmp_path: Path, monkeypatch) -> None:
    src, single, _ = source
    monkeypatch.setattr(manifest, "PART_ROWS", 7)
    for i in range(2):
        download.run(download.DownloadOptions(sources=[src], out=tmp_path / f"job{i}", **FAST, job_shard=f"{i}/2",
                                                                          job_shard_by="url"))
    merged = download.merge([tmp_path / "job0", tmp_path / "job1"], tmp_path / "m",
                            download.DownloadOptions(print_summary=False))
    assert merged.manifest_path == tmp_path / "m" / "manifest" and not (tmp_path / "m" / "manifest.parquet").exists()
    pd.testing.assert_frame_equal(manifest.read_manifest(tmp_path / "m"), manifest.normalize(single))
