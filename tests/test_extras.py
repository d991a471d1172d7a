"""A missing optional package is one line naming `pip install 'imgclf[extra]'`, never a traceback.

Each case runs the real command in a child process where the package's import is blocked
(`sys.modules[name] = None` makes `import name` fail as if it were not installed).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import demo_images

ROOT = Path(__file__).resolve().parents[1]


def _run_blocked(blocked: list[str], code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    prelude = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in blocked)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "IMGCLF_NO_BARS": "1"}
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def _cli(blocked: list[str], argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return _run_blocked(blocked, f"from imgclf.cli import main\nsys.exit(main({argv!r}))\n", cwd)


def _one_line(proc: subprocess.CompletedProcess[str], extra: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"pip install 'imgclf[{extra}]'" in lines[0], lines[0]
    return lines[0]


def test_serve_without_fastapi(tiny_run: Path, tmp_path: Path) -> None:
    proc = _cli(["fastapi"], ["serve", "--model", str(tiny_run), "--port", "0"], tmp_path)
    assert proc.returncode == 2
    assert _one_line(proc, "serve").startswith("imgclf serve: error: serve needs fastapi")


def test_onnx_predict_and_export_without_the_onnx_packages(tiny_run: Path, tmp_path: Path) -> None:
    image = demo_images("test", "Bag", 1)[0]
    export = _cli(["onnx", "onnxruntime"], ["export", "--model", str(tiny_run), "-o", str(tmp_path / "m.onnx")],
                  tmp_path)
    assert export.returncode == 2 and "needs onnx" in _one_line(export, "export")
    assert not (tmp_path / "m.onnx").exists()
    # A real ONNX file, written where onnx is installed, then predicted where onnxruntime is not.
    written = _cli([], ["export", "--model", str(tiny_run), "-o", str(tmp_path / "m.onnx")], tmp_path)
    assert written.returncode == 0, written.stderr[-2000:]
    proc = _cli(["onnxruntime"], ["predict", str(image), "--model", str(tmp_path / "m.onnx")], tmp_path)
    assert proc.returncode == 2 and "an ONNX model needs onnxruntime" in _one_line(proc, "export")


def test_audit_without_cleanlab_from_the_cli_and_the_api(tiny_data_dir: Path, tmp_path: Path) -> None:
    proc = _cli(["cleanlab"], ["audit", "--data", str(tiny_data_dir), "--out", str(tmp_path / "a")], tmp_path)
    assert proc.returncode == 2 and "audit needs cleanlab" in _one_line(proc, "audit")
    api = _run_blocked(["cleanlab"], f"import imgclf\nimgclf.audit({str(tiny_data_dir)!r}, 'a')\n", tmp_path)
    assert api.returncode == 1
    last = api.stderr.strip().splitlines()[-1]
    assert last.startswith("imgclf.errors.MissingExtra: audit needs cleanlab") and "imgclf[audit]" in last
    assert not (tmp_path / "a").exists()


def test_ray_engine_without_ray(tmp_path: Path) -> None:
    source = tmp_path / "photos" / "Bag"
    source.mkdir(parents=True)
    (source / "a.png").write_bytes(demo_images("train", "Bag", 1)[0].read_bytes())
    proc = _cli(["ray"], ["download", str(tmp_path / "photos"), "--out", str(tmp_path / "d"), "--engine", "ray"],
                tmp_path)
    assert proc.returncode == 2 and "Ray" in _one_line(proc, "ray")


def test_object_storage_without_s3fs(tmp_path: Path) -> None:
    proc = _cli(["s3fs"], ["train", "--data", "s3://bucket/data", "--out", str(tmp_path / "r")], tmp_path)
    assert proc.returncode == 2 and "s3://bucket/data" in _one_line(proc, "s3")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("name", ["fastapi", "onnxruntime", "cleanlab", "s3fs", "ray", "timm", "mlflow"])
def test_every_extra_has_a_hint(name: str) -> None:
    from imgclf.errors import missing_extra

    err = missing_extra(ModuleNotFoundError(f"No module named '{name}'", name=name))
    assert err is not None and "pip install 'imgclf[" in str(err) and "\n" not in str(err)
    assert missing_extra(ModuleNotFoundError("No module named 'numpyy'", name="numpyy")) is None
