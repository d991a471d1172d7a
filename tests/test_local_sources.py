"""Local sources: image folders, archives and tables of paths become a DATA_DIR like downloads.

Real trees and archives are built in tmp_path from the bundled Fashion-MNIST PNGs and the
fault tests' sample images; hostile archives are ingested in a child process under RLIMIT_AS;
resume is tested by SIGKILL of a real `python -m imgclf download` subprocess.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from fault_server import sample_images
from helpers import DEMO_ROOT, state_urls
from PIL import Image

from imgclf.download import _archive, _read
from imgclf.errors import DataError
from imgclf.manifest import COLUMNS, STATUSES, read_manifest
from imgclf.stages import download

QUIET = dict(show_progress=False, print_summary=False, processes=1)
LABELS = ["Chaussure à talon", "T-shirt, top", "日本 語"]  # accents, a comma, spaces, CJK


def _opts(**kw) -> download.DownloadOptions:
    return download.DownloadOptions(**{**QUIET, **kw})


def _pngs(n: int, offset: int = 0, split: str = "train") -> list[Path]:
    files = sorted((DEMO_ROOT / split).glob("*/*.png"))
    return files[offset: offset + n]


def _copy(files: list[Path], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(f, folder / f.name)) for f in files]


def split_tree(root: Path, n: int = 3) -> Path:
    """root/{train,val,test}/<label>/*.png, unicode labels, one nested sub-folder."""
    offset = 0
    for split in ("train", "val", "test"):
        for label in LABELS:
            _copy(_pngs(n, offset), root / split / label)
            offset += n
    _copy(_pngs(2, offset), root / "train" / LABELS[0] / "deeper" / "still")  # belongs to LABELS[0]
    return root


def _run(srcs: list[Path], out: Path, **kw) -> tuple[download.DownloadResult, pd.DataFrame]:
    result = download.run(dataclasses.replace(_opts(**kw), sources=srcs, out=out))
    return result, pd.read_parquet(result.manifest_path)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


def _assert_stored(manifest: pd.DataFrame, data_dir: Path) -> None:
    for _, row in manifest[manifest["status"].isin(["ok", "duplicate"])].iterrows():
        stored = data_dir / row["path"]
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == row["sha256"]
        assert stored.resolve().is_relative_to((data_dir / "images").resolve())


# -- layouts -----------------------------------------------------------------------------------------
def test_split_layout_folder_becomes_a_data_dir(tmp_path: Path) -> None:
    tree = split_tree(tmp_path / "photos")
    before = _snapshot(tree)
    result, manifest = _run([tree], tmp_path / "data")
    assert list(manifest.columns) == list(COLUMNS)
    assert result.counts == {"ok": 29}
    assert set(manifest["label"]) == set(LABELS)  # verbatim: accents, comma, spaces, CJK
    assert manifest.groupby("split").size().to_dict() == {"train": 11, "val": 9, "test": 9}
    nested = manifest[manifest["url"].str.contains("deeper")]
    assert len(nested) == 2 and set(nested["label"]) == {LABELS[0]}  # deeper folders belong to the class
    assert (manifest["source"] == str(tree)).all()
    assert all(Path(u).is_file() and u.startswith(str(tree)) for u in manifest["url"])  # url: the locator
    assert (manifest["http_status"] == 0).all() and (manifest["attempts"] == 0).all()
    _assert_stored(manifest, tmp_path / "data")
    assert _snapshot(tree) == before  # nothing written into the source
    # train reads it as it reads a download
    assert len(read_manifest(tmp_path / "data")) == 29


def test_flat_layout_split_from_the_source_name_and_a_wrapper_folder(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    for i, label in enumerate(LABELS):
        _copy(_pngs(2, 2 * i), flat / label)
    named = tmp_path / "test"  # a source named like a split names the split
    _copy(_pngs(2, 10), named / "cat")
    wrapped = tmp_path / "wrapped"  # wrapped/dataset/train/...: the wrappers are looked through
    _copy(_pngs(2, 20), wrapped / "dataset" / "inner" / "train" / "dog")
    _copy(_pngs(1, 22), wrapped / "dataset" / "inner" / "Validation" / "dog")
    (wrapped / "dataset" / "inner" / "README.txt").write_text("about this data set\n")
    _, manifest = _run([flat, named, wrapped], tmp_path / "data")
    by = manifest.groupby(["source", "split", "label"]).size().to_dict()
    assert by == {**{(str(flat), "train", lab): 2 for lab in LABELS}, (str(named), "test", "cat"): 2,
                  (str(wrapped), "train", "dog"): 2, (str(wrapped), "val", "dog"): 1}
    report = json.loads((tmp_path / "data" / "download_report.json").read_text())
    assert any(f["path"].endswith("README.txt") and f["kind"] == "outside_class_folders"
               for f in report["skipped"]["files"])


def test_content_decides_not_the_extension(tmp_path: Path) -> None:
    """No extension, upper-case .JPEG/.PNG, a JPEG named .png: all validated by decoding."""
    src = _pngs(1)[0]
    cls = tmp_path / "tree" / "cls"
    cls.mkdir(parents=True)
    shutil.copy(src, cls / "no_extension")
    shutil.copy(src, cls / "x_UPPER.PNG")
    with Image.open(src) as img:
        img.convert("RGB").save(cls / "photo.JPEG", "JPEG", quality=95)
        img.convert("RGB").save(cls / "lies.png", "JPEG", quality=80)
    result, manifest = _run([tmp_path / "tree"], tmp_path / "data")
    status = dict(zip(manifest["url"].map(lambda u: Path(u).name), manifest["status"], strict=True))
    assert status == {"no_extension": "ok", "x_UPPER.PNG": "duplicate", "photo.JPEG": "ok", "lies.png": "ok"}


def test_same_validation_and_storage_as_downloads(tmp_path: Path) -> None:
    """Every sample body of the fault tests, as files: same status and same stored sha as process_body."""
    from imgclf.download._store import process_body

    samples = sample_images()
    cls = tmp_path / "tree" / "things"
    cls.mkdir(parents=True)
    for name, body in samples.items():
        (cls / name).write_bytes(body)
    options = _opts(max_bytes=200_000)
    result = download.run(dataclasses.replace(options, sources=[tmp_path / "tree"], out=tmp_path / "data"))
    manifest = pd.read_parquet(result.manifest_path)
    settings = options.store_settings(str(tmp_path / "reference"))
    seen_sha: set[str] = set()
    for url, status, sha in zip(manifest["url"], manifest["status"], manifest["sha256"], strict=True):
        expected = process_body(samples[Path(url).name], settings)
        want = getattr(expected, "status", "ok")
        if want == "ok" and expected.sha256 in seen_sha:
            want = "duplicate"
        seen_sha.add(getattr(expected, "sha256", ""))
        if Path(url).name == "big.jpg":
            want = "too_large"  # over --max-bytes: refused before reading, as a download's body is cut
        assert status == want, url
        if want in ("ok", "duplicate"):
            assert sha == expected.sha256
    assert {"rotated.jpg", "cmyk.jpg", "animated.gif"} <= set(manifest.loc[manifest["status"] == "ok", "url"]
                                                               .map(lambda u: Path(u).name))


# -- bad files ------------------------------------------------------------------------------------------
def test_each_bad_file_kind_gets_a_status_or_is_listed(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    good = _copy(_pngs(3), tree / "train" / "bag")
    bag = tree / "train" / "bag"
    (bag / "notes.txt").write_text("not an image\n")
    (bag / "empty.png").write_bytes(b"")
    (bag / "truncated.png").write_bytes(good[0].read_bytes()[:120])
    (bag / "nested.zip").write_bytes(_zip_bytes({"x/a.png": good[1].read_bytes()}))  # not opened
    (bag / ".hidden.png").write_bytes(good[1].read_bytes())
    (tree / "train" / ".cache").mkdir()
    (tree / "train" / ".cache" / "x.png").write_bytes(good[1].read_bytes())
    (tree / "__MACOSX").mkdir()
    (tree / "__MACOSX" / "._x.png").write_bytes(b"\0\5\26\7")
    (tree / "at_root.png").write_bytes(good[2].read_bytes())  # outside class folders
    (tree / "train" / "in_split.png").write_bytes(good[2].read_bytes())  # outside class folders too
    os.mkfifo(bag / "fifo.png")  # would block a plain open() for ever
    (bag / "zz_link.png").symlink_to(good[0])  # a symlink to a file is read
    (bag / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (bag / "loop").symlink_to(tree / "train")  # a symlink loop
    (bag / "zero.png").symlink_to("/dev/zero")  # a device: never opened
    started = time.monotonic()
    result, manifest = _run([tree], tmp_path / "data")
    assert time.monotonic() - started < 60
    status = dict(zip(manifest["url"].map(lambda u: Path(u).name), manifest["status"], strict=True))
    assert status == {good[0].name: "ok", good[1].name: "ok", good[2].name: "ok", "notes.txt": "not_image",
                      "empty.png": "empty", "truncated.png": "not_image", "nested.zip": "not_image",
                      "zz_link.png": "duplicate"}
    skipped = {(Path(f["path"]).name, f["kind"]) for f in result.report["skipped"]["files"]}
    assert skipped == {(".hidden.png", "hidden"), (".cache", "hidden"), ("__MACOSX", "hidden"),
                       ("at_root.png", "outside_class_folders"), ("in_split.png", "outside_class_folders"),
                       ("fifo.png", "not_regular_file"), ("dangling.png", "not_regular_file"),
                       ("loop", "symlink_loop"), ("zero.png", "special_path")}  # /dev: never read
    assert result.report["skipped"]["total"] == len(skipped)
    assert all(manifest.loc[manifest["status"] != "ok", "error"].str.len() > 0)


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_a_class_folder_named_with_a_control_character_is_one_line(tmp_path: Path, kind: str) -> None:
    """A label is refused, never cut (imgclf.untrusted), as in a table: one line naming the file."""
    png = _pngs(1)[0].read_bytes()
    if kind == "folder":
        _copy(_pngs(1), tmp_path / "tree" / "esc\x1b[2Jape")
        source = tmp_path / "tree"
    else:
        source = _write_archive(tmp_path / "t.zip", {"ok/a.png": png, "new\nline/b.png": png})
    with pytest.raises(DataError, match="control character") as err:
        download.run(dataclasses.replace(_opts(), sources=[source], out=tmp_path / "data"))
    assert "\n" not in str(err.value) and str(source) in str(err.value)


def test_special_files_are_never_opened(tmp_path: Path) -> None:
    """read_file refuses a FIFO (even one that only a writer would unblock) without opening it."""
    fifo = tmp_path / "f.png"
    os.mkfifo(fifo)
    got = _read.read_file(str(fifo), 1000)
    assert got.status == "unreadable" and "FIFO" in got.reason
    got = _read.read_file("/dev/zero", 1000)
    assert got.status == "unreadable" and "device" in got.reason
    (tmp_path / "big.png").write_bytes(b"\0" * 2000)
    assert _read.read_file(str(tmp_path / "big.png"), 1000).status == "too_large"


def test_out_inside_the_source_is_refused(tmp_path: Path) -> None:
    tree = split_tree(tmp_path / "photos", n=1)
    with pytest.raises(DataError, match="inside the source folder"):
        download.run(dataclasses.replace(_opts(), sources=[tree], out=tree / "data"))
    assert not (tree / "data").exists()


# -- archives -------------------------------------------------------------------------------------------
def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _tar_info(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname, info.mtime = len(data), kind, link, 1_700_000_000
    return info


def _write_archive(path: Path, members: dict[str, bytes]) -> Path:
    """members in order; the format comes from the suffix (zip, tar, tar.gz, tar.bz2, tar.xz, tar.zst)."""
    if path.suffix.lower() == ".zip":
        path.write_bytes(_zip_bytes(members))
        return path
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            tar.addfile(_tar_info(name, data), io.BytesIO(data))
    raw = buf.getvalue()
    name = path.name
    if name.endswith((".tar.gz", ".tgz")):
        import gzip
        raw = gzip.compress(raw)
    elif name.endswith(".tar.bz2"):
        import bz2
        raw = bz2.compress(raw)
    elif name.endswith(".tar.xz"):
        import lzma
        raw = lzma.compress(raw)
    elif name.endswith(".tar.zst"):
        import zstandard
        raw = zstandard.ZstdCompressor().compress(raw)
    path.write_bytes(raw)
    return path


def _tree_members(prefix: str = "") -> dict[str, bytes]:
    members = {}
    for i, (split, label) in enumerate([(s, lab) for s in ("train", "test") for lab in LABELS]):
        for f in _pngs(2, 2 * i):
            members[f"{prefix}{split}/{label}/{f.name}"] = f.read_bytes()
    members[f"{prefix}train/{LABELS[1]}/broken.png"] = b"\x89PNG\r\n\x1a\n" + b"\0" * 20
    members[f"{prefix}.DS_Store"] = b"junk"
    members[f"{prefix}README.md"] = b"# about\n"
    members["__MACOSX/._x"] = b"\0"
    return members


@pytest.mark.parametrize("name", ["data.zip", "data.tar", "data.tar.gz", "data.tgz", "data.tar.bz2",
                                  "data.tar.xz", "data.tar.zst", "DATA.ZIP"])
def test_archives_read_like_the_folder(tmp_path: Path, name: str) -> None:
    """Same rows as the folder of the same files; members are never written under their names."""
    prefix = "./" if "tar" in name else "data/"  # `tar -C dir .` and a wrapper folder
    members = _tree_members(prefix)
    archive = _write_archive(tmp_path / name, members)
    before = archive.stat().st_mtime_ns
    result, manifest = _run([archive], tmp_path / "data")
    assert result.counts == {"ok": 12, "not_image": 1}
    assert manifest.groupby(["split", "label"]).size().to_dict() == {
        (s, lab): 2 + (s == "train" and lab == LABELS[1]) for s in ("train", "test") for lab in LABELS}
    assert all(u.startswith(f"{archive}!") for u in manifest["url"])
    for url, sha in zip(manifest["url"], manifest["sha256"], strict=True):
        body = members[url.split("!", 1)[1]]
        assert not sha or sha == hashlib.sha256(body).hexdigest()  # PNGs are stored byte for byte
    kinds = {f["kind"] for f in result.report["skipped"]["files"]}
    assert kinds == {"hidden", "outside_class_folders"}
    written = {p.relative_to(tmp_path / "data").parts[0] for p in (tmp_path / "data").rglob("*")}
    assert written <= {"images", ".tmp", "manifest.parquet", "download_report.json", ".state.sqlite",
                       ".state.sqlite-wal", ".state.sqlite-shm", ".state.sqlite.lock"}
    assert archive.stat().st_mtime_ns == before
    again = download.run(dataclasses.replace(_opts(), sources=[archive], out=tmp_path / "data"))
    assert again.fetched == 0 and again.counts == result.counts


def test_the_first_bytes_decide_how_an_archive_is_read(tmp_path: Path) -> None:
    """A .tgz that is a plain tar and a .tar that is gzipped are read all the same."""
    members = {"cls/a.png": _pngs(1)[0].read_bytes()}
    plain = _write_archive(tmp_path / "x.tar", members).rename(tmp_path / "plain.tgz")
    gzipped = _write_archive(tmp_path / "y.tar.gz", members).rename(tmp_path / "gzipped.tar")
    for archive in (plain, gzipped):
        result = download.run(dataclasses.replace(_opts(), sources=[archive], out=tmp_path / archive.stem))
        assert result.counts == {"ok": 1}, archive


def test_a_data_dir_is_not_an_image_folder(tmp_path: Path) -> None:
    tree = split_tree(tmp_path / "tree", n=1)
    download.run(dataclasses.replace(_opts(), sources=[tree], out=tmp_path / "data"))
    with pytest.raises(DataError, match="is a data directory .* use it as --data"):
        download.run(dataclasses.replace(_opts(), sources=[tmp_path / "data"], out=tmp_path / "again"))


def test_a_corrupt_archive_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "bad.zip").write_bytes(b"PK\3\4 definitely not a zip")
    with pytest.raises(DataError, match=r"bad\.zip: not a readable zip archive"):
        download.run(dataclasses.replace(_opts(), sources=[tmp_path / "bad.zip"], out=tmp_path / "d"))
    good = _write_archive(tmp_path / "cut.tar.gz", _tree_members())
    good.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    result = download.run(dataclasses.replace(_opts(), sources=[good],
                                              out=tmp_path / "d2"))  # what was read stays; the cut is listed
    assert result.counts.get("ok", 0) > 0
    assert result.report["skipped"]["by_kind"].get("unreadable_archive") == 1


# -- hostile archives, in a child under RLIMIT_AS ----------------------------------------------------------
def _zip_with_symlink(path: Path, png: bytes) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("cls/ok.png", png)
        link = zipfile.ZipInfo("cls/link.png")
        link.create_system, link.external_attr = 3, (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
        zf.writestr("../escape.png", png)
        zf.writestr("/abs.png", png)
        zf.writestr("C:/windows.png", png)
        zf.writestr("cls\\..\\..\\backslash.png", png)
        zf.writestr("cls/bomb.bmp", b"\0" * 15_000_000, compress_type=zipfile.ZIP_DEFLATED)  # 1000:1


def _zip_overlapping(path: Path, png: bytes) -> None:
    """Three central-directory entries that all point at one member's data (CVE-2024-0450)."""
    _write_archive(path, {"cls/kernel.png": png})
    raw = bytearray(path.read_bytes())
    cd_at = raw.rindex(b"PK\x01\x02")
    eocd_at = raw.rindex(b"PK\x05\x06")
    entry = bytes(raw[cd_at:eocd_at])
    entries = [entry] + [entry.replace(b"cls/kernel.png", f"cls/copy{i}0.png".encode()) for i in range(2)]
    eocd = bytearray(raw[eocd_at:])
    eocd[8:10] = eocd[10:12] = (3).to_bytes(2, "little")
    eocd[12:16] = sum(map(len, entries)).to_bytes(4, "little")
    path.write_bytes(bytes(raw[:cd_at]) + b"".join(entries) + bytes(eocd))


def _zip_lying_size(path: Path) -> None:
    """A member declaring 4 KB that inflates to 50 MB: zipfile stops at the declared size."""
    _write_archive(path, {"cls/liar.png": b"\0" * 50_000_000})
    raw = bytearray(path.read_bytes())
    cd_at = raw.rindex(b"PK\x01\x02")
    raw[cd_at + 24: cd_at + 28] = (4096).to_bytes(4, "little")
    path.write_bytes(bytes(raw))


def _tar_hostile(path: Path, png: bytes) -> None:
    with tarfile.open(path, "w") as tar:
        for name in ("cls/ok.png", "../escape.png", "/abs.png", "cls/../../up.png"):
            tar.addfile(_tar_info(name, png), io.BytesIO(png))
        tar.addfile(_tar_info("cls/sym.png", kind=tarfile.SYMTYPE, link="/etc/passwd"))
        tar.addfile(_tar_info("cls/hard.png", kind=tarfile.LNKTYPE, link="cls/ok.png"))
        tar.addfile(_tar_info("cls/dev.png", kind=tarfile.CHRTYPE))
        tar.addfile(_tar_info("cls/fifo.png", kind=tarfile.FIFOTYPE))


def _tgz_bomb(path: Path) -> None:
    """A tar.gz whose members decompress far past the (lowered) archive cap."""
    import gzip

    with gzip.open(path, "wb", compresslevel=1) as gz, tarfile.open(fileobj=gz, mode="w|") as tar:
        zeros = b"\0" * 30_000_000
        for i in range(4):
            tar.addfile(_tar_info(f"cls/zeros{i}.bmp", zeros), io.BytesIO(zeros))


CHILD = """
import json, resource, sys
from pathlib import Path
limit = 768 << 20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from imgclf.stages import download
from imgclf.download import _archive
_archive.TOTAL_FLOOR = 64_000_000  # the cap of a small archive: max(floor, 100 x its size)
srcs, out = [Path(p) for p in sys.argv[2:]], Path(sys.argv[1])
result = download.run(download.DownloadOptions(sources=srcs, out=out, show_progress=False, print_summary=False,
                                                          processes=1, max_bytes=20_000_000))
print(json.dumps(result.counts))
"""


def test_hostile_archives_are_refused_or_bounded(tmp_path: Path) -> None:
    png = _pngs(1)[0].read_bytes()
    evil = tmp_path / "evil"
    evil.mkdir()
    _zip_with_symlink(evil / "links.zip", png)
    _zip_overlapping(evil / "overlap.zip", _pngs(1, 5)[0].read_bytes())
    _zip_lying_size(evil / "liar.zip")
    _tar_hostile(evil / "hostile.tar", _pngs(1, 7)[0].read_bytes())
    _tgz_bomb(evil / "bomb.tar.gz")
    sources = sorted(evil.iterdir())
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "data"), *map(str, sources)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = pd.read_parquet(tmp_path / "data" / "manifest.parquet")
    report = json.loads((tmp_path / "data" / "download_report.json").read_text())
    status = {u.split("!", 1)[1]: (s, e) for u, s, e in zip(manifest["url"], manifest["status"], manifest["error"],
                                                            strict=True)}
    assert status["cls/ok.png"][0] in ("ok", "duplicate")
    assert status["cls/bomb.bmp"][0] == "too_large" and "ratio" in status["cls/bomb.bmp"][1]
    assert status["cls/liar.png"][0] == "unreadable"  # the CRC check fails at the declared size
    assert status["cls/zeros0.bmp"][0] == "too_large"  # 30 MB > --max-bytes: skipped, never kept
    unsafe = {f["path"].split("!", 1)[1]: f["reason"] for f in report["skipped"]["files"]
              if f["kind"] in ("unsafe_member", "unreadable_archive")}
    for name in ("../escape.png", "/abs.png", "C:/windows.png", "cls\\..\\..\\backslash.png", "cls/link.png",
                 "cls/kernel.png", "cls/copy00.png", "cls/copy10.png", "cls/../../up.png", "cls/sym.png",
                 "cls/hard.png", "cls/dev.png", "cls/fifo.png"):
        assert name in unsafe, name
    assert "overlaps" in unsafe["cls/kernel.png"] and "symlink" in unsafe["cls/sym.png"]
    assert any("decompresses to more than" in reason for reason in unsafe.values())  # the tar.gz cap
    # Nothing escaped: no file was created anywhere but DATA_DIR/images (named by hash) and the state.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "evil"]
    assert sorted(p.name for p in evil.iterdir()) == [p.name for p in sources]
    for path in (tmp_path / "data" / "images").rglob("*"):
        assert path.is_dir() or len(path.stem) == 64


# -- tables of paths, column mapping ------------------------------------------------------------------------
def test_table_with_paths_and_column_mapping(tmp_path: Path) -> None:
    files = _copy(_pngs(4), tmp_path / "lists" / "img")
    os.mkfifo(tmp_path / "lists" / "img" / "fifo.png")
    table = tmp_path / "lists" / "mine.csv"
    pd.DataFrame({"File": ["img/" + f.name for f in files] + ["img/missing.png", "img/fifo.png", str(files[0])],
                  "Class": ["a", "a", "b", "b", "a", "b", "a"],
                  "Subset": ["train", "valid", "test", "", "train", "train", "train"]}).to_csv(table, index=False)
    options = _opts(path_col="file", label_col="CLASS", split_col="subset")
    result = download.run(dataclasses.replace(options, sources=[table], out=tmp_path / "data"))
    manifest = pd.read_parquet(result.manifest_path)
    assert manifest["status"].tolist() == ["ok"] * 4 + ["unreadable", "unreadable", "duplicate"]
    assert manifest["split"].tolist() == ["train", "val", "test", "train", "train", "train", "train"]
    assert manifest["url"].iloc[0] == str(tmp_path / "lists" / "img" / files[0].name)  # relative to the table
    assert "FIFO" in manifest["error"].iloc[5] and manifest["error"].iloc[4]
    with pytest.raises(DataError, match=r"no column 'image' \(--path-col\); columns: file, class, subset"):
        download.run(dataclasses.replace(_opts(path_col="image"), sources=[table], out=tmp_path / "d2"))
    with pytest.raises(DataError, match=r"missing column\(s\) url \(or path\), label"):
        download.run(dataclasses.replace(_opts(), sources=[table], out=tmp_path / "d3"))


def test_parquet_paths_mixed_with_a_folder_and_an_archive(tmp_path: Path) -> None:
    files = _copy(_pngs(2, 30), tmp_path / "pq" / "x")
    table = tmp_path / "pq" / "t.parquet"
    pd.DataFrame({"path": [f"x/{f.name}" for f in files], "label": ["p", "q"]}).to_parquet(table)
    tree = split_tree(tmp_path / "tree", n=1)
    archive = _write_archive(tmp_path / "more.zip", {"z/1.png": _pngs(1, 40)[0].read_bytes()})
    result, manifest = _run([table, tree, archive], tmp_path / "data")
    assert result.counts == {"ok": 2 + 11 + 1}
    assert manifest["row"].tolist() == list(range(14))
    assert manifest["source"].tolist() == [str(table)] * 2 + [str(tree)] * 11 + [str(archive)]


def test_leakage_between_split_folders_is_reported(tmp_path: Path) -> None:
    tree = split_tree(tmp_path / "tree", n=1)
    leaked = next((tree / "train" / LABELS[0]).glob("*.png"))
    shutil.copy(leaked, tree / "test" / LABELS[0] / "copy.png")
    result, _ = _run([tree], tmp_path / "data")
    assert result.report["leakage"]["images"] == 1 and result.counts["duplicate"] == 1


# -- incremental and resume ----------------------------------------------------------------------------------
def test_rerun_processes_only_new_and_changed_files(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    first = _copy(_pngs(6), tree / "a")
    result, _ = _run([tree], tmp_path / "data")
    assert result.fetched == 6
    assert download.run(dataclasses.replace(_opts(), sources=[tree], out=tmp_path / "data")).fetched == 0
    _copy(_pngs(3, 6), tree / "b")  # added
    shutil.copy(_pngs(1, 20)[0], first[0])  # changed content (size/mtime differ)
    os.utime(first[0], ns=(1, 1))
    first[1].unlink()  # removed
    again, manifest = _run([tree], tmp_path / "data")
    assert again.fetched == 4 and again.counts == {"ok": 8}
    changed = manifest[manifest["url"] == str(first[0])].iloc[0]
    assert changed["sha256"] == hashlib.sha256(first[0].read_bytes()).hexdigest()
    assert str(first[1]) not in set(manifest["url"])


def test_sigkill_mid_run_then_resume(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    gradient = Image.linear_gradient("L").resize((640, 640))
    for i in range(240):  # slow enough to kill mid-run: 640x640 JPEGs resized to 32 px, one worker
        img = Image.merge("RGB", (gradient, gradient, Image.new("L", gradient.size, i)))  # distinct
        (tree / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        img.save(tree / f"c{i % 3}" / f"{i}.jpg", "JPEG", quality=85)
    out = tmp_path / "data"
    cmd = [sys.executable, "-m", "imgclf", "download", str(tree), "--out", str(out), "--no-progress",
           "--processes", "1", "--size", "32", "--image-format", "png"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = out / download.STATE_NAME
    deadline = time.monotonic() + 60
    while len(state_urls(state)) < 30 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    done = len(state_urls(state))
    assert 30 <= done < 240, f"kill did not land mid-run ({done} finished)"
    assert not (out / "manifest.parquet").exists()
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    report = json.loads((out / "download_report.json").read_text())
    assert report["counts"] == {"ok": 240}
    assert report["fetched_this_run"] == 240 - done  # finished files were not processed again
    manifest = pd.read_parquet(out / "manifest.parquet")
    stored = {p.relative_to(out).as_posix() for p in (out / "images").glob("*/*")}
    assert stored == set(manifest["path"])  # no orphan, no missing file
    assert not any((out / ".tmp").glob("*")) if (out / ".tmp").exists() else True


