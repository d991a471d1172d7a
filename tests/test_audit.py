"""imgclf audit on real Fashion-MNIST images: flipped labels are found, re-encoded copies are leakage,
audit.html renders in headless Chromium, data.exclude and --apply change what train reads, and bad
inputs are one-line errors. The embedding model is the shipped weights (local, no network); one
test trains a tiny model on the data instead."""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import make_data_dir
from PIL import Image

from imgclf import auditdir
from imgclf.audit import _duplicates
from imgclf.cli import main
from imgclf.data import make_split
from imgclf.errors import DataError
from imgclf.manifest import read_manifest, write_manifest
from imgclf.stages import audit

pytest.importorskip("cleanlab")
pytest.importorskip("imagehash")

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "weights" / "fashion_mnist_mobilenet_v3_small.pt"
AUDIT_CLASSES = ["Bag", "Sneaker", "Trouser"]  # easy to tell apart: a flip is an unambiguous error


def _store(data_dir: Path, payload: bytes, ext: str) -> tuple[str, str]:
    sha = hashlib.sha256(payload).hexdigest()
    rel = f"images/{sha[:2]}/{sha}.{ext}"
    (data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
    (data_dir / rel).write_bytes(payload)
    return sha, rel


def build_noisy(dest: Path) -> tuple[Path, set[int], list[tuple[int, int]]]:
    """3 classes x 20 train + 6 test real images; 4 train labels flipped; 3 train images copied into
    test as JPEG re-encodes (one also resized). Returns (DATA_DIR, flipped rows, (original, copy) rows)."""
    data = make_data_dir(dest, AUDIT_CLASSES, n_train=20, n_test=6)
    m = read_manifest(data)
    train = m.index[m["split"] == "train"].to_numpy()
    flips = train[[1, 22, 43, 50]]
    for i in flips:
        m.at[i, "label"] = AUDIT_CLASSES[(AUDIT_CLASSES.index(m.at[i, "label"]) + 1) % 3]
    copies, rows = [], []
    for n, i in enumerate(train[[5, 27, 48]]):
        with Image.open(data / m.at[i, "path"]) as im:
            im = im.convert("RGB")
            if n == 2:
                im = im.resize((56, 56), Image.BICUBIC)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=80)
        sha, rel = _store(data, buf.getvalue(), "jpg")
        row = {**m.loc[i].to_dict(), "row": len(m) + n, "split": "test", "sha256": sha, "path": rel,
               "url": f"http://example.invalid/copy{n}.jpg", "bytes": len(buf.getvalue())}
        rows.append(row)
        copies.append((int(m.at[i, "row"]), row["row"]))
    write_manifest(pd.concat([m, pd.DataFrame(rows)], ignore_index=True), data)
    return data, {int(m.at[i, "row"]) for i in flips}, copies


@pytest.fixture(scope="module")
def noisy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[int], list[tuple[int, int]]]:
    return build_noisy(tmp_path_factory.mktemp("audit") / "data")


@pytest.fixture(scope="module")
def audited(noisy, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, pd.DataFrame]:
    data, _, _ = noisy
    out = tmp_path_factory.mktemp("audit_out") / "audit"
    result = audit.run(audit.AuditOptions(data=data, out=out, model=SHIPPED))
    return out, result, auditdir.read_findings(out / auditdir.CSV)


def test_flipped_labels_are_found_with_the_true_label_suggested(noisy, audited) -> None:
    data, flips, _ = noisy
    out, result, findings = audited
    assert list(pd.read_csv(out / auditdir.CSV).columns) == list(auditdir.COLUMNS)
    issues = findings[findings["kind"] == "label_issue"]
    found = set(issues["row"]) & flips
    assert len(found) >= 3, issues  # recall >= 0.75 on unambiguous flips
    assert len(set(issues.loc[issues["split"] == "train", "row"]) - flips) <= 2  # precision
    original = read_manifest(data).set_index("row")
    for r in issues[issues["row"].isin(flips)].itertuples():
        true = AUDIT_CLASSES[(AUDIT_CLASSES.index(original.at[r.row, "label"]) - 1) % 3]
        assert r.suggested == true and r.action == "drop" and 0.5 < r.score <= 1.0
    assert result["counts"]["label_issue"] == len(issues)
    assert {c["class"] for c in result["label_issues_by_class"]} == set(AUDIT_CLASSES)


