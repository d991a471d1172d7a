"""`--shard i/n` partitions by host (download/_shards.py): every row of one host goes to one job,
so n jobs together give a host exactly one download's politeness. Real jobs against two real
servers on 127.0.0.1 (two ports: two hosts, as the politeness key counts them)."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest
from fault_server import FaultServer
from PIL import Image

from imgclf.download._politeness import host_key
from imgclf.download._shards import JobShard, job_bucket
from imgclf.errors import ConfigError, DataError
from imgclf.stages import download

FAST = dict(processes=1, timeout=2, retries=0, show_progress=False, print_summary=False)


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (10, 10), (i, 3 * i % 256, 90)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    """Host A holds 30 rows, host B 10: a job holding host A holds 75% of the list."""
    with FaultServer() as a, FaultServer() as b:
        urls = [a.add(f"a{i}.png", _png(i), "image/png") for i in range(30)]
        urls += [b.add(f"b{i}.png", _png(100 + i), "image/png") for i in range(10)]
        path = tmp_path_factory.mktemp("src") / "urls.csv"
        pd.DataFrame({"url": urls, "label": [f"c{i % 2}" for i in range(len(urls))]}).to_csv(path, index=False)
        yield path, a, b


def test_each_host_lands_in_one_job_and_every_row_in_exactly_one(corpus, tmp_path: Path) -> None:
    path, a, b = corpus
    results = [download.run(download.DownloadOptions(sources=[path], out=tmp_path / f"job{i}", **FAST,
                                                     job_shard=f"{i}/4"))
               for i in range(4)]
    parts = [pd.read_parquet(r.manifest_path) for r in results]
    owners = {}
    for i, part in enumerate(parts):
        for key in {host_key(u) for u in part["url"]}:
            assert key not in owners, f"host {key} in jobs {owners.get(key)} and {i}"
            owners[key] = i
    assert set(owners) == {host_key(a.base_url), host_key(b.base_url)}
    rows = pd.concat(parts)
    assert sorted(rows["row"]) == list(range(40)) and set(rows["status"]) == {"ok"}
    assert all(n == 1 for n in list(a.counts.values()) + list(b.counts.values()))  # nothing fetched twice
    # The job holding host A holds 75% of the rows (a fair share is 25%): its report says so.
    crowded = results[owners[host_key(a.base_url)]].report
    assert "holds 30 of 40 rows" in crowded["job_note"] or "holds 40 of 40 rows" in crowded["job_note"]
    assert sum("job_note" in r.report for r in results) == 1
    merged = download.merge([tmp_path / f"job{i}" for i in range(4)], tmp_path / "merged")
    assert merged.counts == {"ok": 40}


def test_a_resumed_job_refuses_the_other_partition(corpus, tmp_path: Path) -> None:
    path, _, _ = corpus
    download.run(download.DownloadOptions(sources=[path], out=tmp_path / "j", **FAST, job_shard="0/2",
                                          job_shard_by="url"))
    with pytest.raises(ConfigError, match="shard=0/2; now .* by=host shard=0/2"):
        download.run(download.DownloadOptions(sources=[path], out=tmp_path / "j", **FAST, job_shard="0/2"))
    download.run(download.DownloadOptions(sources=[path], out=tmp_path / "k", **FAST, job_shard="1/2"))
    with pytest.raises(DataError, match="different options"):  # the two partitions do not merge
        download.merge([tmp_path / "j", tmp_path / "k"], tmp_path / "m")


def test_host_buckets_are_stable_and_follow_the_politeness_key() -> None:
    # Fixed values: every job, every machine and a resumed run must agree on a host's job.
    assert [job_bucket(f"https://img{i}.example.com/x.jpg", 4) for i in range(8)] == [2, 0, 1, 3, 0, 1, 2, 2]
    same = ["https://Example.COM/a.jpg", "https://example.com:443/b.png?x=1", "https://example.com/c/d.jpg"]
    assert len({job_bucket(u, 16) for u in same}) == 1  # case and default port do not move a host
    assert job_bucket("http://example.com/a.jpg", 1 << 20) != job_bucket("https://example.com/a.jpg", 1 << 20)
    by_url = JobShard.parse("0/4", "url")
    assert {by_url.owns(f"https://example.com/{i}.jpg") for i in range(20)} == {True, False}  # one host, split
    with pytest.raises(ConfigError, match="--shard-by"):
        download.DownloadOptions(job_shard="0/2", job_shard_by="domain")


def test_a_job_whose_hosts_all_hashed_elsewhere_exits_0_with_one_line(corpus, tmp_path: Path) -> None:
    import subprocess
    import sys

    path, a, b = corpus
    empty = next(k for k in range(4) if k not in {job_bucket(a.base_url + "/", 4), job_bucket(b.base_url + "/", 4)})
    done = subprocess.run([sys.executable, "-m", "imgclf", "download", str(path), "--out", str(tmp_path / "e"),
                           "--shard", f"{empty}/4", "--no-progress", "--processes", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1000:]
    assert f"--shard {empty}/4 holds no rows" in done.stderr
