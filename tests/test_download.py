"""The download stage against a real hostile HTTP server on 127.0.0.1 (tests/fault_server.py).

One download run over every fault case (module fixture, a few seconds), then one assertion per
case; then resume: SIGKILL of a real `python -m imgclf download` subprocess, --retry-failed,
changed sources, changed storage options.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from fault_server import FaultServer, closed_port, sample_images
from helpers import DEMO_ROOT, state_urls
from PIL import Image

from imgclf.errors import ConfigError, DataError
from imgclf.manifest import COLUMNS, STATUSES
from imgclf.stages import download

FAST = dict(timeout=1.5, read_timeout=0.7, connect_timeout=1.0, retries=1, backoff=0.05, max_retry_after=1.5,
            max_bytes=200_000, processes=1, concurrency=16, per_host=16, show_progress=False,
            print_summary=False)

# name -> (url path or absolute URL, expected status); {port} is the closed port.
CASES: dict[str, tuple[str, str]] = {
    "not_found_404": ("status/404", "http_error"),
    "server_error_500": ("status/500", "http_error"),
    "503_then_ok": ("flaky/k503/503/1/solid0.jpg", "ok"),
    "429_retry_after_then_ok": ("flaky/k429/429/1/solid1.png?after=1", "ok"),
    "retry_after_beyond_bound": ("flaky/kforever/429/99/rgb.jpg?after=3600", "http_error"),
    "slow_trickle_past_deadline": ("trickle", "timeout"),
    "never_answers": ("hang", "timeout"),
    "reset_mid_body": ("reset", "connection_error"),
    "html_with_200": ("file/page.html", "not_image"),
    "truncated_jpeg": ("file/truncated.jpg", "not_image"),
    "empty_body": ("file/empty.jpg", "empty"),
    "over_size_limit": ("file/big.jpg", "too_large"),
    "over_size_limit_streamed": ("stream/1000000", "too_large"),
    "decompression_bomb": ("file/bomb.png", "too_large"),
    "redirect_to_image": ("redirect/3/solid3.jpg2", "ok"),
    "redirect_loop": ("loop/a", "too_many_redirects"),
    "too_many_redirects": ("redirect/9/rgb.jpg", "too_many_redirects"),
    "wrong_content_type": ("file/solid2.webp", "ok"),
    "gzip_encoding": ("gzip/solid4.png2", "ok"),
    "cmyk_jpeg": ("file/cmyk.jpg", "ok"),
    "png_16_bit": ("file/deep16.png", "ok"),
    "palette_png_transparency": ("file/palette_alpha.png", "ok"),
    "animated_gif": ("file/animated.gif", "ok"),
    "webp": ("file/image.webp", "ok"),
    "svg": ("file/drawing.svg", "not_image"),
    "text": ("file/notes.txt", "not_image"),
    "one_pixel": ("file/tiny.png", "too_small"),
    "exif_rotated_jpeg": ("file/rotated.jpg", "ok"),
    "malformed_url": ("http://exa mple.com/a.jpg", "invalid_url"),
    "no_host": ("http:///a.jpg", "invalid_url"),
    "file_url": ("file:///etc/passwd", "invalid_url"),
    "ftp_url": ("ftp://127.0.0.1/a.jpg", "invalid_url"),
    "data_url": ("data:image/png;base64,iVBORw0KGgo=", "invalid_url"),
    "closed_port": ("http://127.0.0.1:{port}/a.jpg", "connection_error"),
    "duplicate_row": ("file/rgb.jpg", "duplicate"),  # the same URL as the first rgb.jpg row
    "same_content_other_url": ("file/rgb-copy.jpg", "duplicate"),
}
CONTENT_TYPES = {"solid2.webp": "image/jpeg", "solid4.png2": "text/plain", "page.html": "text/html",
                 "drawing.svg": "image/svg+xml", "bomb.png": "image/png", "animated.gif": "image/gif"}


def _url(server: FaultServer, spec: str, port: int) -> str:
    absolute = "://" in spec or spec.startswith("data:")
    return spec.format(port=port) if absolute else server.url(spec)


def _stock(srv: FaultServer) -> FaultServer:
    for name, body in sample_images().items():
        srv.add(name, body, CONTENT_TYPES.get(name, "image/jpeg" if name.endswith(".jpg") else
                                              "application/octet-stream"))
    srv.add("rgb-copy.jpg", srv.files["rgb.jpg"][0], "image/jpeg")
    return srv


@pytest.fixture(scope="module")
def server():
    with FaultServer() as srv:
        yield _stock(srv)


@pytest.fixture(scope="module")
def faults(server: FaultServer, tmp_path_factory: pytest.TempPathFactory):
    """One download over all fault cases; returns (manifest indexed by case, data_dir, result)."""
    tmp = tmp_path_factory.mktemp("faults")
    port = closed_port()
    rows = [{"url": server.url("file/rgb.jpg"), "label": "first", "case": "first_rgb"}]
    rows += [{"url": _url(server, spec, port), "label": name, "case": name}
             for name, (spec, _) in CASES.items()]
    pd.DataFrame(rows).to_csv(tmp / "train.csv", index=False)
    started = time.monotonic()
    result = download.run(download.DownloadOptions(sources=[tmp / "train.csv"], out=tmp / "data", **FAST))
    elapsed = time.monotonic() - started
    manifest = pd.read_parquet(result.manifest_path)
    manifest.index = [r["case"] for r in rows]
    return manifest, tmp / "data", result, elapsed


@pytest.mark.parametrize("case", list(CASES))
def test_fault_case_ends_with_its_status(faults, case: str) -> None:
    manifest, data_dir, _, _ = faults
    row = manifest.loc[case]
    assert row["status"] == CASES[case][1], f"{case}: {row['status']} ({row['error']})"
    if row["status"] in ("ok", "duplicate"):
        stored = data_dir / row["path"]
        assert stored.is_file()
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == row["sha256"]
        with Image.open(stored) as img:
            assert img.size == (row["width"], row["height"])
            img.load()
    else:
        assert row["error"] and row["path"] == "" and row["sha256"] == ""


def test_every_fault_case_ends_alike_on_the_plain_asyncio_loop(
        faults, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixture's run took uvloop's event loop (net.run, where uvloop is installed); without uvloop
    (Windows) the same rows end with the same statuses. A server of its own: the module's counts
    requests (test_same_url_fetched_once) and its flaky URLs count failures."""
    manifest, _, _, _ = faults
    monkeypatch.setitem(sys.modules, "uvloop", None)
    port = closed_port()
    with FaultServer() as server:
        _stock(server)
        rows = [{"url": server.url("file/rgb.jpg"), "label": "first"}]
        rows += [{"url": _url(server, spec, port), "label": name} for name, (spec, _) in CASES.items()]
        pd.DataFrame(rows).to_csv(tmp_path / "train.csv", index=False)
        result = download.run(download.DownloadOptions(sources=[tmp_path / "train.csv"], out=tmp_path / "data",
                                                       **FAST))
    plain = pd.read_parquet(result.manifest_path)
    assert plain["status"].tolist() == manifest["status"].tolist()


