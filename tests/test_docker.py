"""Docker files: linted, the scripts' engine calls checked, the helpers run for real.

The image itself is built and run by `make docker-smoke` (docker/smoke.sh: podman, buildah and
a local Debian base; 15 minutes to over an hour, so not part of this suite). Here: hadolint and
shellcheck; the Dockerfile's stages; every script run for real against stand-ins for `docker`,
`podman` and `buildah` first on PATH that record their arguments (mounts, ports, build args,
secrets, commands); the image's health check against real HTTP servers on 127.0.0.1; and
host_pip.py's mirror fetched by a real pip.
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import os
import shutil
import stat
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
SCRIPTS = sorted(p for p in DOCKER.glob("*.sh") if not p.name.startswith("_"))  # _engine.sh is sourced
HADOLINT = shutil.which("hadolint") or str(ROOT / ".venv" / "bin" / "hadolint")
WEIGHTS = "/app/weights/fashion_mnist_mobilenet_v3_small.pt"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, DOCKER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


healthcheck = _load("healthcheck")
host_pip = _load("host_pip")


# --- lint and structure


def test_hadolint_passes_on_the_dockerfile() -> None:
    result = subprocess.run([HADOLINT, "--no-color", str(DOCKER / "Dockerfile")], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_passes_on_every_script() -> None:
    assert {p.name for p in SCRIPTS} >= {"build.sh", "run.sh", "run_volume.sh", "serve.sh", "smoke.sh"}
    result = subprocess.run(["shellcheck", "-x", "--severity=style", *map(str, DOCKER.glob("*.sh"))],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_executable_and_strict(script: Path) -> None:
    assert script.stat().st_mode & stat.S_IXUSR
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text


def _stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined), one list per stage."""
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    stages: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("FROM "):
            stages.append([])
        if line and not line.startswith("#") and stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_stages_keep_build_tools_out_of_the_image() -> None:
    base, builder, final = _stages()
    assert base[0].endswith(" AS base") and builder[0] == "FROM base AS builder" and final[0] == "FROM base"
    assert "install -d -o 10001 -g 10001 /work" in " ".join(base)  # the image user's working folder
    # pip runs in the builder only, with the secrets mounted for that command
    pip_runs = [line for line in builder if line.startswith("RUN ") and "pip install" in line]
    assert len(pip_runs) == 2
    assert all("--mount=type=secret,id=pip_cert" in r and "--mount=type=secret,id=pip_conf" in r for r in pip_runs)
    # the final stage installs nothing: it copies the venv, the weights and the health check
    assert not [line for line in final if line.startswith("RUN ")]
    assert "COPY --from=builder /opt/venv /opt/venv" in final
    assert "USER 10001" in final and 'ENTRYPOINT ["imgclf"]' in final
    assert any(line.startswith("HEALTHCHECK ") and '"/app/healthcheck.py"]' in line for line in final)


