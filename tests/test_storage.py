"""Storage layouts and the one reader: deterministic tar shards, the manifest's shard/offset contract,
`download --layout tar` end to end (and after SIGKILL), reading either layout for training.

Every image here is a real PNG served over HTTP on 127.0.0.1 and stored by the real downloader.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from fault_server import FaultServer
from helpers import CLASSES, DEMO_ROOT, state_urls
from storage_helpers import demo_files, download_demo, write_sources

from imgclf import data, presets, storage
from imgclf._localserver import LocalServer
from imgclf.config import DataConfig
from imgclf.download._writers import TarShardWriter, shard_name
from imgclf.errors import ConfigError, DataError
from imgclf.manifest import COLUMNS, read_manifest, row_refs, write_manifest


def _no_leftovers(data_dir: Path) -> bool:
    """No spool, .part or temporary file left in DATA_DIR/.tmp."""
    return not (data_dir / ".tmp").exists() or not any((data_dir / ".tmp").iterdir())


def _images(n: int) -> list[bytes]:
    return [f.read_bytes() for f in demo_files("train", CLASSES[:2], n // 2 + 1)][:n]


def _write_shard(out: Path, images: list[bytes]) -> dict:
    writer = TarShardWriter(out, shard_name(3))
    for body in images:
        writer.write(hashlib.sha256(body).hexdigest(), "png", body)
    return writer.close()


# ---- the tar writer ------------------------------------------------------------------------------
def test_tar_shard_is_deterministic_whatever_the_write_order(tmp_path: Path) -> None:
    images = _images(12)
    first = _write_shard(tmp_path / "a", images)
    second = _write_shard(tmp_path / "b", [*reversed(images), images[0]])  # another order, a repeat
    shard_a, shard_b = (tmp_path / d / "shards" / "00003.tar" for d in ("a", "b"))
    assert shard_a.read_bytes() == shard_b.read_bytes() and first == second
    with tarfile.open(shard_a) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(first) and len(members) == 12
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.type) for m in members} == {
        (0, 0, 0, "", "", 0o644, tarfile.REGTYPE)}
    for member in members:  # the offsets the manifest will carry are where tarfile finds the data
        assert first[member.name].offset == member.offset_data
        assert first[member.name].shard == "shards/00003.tar"
    assert _no_leftovers(tmp_path / "a")


def test_tar_shard_reads_as_webdataset_samples(tmp_path: Path) -> None:
    """WebDataset (the reference reader of tar shards) sees one sample per image, keyed by its path."""
    import webdataset as wds

    images = _images(6)
    _write_shard(tmp_path, images)
    samples = list(wds.WebDataset(str(tmp_path / "shards" / "00003.tar"), shardshuffle=False))
    by_key = {s["__key__"]: s["png"] for s in samples}
    assert len(samples) == 6
    for body in images:
        sha = hashlib.sha256(body).hexdigest()
        assert by_key[f"images/{sha[:2]}/{sha}"] == body


def test_an_unfinished_shard_is_never_visible(tmp_path: Path) -> None:
    writer = TarShardWriter(tmp_path, shard_name(0))
    body = _images(1)[0]
    writer.write(hashlib.sha256(body).hexdigest(), "png", body)
    assert not (tmp_path / "shards").exists()  # nothing published before close()
    writer.abort()
    assert not (tmp_path / "shards").exists() and _no_leftovers(tmp_path)


# ---- the manifest contract and the reader --------------------------------------------------------
def test_manifest_shard_and_offset_round_trip_and_read_back(tmp_path: Path) -> None:
    images = _images(4)
    located = _write_shard(tmp_path, images)
    rows = []
    for i, body in enumerate(images):
        sha = hashlib.sha256(body).hexdigest()
        loc = located[f"images/{sha[:2]}/{sha}.png"]
        rows.append({"row": i, "url": f"u{i}", "label": "a", "split": "train", "status": "ok", "sha256": sha,
                     "path": loc.path, "bytes": len(body), "shard": loc.shard, "offset": loc.offset})
    write_manifest(pd.DataFrame(rows), tmp_path)
    manifest = read_manifest(tmp_path)
    assert list(manifest.columns) == list(COLUMNS)
    assert manifest["offset"].tolist() == [r["offset"] for r in rows]
    assert [storage.read_row(tmp_path, ref) for ref in row_refs(manifest)] == images


def test_old_manifests_read_with_default_shard_columns(tmp_path: Path) -> None:
    body = _images(1)[0]
    sha = hashlib.sha256(body).hexdigest()
    (tmp_path / "images" / sha[:2]).mkdir(parents=True)
    (tmp_path / "images" / sha[:2] / f"{sha}.png").write_bytes(body)
    old = pd.DataFrame({"row": [0], "url": ["u"], "label": ["a"], "split": ["train"], "status": ["ok"],
                        "path": [f"images/{sha[:2]}/{sha}.png"], "bytes": [len(body)]})
    old.to_parquet(tmp_path / "manifest.parquet", index=False)  # before shard/offset (and duplicate_of)
    manifest = read_manifest(tmp_path)
    assert manifest.loc[0, "shard"] == "" and manifest.loc[0, "offset"] == -1
    assert manifest.loc[0, "duplicate_of"] == -1
    assert storage.read_row(tmp_path, row_refs(manifest)[0]) == body


@pytest.mark.parametrize("name", ["../x.png", "/etc/passwd", "a/../../x.png", "images/../../x", "C:/x.png",
                                  "a\\..\\x.png", "", "a//b.png", "./a.png", "a\x00.png"])
def test_the_reader_refuses_names_that_leave_the_data_directory(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataError):
        storage.read_row(tmp_path, storage.RowRef(name))
    if name:  # an empty shard means "a plain file": checked above
        with pytest.raises(DataError):
            storage.read_row(tmp_path, storage.RowRef("images/a.png", name, 0, 10))


def test_a_cut_shard_is_a_read_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "00000.tar").write_bytes(b"x" * 100)
    with pytest.raises(OSError, match="00000.tar: bytes 90..110 lie outside the file"):
        storage.read_row(tmp_path, storage.RowRef("images/a.png", "shards/00000.tar", 90, 20))


# ---- download --layout tar -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tar_download(tmp_path_factory: pytest.TempPathFactory):
    """30 train + 6 test images, a 404 and a repeated URL, in shards of 8 images; and the same in files."""
    tmp = tmp_path_factory.mktemp("tar")
    train, test = demo_files("train", CLASSES[:3], 10), demo_files("test", CLASSES[:3], 2)
    with LocalServer(DEMO_ROOT) as srv:
        tables = write_sources(tmp / "src", srv, {"train": train, "test": test})
        with open(tables[0], "a") as fh:
            fh.write(f"{srv.url('missing.png')},x\n{srv.url(str(train[0].relative_to(DEMO_ROOT)))},x\n")
        tar = download_demo(tmp / "tar", tables, layout="tar", shard_size=8)
        files = download_demo(tmp / "files", tables)
        rerun = download_demo(tmp / "tar", tables, layout="tar", shard_size=8)
    return tmp, tar, files, rerun, train + test


def test_tar_layout_stores_every_image_in_shards_and_the_manifest_locates_it(tar_download) -> None:
    tmp, tar, _, _, originals = tar_download
    assert tar.counts == {"ok": 36, "http_error": 1, "duplicate": 1}
    manifest = read_manifest(tmp / "tar")
    stored = manifest[manifest["status"].isin(["ok", "duplicate"])]
    assert (stored["shard"].str.match(r"^shards/\d{5}\.tar$")).all() and (stored["offset"] > 0).all()
    assert (manifest.loc[~manifest.index.isin(stored.index), "shard"] == "").all()
    assert sorted(p.name for p in (tmp / "tar" / "shards").iterdir()) == [f"{n:05d}.tar" for n in range(5)]
    assert not (tmp / "tar" / "images").exists() and _no_leftovers(tmp / "tar")
    ok = manifest[manifest["status"] == "ok"]
    assert [storage.read_row(tmp / "tar", ref) for ref in row_refs(ok)] == [f.read_bytes() for f in originals]
    # The same images, the same names, as the files layout stored them.
    files = read_manifest(tmp / "files")
    assert files["path"].tolist() == manifest["path"].tolist() and (files["shard"] == "").all()


def test_each_downloaded_shard_is_the_deterministic_tar_of_its_members(tar_download, tmp_path: Path) -> None:
    tmp = tar_download[0]
    for shard in sorted((tmp / "tar" / "shards").iterdir()):
        with tarfile.open(shard) as t:
            bodies = [t.extractfile(m).read() for m in t.getmembers()]
        rebuilt = TarShardWriter(tmp_path / shard.stem, shard_name(0))
        for body in reversed(bodies):
            rebuilt.write(hashlib.sha256(body).hexdigest(), "png", body)
        rebuilt.close()
        assert (tmp_path / shard.stem / "shards" / "00000.tar").read_bytes() == shard.read_bytes()


def test_a_rerun_fetches_nothing_and_another_layout_is_refused(tar_download) -> None:
    tmp, _, _, rerun, _ = tar_download
    assert rerun.fetched == 0 and rerun.counts["ok"] == 36
    with pytest.raises(ConfigError, match="layout=tar"):
        download_demo(tmp / "tar", sorted((tmp / "src").glob("*.csv")))  # files into a tar DATA_DIR


def test_training_reads_the_tar_layout_exactly_like_files(tar_download) -> None:
    tmp = tar_download[0]
    pre = presets.Preprocessing.from_config(DataConfig(image_size=32))
    split = data.make_split(tmp / "tar", 0.2, seed=0)  # row, path, label, subset: shards found by row
    assert split.equals(data.make_split(tmp / "files", 0.2, seed=0))
    tensors = {}
    for layout in ("tar", "files"):
        dataset = data.DecodedImages(split, tmp / layout, CLASSES[:3], pre.resize_size, presets.eval_resize(pre))
        tensors[layout] = [dataset[i][0] for i in range(len(dataset))]
    assert all(torch.equal(a, b) for a, b in zip(tensors["tar"], tensors["files"], strict=True))


class _Recording(data.ImageFolderFrame):
    """Reads row i's image like training does, and returns (i, the loader worker that read it)."""

    def __getitem__(self, i: int) -> torch.Tensor:
        data.read_image(self.data_dir, self.refs[i])
        info = torch.utils.data.get_worker_info()
        return torch.tensor([i, info.id if info else -1])