def test_manifest_follows_the_contract(faults) -> None:
    manifest, data_dir, result, _ = faults
    assert list(manifest.columns) == list(COLUMNS)
    assert manifest["row"].tolist() == list(range(len(CASES) + 1))
    assert set(manifest["status"]) <= set(STATUSES) - {"pending"}
    assert result.total == len(manifest) and sum(result.counts.values()) == len(manifest)
    assert result.counts == manifest["status"].value_counts().to_dict()
    report = json.loads(result.report_path.read_text())
    assert report["counts"] == result.counts
    assert report["by_split"]["train"] == result.counts
    assert not (data_dir / ".tmp").exists() or not any((data_dir / ".tmp").iterdir())
    for path in manifest.loc[manifest["path"] != "", "path"]:
        assert path.startswith("images/") and (data_dir / path).resolve().is_relative_to(data_dir.resolve())


def test_retries_and_attempts_are_recorded(faults) -> None:
    manifest = faults[0]
    assert manifest.loc["503_then_ok", "attempts"] == 2
    assert manifest.loc["429_retry_after_then_ok", "attempts"] == 2
    assert manifest.loc["server_error_500", "attempts"] == 2  # retried once (retries=1), then given up
    assert manifest.loc["server_error_500", "http_status"] == 500
    assert manifest.loc["not_found_404", "attempts"] == 1  # other 4xx are never retried
    assert manifest.loc["not_found_404", "http_status"] == 404
    assert manifest.loc["never_answers", "attempts"] == 2


def test_deadlines_bound_the_run(faults) -> None:
    # trickle and hang use 2 attempts x 1.5 s deadline; Retry-After: 3600 is capped at 1.5 s.
    assert faults[3] < 15, f"download took {faults[3]:.1f}s"


