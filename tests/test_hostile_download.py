"""Hostile input for `imgclf download`, round 2 (issue 22): metadata byte budgets (class 1), images
fetched twice (class 11), local sources that leave their folder (class 8), storage URLs (class 6)
and Ctrl-C on the Ray engine (class 5). Real files, a real HTTP server on 127.0.0.1, real signals;
the costly cases run `imgclf download` as a child under RLIMIT_AS and read its peak RSS (VmHWM).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import sqlite3
import time
from pathlib import Path

import hostile
import pandas as pd
import pytest
from fault_server import FaultServer
from PIL import Image

from imgclf.download import STATE_NAME
from imgclf.errors import DataError
from imgclf.stages import download

MEMORY_MIB = 2048  # address space of the child: the bombs below cost gigabytes without the budget
PEAK_MIB = 450  # peak RSS allowed (a clean run of a tiny CSV peaks near 200 MiB)


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 20), (i % 256, (i // 256) * 40 % 256, 77)).save(buf, "PNG")
    return buf.getvalue()


def _state_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.glob(STATE_NAME + "*"))


def _quiet(**kw) -> download.DownloadOptions:
    return download.DownloadOptions(show_progress=False, print_summary=False, **kw)


# ---------------------------------------------------------------- class 1: metadata byte budget
@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bombs")
    return {"parquet": hostile.long_url_parquet(root / "urls.parquet"),
            "targz": hostile.long_name_targz(root / "names.tar.gz", members=10_000)}


def test_parquet_of_a_gigabyte_of_urls_is_refused_in_bounded_memory(bombs: dict[str, Path], tmp_path: Path) -> None:
    """160 KB of Parquet holding 20,000 URL cells of 50 KB (1 GB of text): 5.0 GB of memory and a
    3.0 GB state before; now one line from the file's metadata, before any cell is decompressed."""
    assert bombs["parquet"].stat().st_size < 400_000
    out = tmp_path / "data"
    ran = hostile.run_cli(["download", str(bombs["parquet"]), "--out", str(out), "--no-progress"], MEMORY_MIB)
    assert ran.returncode == 2, ran.stderr
    assert "metadata budget" in ran.stderr and "urls.parquet" in ran.stderr
    assert "Traceback" not in ran.stderr
    assert ran.peak_rss_mib < PEAK_MIB
    assert _state_bytes(out) < 1 << 20


def test_long_cells_are_cut_before_they_are_stored(tmp_path: Path) -> None:
    """URL cells over 8 KB and path cells over 4 KB end as rows with a reason, stored as a short
    stand-in; memory follows bytes (chunks of ~8 MB of text), not rows; the state stays small."""
    long_urls = [f"http://127.0.0.1:9/{i}/" + "u" * 60_000 for i in range(300)]
    with FaultServer() as srv:
        good = [srv.add(f"g{i}.png", _png(i), "image/png") for i in range(3)]
        rows = [(u, "a", "") for u in long_urls] + [(u, "b", "") for u in good]
        rows += [("", "c", "p" * 5000 + ".png"), ("http://" + "h" * 70 + ".example/x.png", "c", "")]
        table = tmp_path / "urls.csv"
        pd.DataFrame(rows, columns=["url", "label", "path"]).to_csv(table, index=False)
        out = tmp_path / "data"
        ran = hostile.run_cli(["download", str(table), "--out", str(out), "--no-progress"], MEMORY_MIB)
    assert ran.returncode == 0, ran.stderr
    manifest = pd.read_parquet(out / "manifest.parquet")
    cut = manifest.iloc[:300]
    assert set(cut["status"]) == {"invalid_url"}
    assert cut["error"].str.match(r"URL of 600\d\d bytes, over the 8192-byte limit \(not stored\)").all()
    assert cut["url"].str.len().max() < 200 and cut["url"].nunique() == 300  # distinct stand-ins
    assert list(manifest.iloc[300:303]["status"]) == ["ok"] * 3
    path_row, host_row = manifest.iloc[303], manifest.iloc[304]
    assert path_row["status"] == "unreadable" and "path of 5004 bytes" in path_row["error"]
    assert host_row["status"] == "invalid_url" and "host name too long" in host_row["error"]
    assert ran.peak_rss_mib < PEAK_MIB
    assert _state_bytes(out) < 2 << 20  # 18 MB of input cells