def test_dockerfile_copies_only_what_exists_and_is_not_ignored() -> None:
    copies = [line.split()[1:-1] for stage in _stages() for line in stage
              if line.startswith("COPY ") and "--from=" not in line]
    sources = [src for group in copies for src in group]
    assert {"src/", "pyproject.toml", "weights/", "docker/healthcheck.py"} <= set(sources)
    allowed = {line[1:].strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert src.rstrip("/") in allowed, f"COPY {src}: not re-included by the allow-list .dockerignore"


# --- the scripts, against stand-ins that record their arguments

STUB = """#!/usr/bin/env bash
{{ printf '%s\\n' "$(basename "$0")" "$@"; echo ---; }} >> "{log}"
if [[ "$(basename "$0")" == buildah && "$1" == from ]]; then echo ctr-1; fi
"""


@pytest.fixture
def engine(tmp_path: Path):
    """Stand-ins for docker, podman and buildah; returns (env, calls) where calls() lists each call's args."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls.txt"
    for name in ("docker", "podman", "buildah"):
        stub = bindir / name
        stub.write_text(STUB.format(log=log))
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "IMGCLF_OUT": str(tmp_path / "out")}
    for name in ("IMGCLF_GPUS", "IMGCLF_ENGINE", "IMGCLF_IMAGE", "IMGCLF_PUBLISH"):
        env.pop(name, None)

    def calls() -> list[list[str]]:
        text = log.read_text() if log.exists() else ""
        log.unlink(missing_ok=True)
        return [c.strip("\n").split("\n") for c in text.split("---\n") if c.strip()]

    return env, calls


def _run(script: str, args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(DOCKER / script), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=30)


def test_build_sh_cpu_cuda_and_pip_secrets(engine, tmp_path: Path) -> None:
    env, calls = engine
    assert _run("build.sh", [], env, tmp_path).returncode == 0
    [args] = calls()
    assert args[:2] == ["docker", "build"] and args[-1] == str(ROOT)
    assert args[args.index("--file") + 1] == str(DOCKER / "Dockerfile") and "imgclf:latest" in args
    assert not any(a.startswith("BASE_IMAGE=") for a in args)  # CPU: the Dockerfile's default base
    assert _run("build.sh", ["--cuda", "--tag", "me/imgclf:gpu"], env, tmp_path).returncode == 0
    [args] = calls()
    assert any(a.startswith("BASE_IMAGE=nvidia/cuda:") for a in args)
    assert any(a.startswith("TORCH_INDEX_URL=https://download.pytorch.org/whl/cu") for a in args)
    assert "me/imgclf:gpu" in args
    cert, conf = tmp_path / "corp ca.pem", tmp_path / "pip.conf"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    conf.write_text("[global]\n")
    proxy = ["--pip-cert", "corp ca.pem", "--pip-conf", str(conf), "--build-arg", "PIP_INDEX_URL=https://m/simple"]
    assert _run("build.sh", proxy, env, tmp_path).returncode == 0
    [args] = calls()
    # secrets, with absolute sources (the relative name became one); the build arg passes through
    assert f"id=pip_cert,src={cert}" in args and f"id=pip_conf,src={conf}" in args
    assert args[args.index("--build-arg") + 1] == "PIP_INDEX_URL=https://m/simple"
    missing = _run("build.sh", ["--pip-cert", "nope.pem"], env, tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip() == "build.sh: nope.pem: no such file (for the pip_cert secret)"
    assert calls() == []


def test_build_sh_with_podman_keeps_the_healthcheck(engine, tmp_path: Path) -> None:
    env, calls = engine
    for engine_name in ("podman", "buildah"):  # buildah mode builds with podman too
        assert _run("build.sh", [], {**env, "IMGCLF_ENGINE": engine_name}, tmp_path).returncode == 0
        [args] = calls()
        assert args[:4] == ["podman", "build", "--format", "docker"]  # OCI format drops HEALTHCHECK
    bad = _run("build.sh", [], {**env, "IMGCLF_ENGINE": "lxc"}, tmp_path)
    assert bad.returncode == 2 and "IMGCLF_ENGINE=lxc: expected docker, podman or buildah" in bad.stderr


def test_run_sh_defaults_to_the_demo_and_passes_commands(engine, tmp_path: Path) -> None:
    env, calls = engine
    assert _run("run.sh", [], env, tmp_path).returncode == 0
    [args] = calls()
    assert args[:2] == ["docker", "run"] and args[-1] == "imgclf:latest"  # no command: the image's CMD (demo)
    assert f"{tmp_path / 'out'}:/work" in args and (tmp_path / "out").is_dir()
    command = ["predict", "--model", "/app/weights/x.pt", "/work/a b.png"]  # a space survives quoting
    assert _run("run.sh", command, env, tmp_path).returncode == 0
    assert calls()[0][-5:] == ["imgclf:latest", *command]


def test_run_sh_with_buildah_creates_runs_and_removes_a_container(engine, tmp_path: Path) -> None:
    env, calls = engine
    env = {**env, "IMGCLF_ENGINE": "buildah", "IMGCLF_IMAGE": "localhost/imgclf:x"}
    result = _run("run.sh", [], env, tmp_path)
    assert result.returncode == 0, result.stderr
    create, run, remove = calls()
    assert create[:4] == ["buildah", "from", "--pull-never", "--quiet"] and create[-1] == "localhost/imgclf:x"
    assert create[create.index("--name") + 1].startswith("imgclf-run-")
    assert run[:4] == ["buildah", "run", "--isolation", "chroot"]
    assert f"{tmp_path / 'out'}:/work" in run and "HOME=/tmp" in run
    assert "--shm-size" not in run and "--rm" not in run  # docker-only options are dropped
    # buildah runs no ENTRYPOINT/CMD: the script spells out the image's `imgclf demo --out /work/demo_output`
    assert run[run.index("ctr-1"):] == ["ctr-1", "--", "imgclf", "demo", "--out", "/work/demo_output"]
    assert remove == ["buildah", "rm", "ctr-1"]
    assert _run("run.sh", ["predict", "--model", WEIGHTS, "/work/a b.png"], env, tmp_path).returncode == 0
    assert calls()[1][-5:] == ["imgclf", "predict", "--model", WEIGHTS, "/work/a b.png"]
    gpus = _run("run.sh", [], {**env, "IMGCLF_GPUS": "all"}, tmp_path)
    assert gpus.returncode == 2 and "cannot pass GPUs" in gpus.stderr


def test_run_volume_sh_mounts_the_given_folder(engine, tmp_path: Path) -> None:
    env, calls = engine
    usage = _run("run_volume.sh", [], env, tmp_path)
    assert usage.returncode == 2 and "DATA_DIR" in usage.stderr and calls() == []
    assert "set -euo" not in usage.stderr  # the usage text is the header comment only
    data = tmp_path / "my data"
    data.mkdir()
    assert _run("run_volume.sh", [str(data)], env, tmp_path).returncode == 0
    [args] = calls()
    assert f"{data}:/data" in args
    default_command = ["train", "--data", "/data", "--out", "/work/runs/docker"]
    assert args[args.index("imgclf:latest") + 1:] == default_command
    assert _run("run_volume.sh", ["my data", "evaluate", "/work/runs/docker"], env, tmp_path).returncode == 0
    [args] = calls()
    # The relative "my data" became an absolute mount source (docker needs one).
    assert f"{data}:/data" in args and args[-2:] == ["evaluate", "/work/runs/docker"]
    buildah = _run("run_volume.sh", ["my data", "evaluate", "/work/runs/docker"],
                   {**env, "IMGCLF_ENGINE": "buildah"}, tmp_path)
    assert buildah.returncode == 0
    run = calls()[1]
    assert run[run.index("--volume") + 1] == f"{data}:/data" and run[-3:] == ["imgclf", "evaluate", "/work/runs/docker"]


def test_serve_sh_publishes_locally_and_mounts_a_host_model(engine, tmp_path: Path) -> None:
    env, calls = engine
    assert _run("serve.sh", [], env, tmp_path).returncode == 0
    [args] = calls()
    assert "127.0.0.1:8000:8000" in args
    tail = args[args.index("imgclf:latest") + 1:]
    assert tail[:3] == ["serve", "--model", WEIGHTS]
    assert tail[tail.index("--host") + 1] == "0.0.0.0"
    assert _run("serve.sh", ["9000"], env, tmp_path).returncode == 0  # a port alone: the shipped weights
    [args] = calls()
    assert "127.0.0.1:9000:8000" in args and WEIGHTS in args
    model = tmp_path / "exported" / "model.onnx"
    model.parent.mkdir()
    model.write_bytes(b"onnx")
    assert _run("serve.sh", [str(model), "9000", "--allow-private-urls"], env, tmp_path).returncode == 0
    [args] = calls()
    assert f"{model.parent}:/model:ro" in args and "127.0.0.1:9000:8000" in args
    assert "/model/model.onnx" in args and args[-1] == "--allow-private-urls"
    missing = _run("serve.sh", [str(tmp_path / "nope.onnx")], env, tmp_path)
    assert missing.returncode == 2 and "no such" in missing.stderr


def test_serve_sh_with_buildah_listens_on_the_host_port(engine, tmp_path: Path) -> None:
    env, calls = engine
    result = _run("serve.sh", ["9000"], {**env, "IMGCLF_ENGINE": "buildah"}, tmp_path)
    assert result.returncode == 0, result.stderr
    run = calls()[1]
    assert "--publish" not in run  # the host's network: no port mapping, the server takes the port itself
    assert run[run.index("imgclf"):] == ["imgclf", "serve", "--model", WEIGHTS, "--host", "127.0.0.1",
                                         "--port", "9000"]


def test_smoke_sh_refuses_unknown_arguments() -> None:
    result = subprocess.run([str(DOCKER / "smoke.sh"), "--bogus"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "make docker-smoke" in result.stderr


# --- the image's health check, against real servers on 127.0.0.1


@pytest.mark.parametrize(("argv", "url"), [
    (["/opt/venv/bin/python3", "/opt/venv/bin/imgclf", "serve", "--model", "m.pt", "--host", "0.0.0.0",
      "--port", "8000"], "http://127.0.0.1:8000/health"),
    (["imgclf", "serve", "--model=m.pt", "--port=9001", "--host=127.0.0.2"], "http://127.0.0.2:9001/health"),
    (["python", "-m", "imgclf", "serve", "--model", "m.pt"], "http://127.0.0.1:8000/health"),
    (["imgclf", "serve", "--host", "::1", "--port", "81"], "http://[::1]:81/health"),
    (["/opt/venv/bin/imgclf", "demo", "--out", "/work/serve"], None),
    (["/opt/venv/bin/imgclf", "predict", "--model", "m.pt", "serve"], None),
    (["python", "server.py", "serve"], None),
])
def test_healthcheck_reads_the_servers_address(argv: list[str], url: str | None) -> None:
    assert healthcheck.serve_url(argv) == url


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def health_server():
    """A real HTTP server on 127.0.0.1 whose /health answers with _Health.status."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def fake_serve():
    """Start processes whose command line reads like `imgclf serve --port PORT` (they only sleep)."""
    procs = []

    def start(*serve_args: str) -> str:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "imgclf", "serve", *serve_args])
        procs.append(proc)
        return str(proc.pid)

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def _healthcheck(*pids: str) -> subprocess.CompletedProcess:
    args = [a for pid in pids for a in ("--pid", pid)]
    return subprocess.run([sys.executable, str(DOCKER / "healthcheck.py"), *args], capture_output=True, text=True,
                          timeout=30)