def test_ddp_ranks_and_loader_workers_read_disjoint_rows_with_equal_batch_counts(tar_download) -> None:
    """What Lightning does for a map-style dataset under DDP: a DistributedSampler per rank."""
    from torch.utils.data import DataLoader, DistributedSampler

    tmp = tar_download[0]
    split = data.make_split(tmp / "tar", 0.2, seed=0)
    dataset = _Recording(split, tmp / "tar", CLASSES[:3], transform=lambda x: x)
    seen, batches = [], []
    for rank in (0, 1):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        loader = DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=2, drop_last=True)
        got = [batch for batch in loader]
        batches.append(len(got))
        seen.append([(int(i), int(w)) for batch in got for i, w in batch])
    assert batches[0] == batches[1] == len(dataset) // 2 // 4
    rows = [{i for i, _ in s} for s in seen]
    assert not rows[0] & rows[1]  # disjoint across ranks
    for ranks_rows in seen:  # within a rank, each index read once, by one of the two workers
        assert len({i for i, _ in ranks_rows}) == len(ranks_rows) and {w for _, w in ranks_rows} == {0, 1}


OK = "status = 'ok'"  # rows committed with their image (a shard's rows only once it is written)


def _tar_download(srv: FaultServer, files: list[Path], tmp_path: Path, shard_size: int) -> tuple[list[str], list[str]]:
    """Serve `files`, list them in tmp_path/train.csv; the URLs and the download command (tar layout)."""
    urls = [srv.add(f"{i}.png", f.read_bytes(), "image/png") for i, f in enumerate(files)]
    pd.DataFrame({"url": urls, "label": ["x"] * len(urls)}).to_csv(tmp_path / "train.csv", index=False)
    return urls, [sys.executable, "-m", "imgclf", "download", str(tmp_path / "train.csv"), "--out",
                  str(tmp_path / "d"), "--no-progress", "--concurrency", "4", "--processes", "1",
                  "--layout", "tar", "--shard-size", str(shard_size)]