def test_duplicates_point_at_the_first_row(faults) -> None:
    manifest = faults[0]
    first = manifest.loc["first_rgb"]
    assert first["status"] == "ok" and first["duplicate_of"] == -1
    for case in ("duplicate_row", "same_content_other_url"):
        row = manifest.loc[case]
        assert row["duplicate_of"] == first["row"] and row["path"] == first["path"]
    assert manifest.loc["same_content_other_url", "error"] == "same image as row 0"
    assert manifest.loc["duplicate_row", "error"] == "same URL as row 0"
    assert manifest.loc["duplicate_row", "attempts"] == 0  # fetched once, for the first row


def test_same_url_fetched_once(server: FaultServer, faults) -> None:
    assert server.counts["/file/rgb.jpg"] == 1


def test_images_are_normalised(faults) -> None:
    manifest, data_dir, _, _ = faults
    with Image.open(data_dir / manifest.loc["exif_rotated_jpeg", "path"]) as img:
        assert img.size == (48, 64)  # 64x48 stored rotated
        top, bottom = img.convert("RGB").getpixel((24, 5)), img.convert("RGB").getpixel((24, 58))
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]  # left (red) half is now on top
    with Image.open(data_dir / manifest.loc["palette_png_transparency", "path"]) as img:
        rgb = img.convert("RGB")
        assert rgb.getpixel((4, 4)) == (0, 255, 0)
        assert rgb.getpixel((24, 4)) == (255, 255, 255)  # transparent -> white
    with Image.open(data_dir / manifest.loc["cmyk_jpeg", "path"]) as img:
        assert img.mode == "RGB"
    with Image.open(data_dir / manifest.loc["animated_gif", "path"]) as img:
        assert getattr(img, "n_frames", 1) == 1 and img.convert("RGB").getpixel((5, 5)) == (255, 0, 0)
    with Image.open(data_dir / manifest.loc["png_16_bit", "path"]) as img:
        assert img.mode == "RGB" and len(img.getcolors(4096) or []) > 10  # scaled, not clipped to white


def test_nothing_is_read_from_local_disk(faults) -> None:
    row = faults[0].loc["file_url"]
    assert row["attempts"] == 0 and row["http_status"] == 0 and "scheme" in row["error"]


def test_resize_and_reencode(server: FaultServer, tmp_path: Path) -> None:
    pd.DataFrame({"url": [server.url("file/big.jpg"), server.url("file/rgb.jpg")], "label": ["a", "b"]}
                 ).to_csv(tmp_path / "s.csv", index=False)
    options = download.DownloadOptions(**{**FAST, "max_bytes": 1_000_000}, resize="longer", size=100,
                                       image_format="webp", quality=70)
    manifest = pd.read_parquet(download.run(dataclasses.replace(options, sources=[tmp_path / "s.csv"],
                                                                out=tmp_path / "d")).manifest_path)
    assert manifest["status"].tolist() == ["ok", "ok"]
    assert manifest[["width", "height"]].values.tolist() == [[100, 100], [64, 48]]  # never enlarged
    for path in manifest["path"]:
        assert path.endswith(".webp")
        with Image.open(tmp_path / "d" / path) as img:
            assert img.format == "WEBP"


def test_rerun_fetches_nothing_and_keeps_the_manifest(server: FaultServer, tmp_path: Path) -> None:
    urls = [server.url("file/other.png"), server.url("status/404"), server.url("file/cmyk.jpg")]
    pd.DataFrame({"url": urls, "label": ["a", "b", "c"]}).to_csv(tmp_path / "train.csv", index=False)
    first = download.run(download.DownloadOptions(sources=[tmp_path / "train.csv"], out=tmp_path / "d", **FAST))
    before = pd.read_parquet(first.manifest_path)
    counts = dict(server.counts)
    second = download.run(download.DownloadOptions(sources=[tmp_path / "train.csv"], out=tmp_path / "d", **FAST))
    assert dict(server.counts) == counts and second.fetched == 0
    pd.testing.assert_frame_equal(before, pd.read_parquet(second.manifest_path))


