"""The audit's rows at scale (issue 25 item 2; imgclf.audit._rows): above the bound the audit refuses
in one line naming the size and `--sample`; a sample is seeded per image and the same whether the
manifest is one file or parts (read by streaming passes); --apply refuses a parts manifest."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import TINY_CLASSES
from helpers import make_data_dir
from test_scale_stream import to_parts

from imgclf import hashsplit
from imgclf.audit import _rows
from imgclf.errors import DataError
from imgclf.stages import audit


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("au")
    single = make_data_dir(tmp / "single", TINY_CLASSES, n_train=24, n_test=10)
    shutil.copytree(single, tmp / "parts")
    return single, tmp / "parts", to_parts(tmp / "parts", 11)


def test_above_the_bound_the_audit_refuses_in_one_line(both, tmp_path: Path, monkeypatch) -> None:
    single, parts, _ = both
    monkeypatch.setattr(_rows, "MAX_IMAGES", 50)
    for where in (single, parts):
        with pytest.raises(DataError, match=r"^\S+: 102 usable images, more than the audit analyses at once "
                                            r"\(50: .*\); audit a seeded sample with --sample 50$"):
            audit.run(audit.AuditOptions(data=where, out=tmp_path / "audit"))
    assert not (tmp_path / "audit").exists()


def test_a_sample_is_seeded_per_image_and_the_same_for_one_file_and_parts(both) -> None:
    single, parts, frame = both
    got = _rows.usable(parts, sample=40, seed=5)
    ok = frame[frame["status"] == "ok"]
    want = ok[hashsplit.ValRule(5, 40 / 102).is_val(ok["sha256"].tolist())]
    assert got["row"].tolist() == want["row"].tolist() and 20 < len(got) < 60
    assert got.equals(_rows.usable(single, sample=40, seed=5))  # every column, typed alike
    assert _rows.usable(parts, sample=40, seed=6)["row"].tolist() != got["row"].tolist()
    assert _rows.usable(parts)["row"].tolist() == ok["row"].tolist()  # under the bound: every row


def test_apply_refuses_a_parts_manifest(both, tmp_path: Path) -> None:
    _, parts, _ = both
    with pytest.raises(DataError, match="written as parts; --apply cannot rewrite it"):
        audit.run(audit.AuditOptions(data=parts, out=tmp_path / "audit", apply=True))
