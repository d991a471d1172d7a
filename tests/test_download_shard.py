"""`--shard i/n --shard-by url` jobs and `--merge` (download/_shards.py, download/_merge.py): two
real `python -m imgclf download` processes against the real test server, merged, compared with one
single-machine download of the same list. The URL partition spreads one host's rows over both jobs,
which this one-server corpus needs; the default host partition is tested in test_scale_shards.py."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from fault_server import FaultServer, sample_images
from PIL import Image

from imgclf import storage
from imgclf.download._shards import JobShard, url_bucket
from imgclf.errors import ConfigError, DataError
from imgclf.stages import download

QUICK = ["--no-progress", "--processes", "1", "--timeout", "2", "--retries", "0"]
COMPARED = ["row", "url", "label", "split", "status", "error", "http_status", "sha256", "path", "width", "height",
            "bytes", "duplicate_of"]


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), (i, 255 - i, 40)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server():
    with FaultServer() as srv:
        for i in range(40):
            srv.add(f"{i}.png", _png(i), "image/png")
        srv.add("copy-of-3.png", _png(3), "image/png")  # same content, other URL: a duplicate across jobs?
        srv.add("page.html", sample_images()["page.html"], "text/html")
        yield srv


@pytest.fixture(scope="module")
def source(server: FaultServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    urls = [server.url(f"file/{i}.png") for i in range(40)]
    urls += [server.url("file/copy-of-3.png"), server.url("status/404"), server.url("file/page.html"),
             urls[7], "ftp://127.0.0.1/x.png"]
    labels = [f"c{i % 3}" for i in range(len(urls))]
    labels[5] = ""  # missing_label
    path = tmp_path_factory.mktemp("src") / "train.csv"
    pd.DataFrame({"url": urls, "label": labels}).to_csv(path, index=False)
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imgclf", "download", *args], capture_output=True, text=True,
                          timeout=180)


@pytest.fixture(scope="module")
def jobs(server: FaultServer, source: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Two jobs run at the same time as two processes, then merged by a third."""
    tmp = tmp_path_factory.mktemp("jobs")
    procs = [subprocess.Popen([sys.executable, "-m", "imgclf", "download", str(source), "--out", str(tmp / f"part{i}"),
                               "--shard", f"{i}/2", "--shard-by", "url", *QUICK],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-2000:]
    counts = dict(server.counts)
    merged = _cli("--merge", str(tmp / "part0"), str(tmp / "part1"), "--out", str(tmp / "merged"), "--no-progress")
    assert merged.returncode == 0, merged.stderr[-2000:]
    return tmp, counts


def test_each_job_holds_only_its_rows_under_their_input_numbers(jobs, source: Path) -> None:
    tmp, _ = jobs
    urls = pd.read_csv(source, keep_default_na=False)["url"].tolist()
    parts = [pd.read_parquet(tmp / f"part{i}" / "manifest.parquet") for i in range(2)]
    for i, part in enumerate(parts):
        assert len(part) > 5 and all(url_bucket(u, 2) == i for u in part["url"])
        assert all(urls[r] == u for r, u in zip(part["row"], part["url"], strict=True))
    assert sorted(pd.concat(parts)["row"]) == list(range(len(urls)))


def test_merged_manifest_equals_one_single_machine_download(jobs, server: FaultServer, source: Path,
                                                            tmp_path: Path) -> None:
    tmp, counts = jobs
    merged = pd.read_parquet(tmp / "merged" / "manifest.parquet")
    assert all(n == 1 for path, n in counts.items() if path.startswith("/file/")), counts  # each URL once
    single = download.run(download.DownloadOptions(sources=[source], out=tmp_path / "one", processes=1, timeout=2,
                                                   retries=0, show_progress=False, print_summary=False))
    expected = pd.read_parquet(single.manifest_path)
    pd.testing.assert_frame_equal(merged[COMPARED], expected[COMPARED])
    assert set(merged["status"]) >= {"ok", "duplicate", "http_error", "not_image", "invalid_url", "missing_label"}
    for rel in merged.loc[merged["status"] == "ok", "path"]:
        assert (tmp / "merged" / rel).is_file()


def test_the_merged_directory_resumes_like_any_other(jobs, server: FaultServer, source: Path) -> None:
    tmp, _ = jobs
    before = dict(server.counts)
    again = _cli(str(source), "--out", str(tmp / "merged"), *QUICK)
    assert again.returncode == 0, again.stderr[-2000:]
    assert dict(server.counts) == before  # nothing fetched again


def test_merge_refuses_a_missing_or_repeated_job(jobs, tmp_path: Path) -> None:
    tmp, _ = jobs
    with pytest.raises(DataError, match="1/2 missing"):
        download.merge([tmp / "part0"], tmp_path / "m1")
    with pytest.raises(DataError, match="given twice"):
        download.merge([tmp / "part0", tmp / "part0", tmp / "part1"], tmp_path / "m2")
    with pytest.raises(DataError, match="not a data directory"):
        download.merge([tmp_path], tmp_path / "m3")
    with pytest.raises(DataError, match="new folder"):
        download.merge([tmp / "part0", tmp / "part1"], tmp / "part0")


def test_merge_refuses_jobs_with_other_options(server: FaultServer, source: Path, tmp_path: Path) -> None:
    fast = dict(processes=1, timeout=2, retries=0, show_progress=False, print_summary=False, job_shard_by="url")
    download.run(download.DownloadOptions(sources=[source], out=tmp_path / "a", **fast, job_shard="0/2"))
    download.run(download.DownloadOptions(sources=[source], out=tmp_path / "b", **fast, job_shard="1/2", size=64))
    with pytest.raises(DataError, match="different options"):
        download.merge([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    with pytest.raises(ConfigError, match="shard=0/2"):  # a job's folder belongs to that job
        download.run(download.DownloadOptions(sources=[source], out=tmp_path / "a", **fast, job_shard="1/2"))


def test_tar_shards_are_renumbered_and_still_read(server: FaultServer, source: Path, tmp_path: Path) -> None:
    fast = dict(processes=1, timeout=2, retries=0, show_progress=False, print_summary=False, layout="tar",
                job_shard_by="url")
    for i in range(2):
        download.run(download.DownloadOptions(sources=[source], out=tmp_path / f"p{i}", **fast, job_shard=f"{i}/2"))
    result = download.merge([tmp_path / "p0", tmp_path / "p1"], tmp_path / "m")
    manifest = pd.read_parquet(result.manifest_path)
    ok = manifest[manifest["status"] == "ok"]
    assert sorted(set(ok["shard"])) == ["shards/00000.tar", "shards/00001.tar"]  # both jobs wrote 00000.tar
    for _, row in ok.iterrows():
        data = storage.read_row(str(tmp_path / "m"), storage.RowRef(row["path"], row["shard"], row["offset"],
                                                                     row["bytes"]))
        with Image.open(io.BytesIO(data)) as img:
            assert img.size == (row["width"], row["height"])


@pytest.mark.parametrize("bad", ["2/2", "a/b", "1", "-1/3", "0/0"])
def test_bad_shard_specs_are_one_line_errors(bad: str) -> None:
    with pytest.raises(ConfigError, match="--shard"):
        JobShard.parse(bad)


def test_url_buckets_are_stable() -> None:
    # Fixed values (blake2b, not hash()): a job's rows must not depend on the machine or the Python run.
    assert [url_bucket(f"https://example.com/{i}.jpg", 4) for i in range(8)] == [3, 1, 1, 2, 3, 3, 2, 3]
    assert url_bucket("https://example.com/a.jpg", 1) == 0