def test_healthcheck_asks_the_running_server(health_server, fake_serve, monkeypatch) -> None:
    port = str(health_server.server_address[1])
    pid = fake_serve("--model", "m.pt", "--host", "0.0.0.0", "--port", port)
    result = _healthcheck(pid)
    assert result.returncode == 0 and result.stdout.strip() == f"healthy: http://127.0.0.1:{port}/health"
    monkeypatch.setattr(_Health, "status", 503)
    result = _healthcheck(pid)
    assert result.returncode == 1 and "503" in result.stderr


def test_healthcheck_fails_when_nothing_answers_and_passes_with_no_server(fake_serve) -> None:
    with http.server.HTTPServer(("127.0.0.1", 0), _Health) as closed:
        port = str(closed.server_address[1])
    refused = _healthcheck(fake_serve("--port", port))
    assert refused.returncode == 1 and f"unhealthy: http://127.0.0.1:{port}/health:" in refused.stderr
    # a container running another command (here: this test's own process) has nothing to check
    idle = _healthcheck(str(os.getpid()))
    assert idle.returncode == 0 and "nothing to check" in idle.stdout


# --- host_pip.py: this machine's pip registries, for a build


def _wheel(folder: Path, name: str = "demo_pkg", version: str = "1.0") -> Path:
    """A minimal real wheel, enough for pip to download and read it."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr(f"{name}/__init__.py", "")
        whl.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")
    return path


def test_host_pip_config_precedence() -> None:
    listing = ("global.cert='/etc/ssl/a.pem'\n:env:.cert='/etc/ssl/b.pem'\nglobal.index-url='https://x/simple'\n"
               "install.index-url='https://y/simple'\nglobal.extra-index-url='file:///opt/a/simple file:///opt/b/simple'\n"
               "site.timeout='5'\n")
    assert host_pip.read_config(listing) == {"cert": "/etc/ssl/b.pem", "index-url": "https://y/simple",
                                             "extra-index-url": "file:///opt/a/simple file:///opt/b/simple"}


def test_host_pip_serves_local_registries_that_pip_downloads_from(tmp_path: Path) -> None:
    index = tmp_path / "registry"  # a PEP 503 tree: simple/<project>/ links to ../../files/
    (index / "files").mkdir(parents=True)
    wheel = _wheel(index / "files")
    (index / "simple" / "demo-pkg").mkdir(parents=True)
    (index / "simple" / "demo-pkg" / "index.html").write_text(f'<a href="../../files/{wheel.name}">{wheel.name}</a>')
    links = tmp_path / "wheels"
    links.mkdir()
    _wheel(links, "other_pkg", "2.0")
    config = {"cert": "/etc/ssl/corp.pem", "extra-index-url": f"file://{index}/simple https://pypi.example/simple",
              "find-links": str(links)}
    # served as smoke.sh serves it: a plain file server on the mirror folder
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "mirror"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    port = server.server_address[1]
    args = host_pip.build_arguments(config, host_pip.Mirror(tmp_path / "mirror", port))
    build_args = dict(a.split("=", 1) for a in args[3::2])
    assert args[:2] == ["--pip-cert", "/etc/ssl/corp.pem"] and set(args[2::2]) == {"--build-arg"}
    assert build_args == {
        "TORCH_INDEX_URL": "https://pypi.org/simple",  # this machine's index: PyPI
        "PIP_EXTRA_INDEX_URL": f"http://127.0.0.1:{port}/0/simple/ https://pypi.example/simple",
        "PIP_FIND_LINKS": f"http://127.0.0.1:{port}/1/",
        "PIP_TRUSTED_HOST": f"127.0.0.1:{port}",
    }
    # what pip inside the build would do: both wheels download through the mirror
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}
        for name in [k for k in env if k.startswith("PIP_") and k != "PIP_CONFIG_FILE"]:
            env.pop(name)
        mirror_index = build_args["PIP_EXTRA_INDEX_URL"].split()[0]
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--index-url",
             mirror_index, "--find-links", build_args["PIP_FIND_LINKS"], "--trusted-host",
             build_args["PIP_TRUSTED_HOST"], "-d", str(tmp_path / "got"), "demo-pkg", "other-pkg"],
            capture_output=True, text=True, env=env, timeout=120)
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in (tmp_path / "got").iterdir()) == [wheel.name, "other_pkg-2.0-py3-none-any.whl"]
