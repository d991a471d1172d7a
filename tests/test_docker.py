"""Docker files: linted by hadolint and shellcheck, and the scripts' docker calls checked.

No Docker engine runs on the test machine, so the image is never built here. The scripts
are run for real with a `docker` stand-in first on PATH that records its arguments: that
checks what each script would ask Docker to do (mounts, ports, build args, commands).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
SCRIPTS = sorted(DOCKER.glob("*.sh"))
HADOLINT = shutil.which("hadolint") or str(ROOT / ".venv" / "bin" / "hadolint")


def test_hadolint_passes_on_the_dockerfile() -> None:
    result = subprocess.run([HADOLINT, "--no-color", str(DOCKER / "Dockerfile")], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_passes_on_every_script() -> None:
    assert {p.name for p in SCRIPTS} >= {"build.sh", "run.sh", "run_volume.sh", "serve.sh"}
    result = subprocess.run(["shellcheck", "--severity=style", *map(str, SCRIPTS)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_executable_and_strict(script: Path) -> None:
    assert script.stat().st_mode & stat.S_IXUSR
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text


def test_dockerfile_copies_only_what_exists_and_is_not_ignored() -> None:
    copies = [line.split()[1:-1] for line in (DOCKER / "Dockerfile").read_text().splitlines()
              if line.startswith("COPY ")]
    sources = [src for group in copies for src in group]
    assert "src/" in sources and "pyproject.toml" in sources
    optional = {src for src in sources if "[" in src}  # weight[s]: copied when present
    assert optional == {"weight[s]"}
    for src in set(sources) - optional:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    allowed = {line[1:].strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    wanted = {src.rstrip("/").replace("[s]", "s") for src in sources}
    assert wanted <= allowed, "every COPY source must be re-included by the allow-list .dockerignore"


@pytest.fixture
def fake_docker(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A `docker` first on PATH that writes each argument on its own line into a log file."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "docker_args.txt"
    stub = bindir / "docker"
    stub.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "{log}"\n')
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "IMGCLF_OUT": str(tmp_path / "out")}
    env.pop("IMGCLF_GPUS", None)
    return env, log


def _run(script: str, args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(DOCKER / script), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=30)


def test_build_sh_cpu_and_cuda(fake_docker, tmp_path: Path) -> None:
    env, log = fake_docker
    assert _run("build.sh", [], env, tmp_path).returncode == 0
    args = log.read_text().splitlines()
    assert args[0] == "build" and args[-1] == str(ROOT)
    assert args[args.index("--file") + 1] == str(DOCKER / "Dockerfile") and "imgclf:latest" in args
    assert not any(a.startswith("BASE_IMAGE=") for a in args)  # CPU: the Dockerfile's default base
    assert _run("build.sh", ["--cuda", "--tag", "me/imgclf:gpu"], env, tmp_path).returncode == 0
    args = log.read_text().splitlines()
    assert any(a.startswith("BASE_IMAGE=nvidia/cuda:") for a in args)
    assert any(a.startswith("TORCH_INDEX_URL=https://download.pytorch.org/whl/cu") for a in args)
    assert "me/imgclf:gpu" in args


def test_run_sh_defaults_to_the_demo_and_passes_commands(fake_docker, tmp_path: Path) -> None:
    env, log = fake_docker
    assert _run("run.sh", [], env, tmp_path).returncode == 0
    args = log.read_text().splitlines()
    assert args[0] == "run" and args[-1] == "imgclf:latest"  # no command: the image's CMD (demo) runs
    assert f"{tmp_path / 'out'}:/work" in args and (tmp_path / "out").is_dir()
    command = ["predict", "--model", "/app/weights/x.pt", "/work/a b.png"]  # a space survives quoting
    assert _run("run.sh", command, env, tmp_path).returncode == 0
    assert log.read_text().splitlines()[-5:] == ["imgclf:latest", *command]


def test_run_volume_sh_mounts_the_given_folder(fake_docker, tmp_path: Path) -> None:
    env, log = fake_docker
    usage = _run("run_volume.sh", [], env, tmp_path)
    assert usage.returncode == 2 and "DATA_DIR" in usage.stderr and not log.exists()
    data = tmp_path / "my data"
    data.mkdir()
    assert _run("run_volume.sh", [str(data)], env, tmp_path).returncode == 0
    args = log.read_text().splitlines()
    assert f"{data}:/data" in args
    default_command = ["train", "--data", "/data", "--out", "/work/runs/docker"]
    assert args[args.index("imgclf:latest") + 1:] == default_command
    assert _run("run_volume.sh", ["my data", "evaluate", "/work/runs/docker"], env, tmp_path).returncode == 0
    args = log.read_text().splitlines()
    # The relative "my data" became an absolute mount source (docker needs one).
    assert f"{data}:/data" in args and args[-2:] == ["evaluate", "/work/runs/docker"]


def test_serve_sh_publishes_locally_and_mounts_a_host_model(fake_docker, tmp_path: Path) -> None:
    env, log = fake_docker
    assert _run("serve.sh", [], env, tmp_path).returncode == 0
    args = log.read_text().splitlines()
    assert "127.0.0.1:8000:8000" in args
    tail = args[args.index("imgclf:latest") + 1:]
    assert tail[:3] == ["serve", "--model", "/app/weights/fashion_mnist_mobilenet_v3_small.pt"]
    assert tail[tail.index("--host") + 1] == "0.0.0.0"
    model = tmp_path / "exported" / "model.onnx"
    model.parent.mkdir()
    model.write_bytes(b"onnx")
    assert _run("serve.sh", [str(model), "9000", "--allow-private-urls"], env, tmp_path).returncode == 0
    args = log.read_text().splitlines()
    assert f"{model.parent}:/model:ro" in args and "127.0.0.1:9000:8000" in args
    assert "/model/model.onnx" in args and args[-1] == "--allow-private-urls"
    missing = _run("serve.sh", [str(tmp_path / "nope.onnx")], env, tmp_path)
    assert missing.returncode == 2 and "no such" in missing.stderr