def test_retry_failed_retries_only_retryable(server: FaultServer, tmp_path: Path) -> None:
    flaky, missing = server.url("flaky/retry-me/503/1/other.png"), server.url("status/404?x=retry")
    pd.DataFrame({"url": [flaky, missing], "label": ["a", "b"]}).to_csv(tmp_path / "t.csv", index=False)
    no_retry = download.DownloadOptions(**{**FAST, "retries": 0})
    first = download.run(dataclasses.replace(no_retry, sources=[tmp_path / "t.csv"], out=tmp_path / "d"))
    assert first.counts == {"http_error": 2}
    again = download.run(download.DownloadOptions(sources=[tmp_path / "t.csv"], out=tmp_path / "d",
                                                  **{**FAST, "retries": 0, "retry_failed": True}))
    assert again.counts == {"ok": 1, "http_error": 1}
    assert server.counts["/status/404"] >= 1 and again.fetched == 1  # the 404 was not asked again
    assert pd.read_parquet(again.manifest_path).loc[0, "attempts"] == 2  # attempts add up over runs


def test_changed_sources_fetch_only_new_urls(server: FaultServer, tmp_path: Path) -> None:
    src = tmp_path / "train.csv"
    pd.DataFrame({"url": [server.url("file/webp-a?x=1")], "label": ["a"]}).to_csv(src, index=False)
    server.add("webp-a", sample_images()["image.webp"])
    download.run(download.DownloadOptions(sources=[src], out=tmp_path / "d", **FAST))
    server.add("extra.png", sample_images()["other.png"])
    pd.DataFrame({"url": [server.url("file/webp-a?x=1"), server.url("file/extra.png")], "label": ["a", "b"]}
                 ).to_csv(src, index=False)
    result = download.run(download.DownloadOptions(sources=[src], out=tmp_path / "d", **FAST))
    assert result.fetched == 1 and result.counts == {"ok": 2}
    assert server.counts["/file/webp-a"] == 1


def test_other_storage_options_on_the_same_dir_are_refused(server: FaultServer, tmp_path: Path) -> None:
    src = tmp_path / "s.csv"
    pd.DataFrame({"url": [server.url("file/other.png")], "label": ["a"]}).to_csv(src, index=False)
    download.run(download.DownloadOptions(sources=[tmp_path / "s.csv"], out=tmp_path / "d", **FAST))
    with pytest.raises(ConfigError, match="size=64"):
        download.run(download.DownloadOptions(sources=[tmp_path / "s.csv"], out=tmp_path / "d", **FAST, size=64))


def test_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        download.run(download.DownloadOptions(sources=[tmp_path / "missing.csv"], out=tmp_path / "d", **FAST))
    (tmp_path / "bad.csv").write_text("link,label\nhttp://a/b.jpg,x\n")
    with pytest.raises(DataError, match="url"):
        download.run(download.DownloadOptions(sources=[tmp_path / "bad.csv"], out=tmp_path / "d", **FAST))
    with pytest.raises(ConfigError, match="--quality"):
        download.DownloadOptions(quality=0)


def test_defaults_work_with_a_plain_static_server(tmp_path: Path) -> None:
    """What the demo does: DownloadOptions(show_progress=False) against the stdlib static server."""
    from imgclf._localserver import LocalServer

    files = sorted((DEMO_ROOT / "train").glob("*/*.png"))[:12]
    with LocalServer(DEMO_ROOT) as srv:
        pd.DataFrame({"url": [srv.url(str(f.relative_to(DEMO_ROOT))) for f in files],
                      "label": [f.parent.name for f in files]}).to_csv(tmp_path / "train.csv", index=False)
        result = download.run(download.DownloadOptions(sources=[tmp_path / "train.csv"], out=tmp_path / "d",
                                                       show_progress=False, print_summary=False))
    assert result.counts == {"ok": 12}
    manifest = pd.read_parquet(result.manifest_path)
    # Fashion-MNIST PNGs are already clean: stored byte for byte.
    assert all((tmp_path / "d" / p).read_bytes() == f.read_bytes() for p, f in zip(manifest["path"], files,
                                                                                    strict=True))


# -- SIGKILL mid-run, then resume ----------------------------------------------------------------
def _processes_running(marker: str) -> list[int]:
    """Live processes whose command line mentions `marker` (the killed run and its workers)."""
    found = []
    for proc_dir in Path("/proc").iterdir():
        try:
            if proc_dir.name.isdigit() and marker.encode() in (proc_dir / "cmdline").read_bytes():
                found.append(int(proc_dir.name))
        except OSError:
            continue
    return found