def test_reencoded_copies_are_found_as_leakage(noisy, audited) -> None:
    _, _, copies = noisy
    _, result, findings = audited
    leak = findings[findings["kind"] == "leakage"]
    group_of = dict(zip(leak["row"], leak["group"], strict=True))
    for original, copy in copies:
        assert original in group_of and group_of[original] == group_of.get(copy), (original, copy)
    assert set(leak.loc[leak["split"] == "train", "action"]) == {"drop"}  # the training copy goes
    assert set(leak.loc[leak["split"] == "test", "action"]) == {"keep"}  # the test set stays as it was
    assert result["counts"]["leakage"] == len(leak) >= 6


def test_duplicate_pairs_on_hashes() -> None:
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, size=(50, 3, 4), dtype=np.int64).astype(np.uint64)
    hashes[7] = hashes[3]
    hashes[7, 0, 3] ^= np.uint64(0b1011)  # 3 high-frequency bits differ
    hashes[20, 0] = hashes[11, 2]  # 20 is a centred crop of 11
    pairs, sim = _duplicates.duplicate_pairs(hashes, np.ones(50, bool), _duplicates.DuplicateSettings())
    assert pairs.tolist() == [[3, 7], [11, 20]]
    assert sim[0] == pytest.approx(1 - 3 / 256) and sim[1] == 1.0
    assert _duplicates.group(50, pairs)[[3, 7, 11, 20, 0]].tolist() == [0, 0, 1, 1, -1]


@pytest.mark.browser
def test_audit_html_renders_offline_in_chromium(audited, tmp_path: Path) -> None:
    from test_report import open_in_chromium

    out, result, findings = audited
    info = open_in_chromium(out / auditdir.HTML, tmp_path / "audit.png")
    assert info["problems"] == []  # no console error, no dialog, no network request
    assert info["scripts"] == 0
    assert info["images"] and all(i["src"].startswith("data:image/png;base64") and i["w"] > 0
                                  for i in info["images"])
    shown = min(len(findings[findings["kind"].isin(["label_issue", "leakage", "conflict", "near_duplicate",
                                                         "outlier"])]), 10_000)
    assert len(info["images"]) == shown  # one thumbnail per finding (all fit in the galleries here)
    assert "Label issues" in info["text"] and "Train/test leakage" in info["text"]
    assert "suggested:" in info["text"]


def test_exclude_changes_what_train_reads(noisy, audited) -> None:
    from conftest import tiny_config

    from imgclf.train._inputs import make_split as train_split

    data, flips, copies = noisy
    out, _, findings = audited
    before = make_split(data, 0.15, 0)
    config = tiny_config(f"data.exclude={out / auditdir.CSV}")
    after = train_split(config, data, out / "unused-run", resume=False)  # what train.run reads
    dropped = set(findings.loc[findings["action"].isin(["drop", "relabel"]), "row"])
    assert set(before["row"]) - set(after["row"]) == dropped & set(before["row"])
    assert flips & set(before["row"]) - set(after["row"])
    assert {o for o, _ in copies} <= dropped
    # A hand-made list works too; a stale one (another image in the row) is refused with one line.
    manual = out.parent / "manual.csv"
    manual.write_text("row\n0\n2\n")
    assert set(make_split(data, 0.15, 0, manual)["row"]) == set(before["row"]) - {0, 2}
    stale = out.parent / "stale.csv"
    stale.write_text(f"row,sha256\n0,{'0' * 64}\n")
    with pytest.raises(DataError, match="row 0 now holds another image"):
        make_split(data, 0.15, 0, stale)