def test_a_label_over_the_limit_is_refused_with_one_line(tmp_path: Path) -> None:
    table = tmp_path / "urls.csv"
    table.write_text("url,label\nhttp://127.0.0.1:9/a.png,cat\nhttp://127.0.0.1:9/b.png," + "L" * 2000 + "\n")
    with pytest.raises(DataError, match=r"urls.csv: data row 2: label of 2000 bytes \(limit 1024\)"):
        download.run(dataclasses.replace(_quiet(), sources=[table], out=tmp_path / "data"))


def test_archive_with_long_member_names_is_bounded(bombs: dict[str, Path], tmp_path: Path) -> None:
    """A .tar.gz of empty members with 8 KB names (2.8 GB and a 3.3 GB state for 100,000 of them):
    each name over 4 KB is refused and stored cut; past the archive's name budget the rest is not read."""
    out = tmp_path / "data"
    ran = hostile.run_cli(["download", str(bombs["targz"]), "--out", str(out), "--no-progress"], MEMORY_MIB)
    assert ran.returncode == 1, ran.stderr  # no row ended ok: one line, non-zero
    assert "no row ended ok" in ran.stderr and "Traceback" not in ran.stderr
    skipped = json.loads((out / "download_report.json").read_text())["skipped"]
    assert skipped["by_kind"]["unreadable_archive"] == 1
    assert 7_000 < skipped["by_kind"]["unsafe_member"] < 10_000  # 64 MiB of names / 8 KB each
    reasons = {f["reason"] for f in skipped["files"]}
    assert "member name of 8192 bytes (limit 4096)" in reasons
    with sqlite3.connect(out / STATE_NAME) as db:  # the report lists the first 1,000 only
        (stop,) = db.execute("SELECT reason FROM skipped WHERE kind = 'unreadable_archive'").fetchone()
    assert "metadata budget of one archive" in stop
    assert max(len(f["path"]) for f in skipped["files"]) < 400
    assert ran.peak_rss_mib < PEAK_MIB
    assert _state_bytes(out) < 4 << 20


# ---------------------------------------------------------------- class 11: fetched once
def test_a_stalled_event_loop_does_not_refetch_an_answered_url() -> None:
    """The header deadline fired while our own loop was busy (2 cores, a slow SQLite page): the
    host had answered, the answer sat unread, and the image was fetched again (attempts = 2)."""
    from imgclf.download._fetch import Fetcher

    with FaultServer(latency=0.2) as srv:
        warm = srv.add("warm.png", _png(1), "image/png")
        url = srv.add("x.png", _png(2), "image/png")

        async def main():  # noqa: ANN202
            fetcher = Fetcher(_quiet(read_timeout=15))
            try:
                for _ in range(20):  # enough answers for the host's adaptive header deadline (2 s floor)
                    await fetcher.fetch(warm)
                task = asyncio.create_task(fetcher.fetch(url))
                await asyncio.sleep(0.05)  # the request is out
                time.sleep(2.5)  # the loop stalls past the deadline; the answer arrives meanwhile
                return await task
            finally:
                await fetcher.close()

        got = asyncio.run(main())
    assert got.status is None and got.attempts == 1
    assert srv.counts["/file/x.png"] == 1