def _wait_until_gone(marker: str, seconds: float = 5.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while (alive := _processes_running(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def test_sigkill_mid_run_then_resume(tmp_path: Path) -> None:
    files = sorted((DEMO_ROOT / "train").glob("*/*.png"))[:60]
    with FaultServer(latency=0.15) as srv:
        urls = [srv.add(f"{i}.png", f.read_bytes(), "image/png") for i, f in enumerate(files)]
        urls += [srv.url("status/404"), urls[0]]  # a failure and a duplicate row too
        pd.DataFrame({"url": urls, "label": ["x"] * len(urls)}).to_csv(tmp_path / "train.csv", index=False)
        cmd = [sys.executable, "-m", "imgclf", "download", str(tmp_path / "train.csv"), "--out",
               str(tmp_path / "d"), "--no-progress", "--concurrency", "4", "--processes", "1"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        state = tmp_path / "d" / download.STATE_NAME
        deadline = time.monotonic() + 60
        while len(state_urls(state)) < 12 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        done_before = state_urls(state)
        assert 12 <= len(done_before) < len(set(urls)), "kill did not land mid-run"
        counts_at_kill = dict(srv.counts)
        assert _wait_until_gone(str(tmp_path / "train.csv")) == [], "worker processes outlived the killed run"
        assert not (tmp_path / "d" / "manifest.parquet").exists()

        rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr[-2000:]

    manifest = pd.read_parquet(tmp_path / "d" / "manifest.parquet")
    assert len(manifest) == len(urls) and "pending" not in set(manifest["status"])
    assert manifest["status"].value_counts().to_dict() == {"ok": 60, "http_error": 1, "duplicate": 1}
    for url in done_before:  # no finished URL was fetched again
        path = "/" + url.split("/", 3)[3]
        assert srv.counts[path] == counts_at_kill[path] == 1, path
    assert max(srv.counts.values()) <= 2  # at most the in-flight ones, once more
    data_dir = tmp_path / "d"
    assert not any((data_dir / ".tmp").glob("*")) if (data_dir / ".tmp").exists() else True
    stored = {p.relative_to(data_dir).as_posix() for p in (data_dir / "images").glob("*/*")}
    assert stored == set(manifest.loc[manifest["path"] != "", "path"])  # no orphan, no missing file


def test_two_runs_on_one_data_dir_are_refused(tmp_path: Path) -> None:
    from imgclf.download._state import State

    (tmp_path / "d").mkdir()
    holder = State(tmp_path / "d")
    try:
        with pytest.raises(DataError, match="another"):
            State(tmp_path / "d")
    finally:
        holder.close()
    State(tmp_path / "d").close()  # free again once the first one is closed


def test_blank_label_rows_get_missing_label_and_are_not_fetched(server: FaultServer, tmp_path: Path) -> None:
    server.add("labelled.png", sample_images()["other.png"])
    server.add("unlabelled.png", sample_images()["solid0.jpg"])
    labelled, unlabelled = server.url("file/labelled.png"), server.url("file/unlabelled.png")
    (tmp_path / "train.csv").write_text(
        f"url,label\n{unlabelled},\n{labelled},a\n{labelled},   \nnot a url,\n{server.url('status/404')},b\n")
    result = download.run(download.DownloadOptions(sources=[tmp_path / "train.csv"], out=tmp_path / "d", **FAST))
    manifest = pd.read_parquet(result.manifest_path)
    assert manifest["status"].tolist() == ["missing_label", "ok", "missing_label", "missing_label", "http_error"]
    assert manifest.loc[0, "error"] == "the row has no label" and "missing_label" in STATUSES
    blank = manifest[manifest["status"] == "missing_label"]
    assert (blank["path"] == "").all() and (blank["attempts"] == 0).all() and (blank["duplicate_of"] == -1).all()
    assert "/file/unlabelled.png" not in server.counts and server.counts["/file/labelled.png"] == 1
    assert manifest.loc[1, "path"] and manifest.loc[1, "duplicate_of"] == -1  # the labelled row is untouched
    assert result.counts == {"ok": 1, "missing_label": 3, "http_error": 1}
    assert "" not in set(manifest.loc[manifest["status"] == "ok", "label"])


def test_state_releases_the_lock_when_the_database_cannot_open(tmp_path: Path, monkeypatch) -> None:
    from imgclf.download import _state

    (tmp_path / "d").mkdir()

    def broken_connect(*args, **kwargs):
        raise sqlite3.OperationalError("unable to open database file")

    with monkeypatch.context() as patch:
        patch.setattr(_state.sqlite3, "connect", broken_connect)
        with pytest.raises(DataError, match="unusable resume state"):
            _state.State(tmp_path / "d")
    _state.State(tmp_path / "d").close()  # the failed attempt did not keep DATA_DIR locked
