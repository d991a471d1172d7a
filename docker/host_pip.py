"""Give an image build the package registries this machine's pip uses (for docker/smoke.sh).

    python3 docker/host_pip.py MIRROR_DIR PORT    # build.sh arguments, one per line

It reads pip's configuration as pip reports it (`python3 -m pip config list`: the config files
and the PIP_* variables, the variables winning) and turns it into what a build behind a
corporate proxy is given:
- index URLs over HTTP(S) pass through as build arguments (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL,
  PIP_FIND_LINKS, PIP_TRUSTED_HOST); TORCH_INDEX_URL is the machine's index (PyPI by default),
  where its pip finds torch;
- a local folder (a file:// index, a find-links folder) is invisible from inside the build, so it
  gets a symlink in MIRROR_DIR, which smoke.sh serves on http://127.0.0.1:PORT/ for the build
  (the loopback address is then a trusted host: plain HTTP);
- the CA bundle (`cert`) becomes the pip_cert build secret (build.sh --pip-cert).
Standard library only; it runs with the machine's python3, not the project's venv.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

PYPI = "https://pypi.org/simple"
# Later sections win, as in pip: [global] < [install] < PIP_* variables.
PRECEDENCE = ("global", "install", ":env:")


def read_config(listing: str) -> dict[str, str]:
    """Option -> value from `pip config list` output (lines like global.cert='/path')."""
    found: dict[str, tuple[int, str]] = {}
    for line in listing.splitlines():
        key, sep, raw = line.partition("=")
        section, _, option = key.rpartition(".")
        if not sep or section not in PRECEDENCE:
            continue
        rank = PRECEDENCE.index(section)
        if option not in found or rank >= found[option][0]:
            found[option] = (rank, ast.literal_eval(raw))
    return {option: value for option, (_, value) in found.items()}


class Mirror:
    """Local folders exposed under MIRROR_DIR/<n>, served at http://127.0.0.1:PORT/<n>/."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port, self.used = root, port, False

    def url(self, folder: Path, page: str = "") -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        name = str(len(list(self.root.iterdir())))
        (self.root / name).symlink_to(folder.resolve(), target_is_directory=True)
        self.used = True
        return f"http://127.0.0.1:{self.port}/{name}/{page}"


def _local_path(location: str) -> Path | None:
    if location.startswith("file:"):
        return Path(unquote(urlparse(location).path))
    return None if "://" in location else Path(location)


def map_index(location: str, mirror: Mirror) -> str:
    """An index URL the build can reach. A PEP 503 tree keeps its files beside simple/
    (links like ../../files/x.whl), so the index folder's parent is what gets served."""
    path = _local_path(location)
    if path is None:
        return location
    return mirror.url(path.parent, path.name + "/")


def map_find_links(location: str, mirror: Mirror) -> str:
    path = _local_path(location)
    if path is None:
        return location
    return mirror.url(path if path.is_dir() else path.parent)


def build_arguments(config: dict[str, str], mirror: Mirror) -> list[str]:
    """build.sh arguments: --pip-cert first (build.sh's own option), then --build-arg pairs."""
    args: list[str] = []
    if config.get("cert"):
        args += ["--pip-cert", config["cert"]]
    index = map_index(config.get("index-url") or PYPI, mirror)
    build_args = {"TORCH_INDEX_URL": index}
    if config.get("index-url"):
        build_args["PIP_INDEX_URL"] = index
    extra = [map_index(u, mirror) for u in config.get("extra-index-url", "").split()]
    links = [map_find_links(u, mirror) for u in config.get("find-links", "").split()]
    trusted = config.get("trusted-host", "").split()
    if mirror.used:
        trusted.append(f"127.0.0.1:{mirror.port}")
    for name, values in (("PIP_EXTRA_INDEX_URL", extra), ("PIP_FIND_LINKS", links),
                         ("PIP_TRUSTED_HOST", trusted)):
        if values:
            build_args[name] = " ".join(values)
    for name, value in build_args.items():
        args += ["--build-arg", f"{name}={value}"]
    return args


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: host_pip.py MIRROR_DIR PORT", file=sys.stderr)
        return 2
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                             text=True, check=True).stdout
    mirror = Mirror(Path(argv[0]), int(argv[1]))
    print("\n".join(build_arguments(read_config(listing), mirror)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