def test_each_valid_url_is_fetched_once_among_hostile_rows_over_two_tables(tmp_path: Path) -> None:
    """Several hundred valid images and hostile rows (errors, resets, redirect loops, cut cells,
    closed ports, bad schemes) spread over two CSVs: the server counts one GET per valid image."""
    from fault_server import closed_port

    n = 400
    with FaultServer() as srv:
        valid = [srv.add(f"v{i}.png", _png(i), "image/png") for i in range(n)]
        port = closed_port()
        hostile_rows = [srv.url("status/500"), srv.url("status/404"), srv.url("reset"), srv.url("loop/a"),
                        f"http://127.0.0.1:{port}/x.png", "ftp://127.0.0.1/x.png", "file:///etc/passwd",
                        srv.url("x") + "?" + "q" * 20_000, "http://" + "h" * 64 + "/x.png", "not a url"]
        first = [(u, "a") for u in valid[: n // 2]] + [(f"{h}#{j}", "a") for j in range(10) for h in hostile_rows]
        second = [(f"{h}#b{j}", "b") for j in range(10) for h in hostile_rows] + [(u, "b") for u in valid[n // 2:]]
        pd.DataFrame(first, columns=["url", "label"]).to_csv(tmp_path / "one.csv", index=False)
        pd.DataFrame(second, columns=["url", "label"]).to_csv(tmp_path / "two.csv", index=False)
        result = download.run(dataclasses.replace(_quiet(retries=1, backoff=0.05, read_timeout=3, timeout=5),
                                                  sources=[tmp_path / "one.csv",
                                                           tmp_path / "two.csv"], out=tmp_path / "data"))
        counts = dict(srv.counts)
    assert result.counts["ok"] == n
    fetched = {p: c for p, c in counts.items() if p.startswith("/file/v")}
    assert len(fetched) == n
    assert {p: c for p, c in fetched.items() if c != 1} == {}
    manifest = pd.read_parquet(tmp_path / "data" / "manifest.parquet")
    assert set(manifest.loc[manifest["status"] == "ok", "attempts"]) == {1}


# ---------------------------------------------------------------- class 8: local sources
def _folder_with_links(tmp_path: Path) -> Path:
    """photos/cats/1.png, plus class folders that are links: one inside (read), one to a folder
    outside the source (an /etc stand-in holding an image and a passwd-like text), one to /dev."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(_png(9))
    (outside / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    root = tmp_path / "photos"
    (root / "cats").mkdir(parents=True)
    (root / "cats" / "1.png").write_bytes(_png(1))
    (root / "cats" / "notes").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "cats" / "again.png").symlink_to(root / "cats" / "1.png")  # inside: read
    (root / "etc").symlink_to(outside, target_is_directory=True)
    (root / "dev").symlink_to("/dev", target_is_directory=True)
    return root


def test_links_that_leave_the_source_folder_are_not_followed(tmp_path: Path) -> None:
    root = _folder_with_links(tmp_path)
    result = download.run(dataclasses.replace(_quiet(), sources=[root], out=tmp_path / "data"))
    manifest = pd.read_parquet(result.manifest_path)
    assert sorted(manifest["label"]) == ["cats", "cats", "cats"]  # 1.png, again.png, notes
    assert not manifest["url"].str.contains("secret|passwd|/dev/").any()
    kinds = {f["path"].rsplit("/", 1)[-1]: f["kind"] for f in result.report["skipped"]["files"]}
    assert kinds["etc"] == "outside_link" and kinds["dev"] == "special_path"
    # file contents never reach a message: the text file is `not_image` without its bytes
    notes = manifest[manifest["url"].str.endswith("notes")].iloc[0]
    assert notes["status"] == "not_image" and "root" not in notes["error"] and "text" in notes["error"]


def test_follow_links_reads_outside_folders_but_never_dev(tmp_path: Path) -> None:
    root = _folder_with_links(tmp_path)
    result = download.run(dataclasses.replace(_quiet(follow_links=True), sources=[root], out=tmp_path / "data"))
    manifest = pd.read_parquet(result.manifest_path)
    etc = manifest[manifest["label"] == "etc"]
    etc = etc.set_index(etc["url"].str.rsplit("/", n=1).str[-1])
    assert etc.loc["secret.png", "status"] == "ok"
    assert etc.loc["passwd", "status"] == "not_image" and "root" not in etc.loc["passwd", "error"]
    assert "dev" not in set(manifest["label"])  # /dev/fd would reach this process's own state
    assert {f["kind"] for f in result.report["skipped"]["files"]} == {"special_path"}


@pytest.mark.parametrize("table_first", [False, True])
def test_a_url_cell_equal_to_a_local_path_does_not_borrow_the_file(tmp_path: Path, table_first: bool) -> None:
    root = tmp_path / "photos"
    (root / "cats").mkdir(parents=True)
    (root / "cats" / "1.png").write_bytes(_png(1))
    locator = str(root / "cats" / "1.png")  # the folder row's url in the manifest
    table = tmp_path / "urls.csv"
    pd.DataFrame([(locator, "dogs")], columns=["url", "label"]).to_csv(table, index=False)
    sources = [table, root] if table_first else [root, table]
    result = download.run(dataclasses.replace(_quiet(), sources=sources, out=tmp_path / "data"))
    manifest = pd.read_parquet(result.manifest_path).set_index("label")
    assert manifest.loc["cats", "status"] == "ok" and manifest.loc["cats", "url"] == locator
    assert manifest.loc["dogs", "status"] == "invalid_url" and manifest.loc["dogs", "url"] == locator
    assert manifest.loc["dogs", "path"] == "" and result.counts == {"ok": 1, "invalid_url": 1}


def _same_name_archive(path: Path, fmt: str) -> Path:
    import tarfile
    import warnings
    import zipfile

    members = [("cats/1.png", _png(1)), ("cats/1.png", _png(2)), ("cats/2.png", _png(3))]
    if fmt == "zip":
        with zipfile.ZipFile(path, "w") as zf, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Duplicate name": exactly the point
            for name, data in members:
                zf.writestr(name, data)
    else:
        with tarfile.open(path, "w:gz" if fmt == "tar.gz" else "w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("fmt", ["zip", "tar", "tar.gz"])
def test_two_members_with_one_name_are_two_images(tmp_path: Path, fmt: str) -> None:
    archive = _same_name_archive(tmp_path / f"pets.{fmt}", fmt)
    result = download.run(dataclasses.replace(_quiet(), sources=[archive], out=tmp_path / "data"))
    manifest = pd.read_parquet(result.manifest_path)
    assert list(manifest["status"]) == ["ok", "ok", "ok"]
    assert manifest["sha256"].nunique() == 3
    assert list(manifest["url"].str.rsplit("!", n=1).str[-1]) == ["cats/1.png", "cats/1.png (#2)", "cats/2.png"]


# ---------------------------------------------------------------- class 6: storage URLs
@pytest.mark.parametrize("out, says", [
    ("memory://data", "storage scheme 'memory' is not supported"),
    ("zip://x.zip", "storage scheme 'zip' is not supported"),
    ("tar://x.tar", "storage scheme 'tar' is not supported"),
    ("dir://x", "storage scheme 'dir' is not supported"),
    ("ftp://127.0.0.1/data", "storage scheme 'ftp' is not supported"),
    ("github://owner:repo@main/data", "storage scheme 'github' is not supported"),
    ("http://127.0.0.1:9/data", "http(s) storage is read-only"),
])
def test_an_unsupported_out_is_one_line_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             out: str, says: str) -> None:
    from imgclf.cli import main

    table = tmp_path / "urls.csv"
    table.write_text("url,label\nhttp://127.0.0.1:9/a.png,cat\n")
    started = time.monotonic()
    code = main(["download", str(table), "--out", out, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1
    assert time.monotonic() - started < 5  # no network call, no fetch


@pytest.mark.parametrize("scheme", ["memory", "zip", "github", "ftp"])
def test_readers_refuse_unknown_storage_too(scheme: str) -> None:
    from imgclf import storage
    from imgclf.errors import ConfigError

    with pytest.raises(ConfigError, match="is not supported"):
        storage.read_row(f"{scheme}://somewhere/data", storage.RowRef("images/ab/x.png"))


def test_percent_escapes_in_stored_names_never_reach_an_http_data_dir() -> None:
    from imgclf import storage

    with FaultServer() as srv:
        srv.add("a.png", _png(1), "image/png")
        data_dir = srv.url("file")
        assert storage.read_row(data_dir, storage.RowRef("a.png")) == _png(1)  # http(s) reads work
        for name in ("images/%2e%2e/%2e%2e/secret/x.png", "images/%2E%2E/x.png", "images/x.png?y=1",
                     "images/x.png#frag"):
            with pytest.raises(DataError, match="not a (plain )?relative path"):
                storage.read_row(data_dir, storage.RowRef(name))
        assert set(srv.counts) == {"/file/a.png"}


def test_a_tar_row_whose_offset_or_bytes_exceed_the_shard_is_refused(tmp_path: Path) -> None:
    """`bytes` = 30e9 was a MemoryError in evaluate: now one OSError per row, before any read."""
    from imgclf import data, storage
    from imgclf.manifest import row_refs

    root = tmp_path / "photos"
    (root / "cats").mkdir(parents=True)
    for i in range(3):
        (root / "cats" / f"{i}.png").write_bytes(_png(i))
    out = tmp_path / "data"
    result = download.run(dataclasses.replace(_quiet(layout="tar"), sources=[root], out=out))
    ref = row_refs(pd.read_parquet(result.manifest_path))[0]
    assert ref.shard and storage.read_row(out, ref)[:8] == b"\x89PNG\r\n\x1a\n"
    shard_size = (out / ref.shard).stat().st_size
    for bad in (storage.RowRef(ref.path, ref.shard, ref.offset, 30_000_000_000),
                storage.RowRef(ref.path, ref.shard, shard_size - 10, ref.size),
                storage.RowRef(ref.path, ref.shard, 10**15, ref.size)):
        with pytest.raises(OSError, match="over the .*-byte limit|outside the file"):
            data.read_image(out, bad)


def test_table_paths_into_proc_dev_sys_are_never_read(tmp_path: Path) -> None:
    """A path column naming /dev/fd/N or /proc/self/... would read this process's own files."""
    table = tmp_path / "paths.csv"
    (tmp_path / "devlink").symlink_to("/dev", target_is_directory=True)  # realpath alone would miss it
    pd.DataFrame({"path": ["/dev/fd/3", "/proc/self/environ", "/sys/kernel/notes", "/dev/stdin", "devlink/fd/3"],
                  "label": "x"}).to_csv(table, index=False)
    result = download.run(dataclasses.replace(_quiet(), sources=[table], out=tmp_path / "data"))
    manifest = pd.read_parquet(result.manifest_path)
    assert set(manifest["status"]) == {"unreadable"}
    assert manifest["error"].str.contains("never read").all()


@pytest.mark.parametrize("fmt", [__import__("tarfile").GNU_FORMAT, __import__("tarfile").PAX_FORMAT])
def test_a_huge_tar_header_is_not_read(tmp_path: Path, fmt: int) -> None:
    """One member named with 20 MB (gzip: 20 KB): tarfile would read the whole header into memory."""
    import tarfile

    archive = tmp_path / "one.tar.gz"
    with tarfile.open(archive, "w:gz", format=fmt) as tar:
        good = tarfile.TarInfo("b/ok.png")
        data = _png(1)
        good.size = len(data)
        tar.addfile(good, io.BytesIO(data))
        tar.addfile(tarfile.TarInfo("a/" + "n" * 20_000_000 + ".png"), io.BytesIO(b""))
    assert archive.stat().st_size < 200_000
    result = download.run(dataclasses.replace(_quiet(), sources=[archive], out=tmp_path / "data"))
    assert result.counts == {"ok": 1}  # what came before is kept
    files = result.report["skipped"]["files"]
    assert [f["kind"] for f in files] == ["unreadable_archive"]
    assert "extended header (long name or pax) of 200000" in files[0]["reason"]
    first = tmp_path / "first.tar.gz"  # the very first header: the archive cannot be opened, one line
    with tarfile.open(first, "w:gz", format=fmt) as tar:
        tar.addfile(tarfile.TarInfo("a/" + "n" * 20_000_000 + ".png"), io.BytesIO(b""))
    with pytest.raises(DataError, match="extended header .* over 1048576"):
        download.run(dataclasses.replace(_quiet(), sources=[first], out=tmp_path / "data2"))