# ---- kill and resume ---------------------------------------------------------------------------------
def test_sigkill_mid_shard_then_resume_refetches_only_the_open_shard(tmp_path: Path) -> None:
    files = demo_files("train", CLASSES[:4], 10)
    with FaultServer(latency=0.1) as srv:
        urls, cmd = _tar_download(srv, files, tmp_path, shard_size=5)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        state = tmp_path / "d" / ".state.sqlite"
        deadline = time.monotonic() + 60
        while len(state_urls(state, OK)) < 10 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        before = state_urls(state, OK)
        assert 10 <= len(before) < len(urls), "kill did not land mid-run"
        assert len(before) % 5 == 0  # whole shards only: the shard is the commit point
        counts_at_kill = dict(srv.counts)
        rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
    manifest = read_manifest(tmp_path / "d")
    assert manifest["status"].tolist() == ["ok"] * len(urls)
    for url in before:  # a committed row is never fetched again
        path = "/" + url.split("/", 3)[3]
        assert srv.counts[path] == counts_at_kill[path] == 1
    assert max(srv.counts.values()) <= 2
    shards = {p.relative_to(tmp_path / "d").as_posix() for p in (tmp_path / "d" / "shards").iterdir()}
    assert shards == set(manifest["shard"])  # no orphan shard, none missing
    assert _no_leftovers(tmp_path / "d")
    for ref, f in zip(row_refs(manifest), files, strict=True):
        assert storage.read_row(tmp_path / "d", ref) == f.read_bytes()