# -- CLI: exit status and the hint of train --------------------------------------------------------------------
def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """`imgclf ARGS` in this process (what `python -m imgclf` exits with), and its stderr."""
    from imgclf.cli import main

    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


def test_exit_status_is_non_zero_when_no_row_is_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad" / "cls").mkdir(parents=True)
    (tmp_path / "bad" / "cls" / "a.txt").write_text("text")
    (tmp_path / "bad" / "cls" / "b.png").write_bytes(b"")
    (tmp_path / "bad" / "loose.png").write_bytes(_pngs(1)[0].read_bytes())
    code, err = _cli(capsys, "download", str(tmp_path / "bad"), "--out", str(tmp_path / "d"), "--no-progress")
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert "no row ended ok" in last and "1 not_image" in last and "1 empty" in last
    assert "skipped: 1 outside_class_folders" in last
    good = split_tree(tmp_path / "good", n=1)
    assert _cli(capsys, "download", str(good), "--out", str(tmp_path / "d2"), "--no-progress")[0] == 0
    code, err = _cli(capsys, "download", str(tmp_path / "nope"), "--out", str(tmp_path / "d3"))
    assert code == 2 and "source not found" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("kind", ["folder", "archive"])
def test_train_on_images_without_a_manifest_prints_the_command(tmp_path: Path, kind: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    tree = split_tree(tmp_path / "my photos", n=1)
    data = tree if kind == "folder" else _write_archive(tmp_path / "pics.zip", {"a/1.png": _pngs(1)[0].read_bytes()})
    with pytest.raises(DataError) as err:
        read_manifest(data)
    stem = "my photos" if kind == "folder" else "pics"
    assert f"imgclf download '{data}' --out '{tmp_path / stem}_data'" in str(err.value) or \
        f"imgclf download {data} --out {tmp_path / stem}_data" in str(err.value)
    # `train --data FOLDER` no longer stops here: it ingests the folder for the user (test_train_folder.py).


def test_unreadable_is_a_documented_status() -> None:
    assert "unreadable" in STATUSES
    assert _archive.safe_parts("./a/./b.png") == (("a", "b.png"), "")
    assert _archive.safe_parts("a/../../b.png")[1] and _archive.safe_parts("/etc/x")[1]