def test_apply_writes_the_manifest_and_keeps_the_original(noisy, audited, tmp_path: Path, capsys) -> None:
    data, flips, _ = noisy
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    code = main(["audit", "--data", str(copy), "--out", str(tmp_path / "a"), "--model", str(SHIPPED), "--apply",
                 "--relabel"])
    assert code == 0, capsys.readouterr().err
    assert "applied to the manifest" in capsys.readouterr().out
    after = read_manifest(copy).set_index("row")
    before = pd.read_parquet(copy / "manifest.before-audit.parquet").set_index("row")
    findings = auditdir.read_findings(tmp_path / "a" / auditdir.CSV)
    relabelled = findings[findings["action"] == "relabel"]
    assert len(relabelled) and (after.loc[relabelled["row"], "label"].to_numpy()
                                == relabelled["suggested"].to_numpy()).all()
    assert (before.loc[list(flips), "label"] != after.loc[list(flips), "label"]).sum() >= 3
    dropped = findings.loc[findings["action"] == "drop", "row"]
    assert (after.loc[dropped, "status"] == "excluded").all() and len(dropped)
    assert (before.loc[dropped, "status"] == "ok").all()
    assert not set(dropped) & set(make_split(copy, 0.15, 0)["row"])  # train no longer reads them


def _one_line_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, (code, err)
    return err


def test_bad_inputs_are_one_line_errors(tmp_path: Path, capsys) -> None:
    data = make_data_dir(tmp_path / "d", ["Bag", "Coat"], n_train=3, n_test=0)
    m = read_manifest(data)
    out = ["--out", str(tmp_path / "out"), "--model", str(SHIPPED)]

    broken = m.assign(status="not_image")
    write_manifest(broken, data)
    assert "no images with status ok" in _one_line_error(capsys, ["audit", "--data", str(data), *out])

    write_manifest(m.assign(label="Bag"), data)
    assert "one class only ('Bag')" in _one_line_error(capsys, ["audit", "--data", str(data), *out])

    write_manifest(m.assign(label=["Bag", "Zebra", "Unicorn"] * 2), data)
    err = _one_line_error(capsys, ["audit", "--data", str(data), *out])
    assert "the model's classes differ" in err and "'Unicorn', 'Zebra'" in err

    write_manifest(m, data)
    (tmp_path / "file").write_text("not a folder")
    err = _one_line_error(capsys, ["audit", "--data", str(data), "--out", str(tmp_path / "file"),
                                   "--model", str(SHIPPED)])
    assert "not a folder" in err
    assert "--folds 1" in _one_line_error(capsys, ["audit", "--data", str(data), *out, "--folds", "1"])


def test_bad_exclude_config_is_one_line(tmp_path: Path, capsys) -> None:
    data = make_data_dir(tmp_path / "d", ["Bag", "Coat"], n_train=3, n_test=0)
    run = ["train", "--data", str(data), "--out", str(tmp_path / "run")]
    err = _one_line_error(capsys, [*run, "data.exclude=rows.txt"])
    assert "data.exclude" in err
    err = _one_line_error(capsys, [*run, f"data.exclude={tmp_path / 'missing.csv'}", "trainer.epochs=1"])
    assert "missing.csv: no such audit file" in err
    assert not (tmp_path / "run").exists()  # refused before the run directory is made


@pytest.mark.slow
def test_without_a_model_trains_one_and_a_rerun_reuses_the_cache(tmp_path: Path) -> None:
    data, flips, _ = build_noisy(tmp_path / "data")
    opts = audit.AuditOptions(data=data, out=tmp_path / "audit", overrides=[
        "model.arch=resnet18", "data.image_size=32", "trainer.epochs=2", "data.num_workers=0",
        "trainer.batch_size=16", "trainer.max_time_minutes=null"])
    first = audit.run(opts)
    assert first["model"]["trained_for_audit"] and (tmp_path / "audit" / auditdir.EMBEDDER / "run.json").is_file()
    assert first["cache"]["reused_images"] == 0
    again = audit.run(opts)
    assert again["cache"]["reused_images"] == again["images"]  # nothing re-embedded, nothing retrained
    assert again["counts"] == first["counts"]