def test_data_directory_arguments_keep_urls_and_state_dir_is_for_urls_only(tmp_path: Path) -> None:
    from imgclf.download._sink import Target

    assert storage.location("s3://bucket/data") == "s3://bucket/data"  # Path() would make it "s3:/bucket/data"
    assert storage.location("file:///tmp/x") == Path("/tmp/x") and storage.location("data") == Path("data")
    with pytest.raises(ConfigError, match="--state-dir"):
        Target.resolve(tmp_path / "d", state_dir=tmp_path / "s")
    assert Target.resolve(tmp_path / "d").work_dir == tmp_path / "d"



def test_ctrl_c_publishes_the_open_shard_and_commits_its_rows(tmp_path: Path) -> None:
    files = demo_files("train", CLASSES[:4], 10)
    with FaultServer(latency=0.1) as srv:
        urls, cmd = _tar_download(srv, files, tmp_path, shard_size=1000)  # one shard, open all along
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        state = tmp_path / "d" / ".state.sqlite"
        deadline = time.monotonic() + 300
        while sum(srv.counts.values()) < 12 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        held = state_urls(state, OK)  # fetched and stored, but the shard is not written yet
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert held == set(), "rows were committed before their shard existed"
    manifest = read_manifest(tmp_path / "d")
    ok = manifest[manifest["status"] == "ok"]
    assert len(ok) >= 4 and len(ok) == len(state_urls(state, OK))  # Ctrl-C wrote the open shard and committed it
    assert set(ok["shard"]) == {"shards/00000.tar"} and (tmp_path / "d" / "shards" / "00000.tar").is_file()
    assert set(manifest["status"]) == {"ok", "pending"}
