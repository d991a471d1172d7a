"""Hostile inputs to `imgclf predict`, run as a child process under RLIMIT_AS (issue 10: classes 1, 3, 4, 5, 7).

Every case asserts what the user gets (rows, exit status, one-line errors) and that it came in
bounded time and memory: the child's peak RSS (VmHWM) and an address-space limit that a
regression (13 GB from /dev/zero, 3 GB for one 1 x 200,000 strip) would hit.
"""

from __future__ import annotations

import csv
import io
import json
import os
import socket
from pathlib import Path

from helpers import demo_images
from hostile import (
    CSV_INJECTION_LABELS,
    extreme_aspect_png,
    fifo,
    huge_header_jpeg,
    many_frames_gif,
    many_pages_tiff,
    non_utf8_name,
    run_cli,
    symlink_loops,
)

MEMORY_MIB = 8192  # address space: torch maps ~5 GB of it before reading any image
PEAK_MIB = 2000  # resident: the model and torch take ~0.5-1.2 GB here


def _good() -> bytes:
    return demo_images("test", "Bag", 1)[0].read_bytes()


def _rows(text: str) -> dict[str, dict[str, str]]:
    return {row["input"]: row for row in csv.DictReader(io.StringIO(text))}


def _predict(tiny_run: Path, *inputs: str, extra: tuple[str, ...] = ()):
    return run_cli(["predict", "--model", str(tiny_run), "--no-progress", *extra, *inputs], MEMORY_MIB)


def test_costly_images_are_error_rows_and_the_batch_goes_on(tiny_run: Path, tmp_path: Path) -> None:
    files = {"good.png": _good(), "strip.png": extreme_aspect_png(1, 200_000),
             "strip60k.png": extreme_aspect_png(1, 60_000), "header.jpg": huge_header_jpeg(),
             "frames.gif": many_frames_gif(), "pages.tif": many_pages_tiff()}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    result = _predict(tiny_run, *(str(tmp_path / n) for n in files))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = _rows(result.stdout)
    assert rows[str(tmp_path / "good.png")]["status"] == "ok"
    for name in ("strip.png", "strip60k.png", "header.jpg"):
        assert rows[str(tmp_path / name)]["status"] == "too_large", name
    # Animations are not counted frame by frame: 200,000 GIF frames and 100,000 TIFF pages cost one frame.
    assert rows[str(tmp_path / "frames.gif")]["status"] == "ok" and rows[str(tmp_path / "pages.tif")]["status"] == "ok"
    assert result.peak_rss_mib < PEAK_MIB and result.seconds < 240


def test_special_files_are_never_read_and_loops_end(tiny_run: Path, tmp_path: Path) -> None:
    pipe = fifo(tmp_path / "pipe.png")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock.png"))
    folder = tmp_path / "adir.png"
    folder.mkdir()
    tree = symlink_loops(tmp_path / "tree", _good())
    table = tmp_path / "list.csv"
    table.write_text(f"path\n/dev/zero\n{pipe}\n{folder}\n{tmp_path / 'sock.png'}\n{tree / 'sub' / 'a.png'}\n")
    try:
        result = _predict(tiny_run, str(table), str(pipe), "/dev/zero", f"{tree}/**/*.png", str(tree))
    finally:
        sock.close()
    assert result.returncode == 0, result.stderr[-2000:]
    lines = list(csv.DictReader(io.StringIO(result.stdout)))
    errors = {row["input"]: row["error"] for row in lines if row["status"] == "unreadable"}
    assert "character device" in errors["/dev/zero"] and "FIFO" in errors[str(pipe)]
    assert "directory" in errors[str(folder)] and "socket" in errors[str(tmp_path / "sock.png")]
    ok = [row["input"] for row in lines if row["status"] == "ok"]
    # The looped tree holds one image: the CSV row, the glob and the folder each find it once.
    assert len(ok) == 3 and all(p.endswith("a.png") for p in ok)
    assert result.peak_rss_mib < PEAK_MIB and result.seconds < 240


def test_csv_inputs_refuse_shifted_rows_and_duplicate_columns(tiny_run: Path, tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(_good())
    for name, text, words in [
        ("extra.csv", f"path\n{image},extra\n", "line 2: 2 fields but the header has 1"),
        ("dup.csv", f"path,PATH\n{image},{image}\n", "appears twice"),
    ]:
        (tmp_path / name).write_text(text)
        result = _predict(tiny_run, str(tmp_path / name))
        assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr, name


def test_csv_cells_are_spreadsheet_safe_and_jsonl_keeps_raw_text(tiny_run: Path, tmp_path: Path) -> None:
    names = [label.replace("\t", "_").replace('"', "").replace("/", "_") + ".png" for label in CSV_INJECTION_LABELS]
    for name in names:
        (tmp_path / name).write_bytes(_good())
    inputs = list(names)
    out = tmp_path / "preds.csv"
    # `--`: a name starting with "-" is an input, not an option.
    result = run_cli(["predict", "--model", str(tiny_run), "--no-progress", "-o", str(out), "--", *inputs],
                     MEMORY_MIB, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    cells = [row[0] for row in csv.reader(io.StringIO(out.read_text()))][1:]
    for name, cell in zip(inputs, cells, strict=True):
        starts_like_a_formula = name[0] in "=+-@'"
        assert cell == ("'" + name if starts_like_a_formula else name)
    jsonl = tmp_path / "preds.jsonl"
    run_cli(["predict", "--model", str(tiny_run), "--no-progress", "-o", str(jsonl), "--", *inputs], MEMORY_MIB,
            cwd=str(tmp_path))
    assert [json.loads(line)["input"] for line in jsonl.read_text().splitlines()] == inputs


def test_a_file_name_that_is_not_utf8_round_trips_in_csv_jsonl_and_stdout(tiny_run: Path, tmp_path: Path) -> None:
    image = non_utf8_name(tmp_path / "in", _good())
    raw_name = os.fsencode(image)
    out_csv, out_jsonl = tmp_path / "p.csv", tmp_path / "p.jsonl"
    for out in (out_csv, out_jsonl):
        result = _predict(tiny_run, str(image), extra=("-o", str(out)))
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    first = out_csv.read_bytes().splitlines()[1]
    assert first.startswith(raw_name + b",ok,")  # the name's own bytes, exactly
    record = json.loads(out_jsonl.read_text())
    assert os.fsencode(record["input"]) == raw_name and record["status"] == "ok"
    stdout = _predict(tiny_run, str(image))
    assert stdout.returncode == 0 and os.fsencode(stdout.stdout.splitlines()[1].split(",")[0]) == raw_name
