"""The image's HEALTHCHECK: GET /health of the `imgclf serve` running in this container.

    python /app/healthcheck.py              # what Docker runs every 30 s (docker/Dockerfile)
    python /app/healthcheck.py --pid 1234   # check one process only

It finds the server among the processes that share its root folder (in a container: the
container's own), reads its --host and --port from the command line, and asks for /health.
Exit 0: every server answered 200, or none runs (a container running the demo, train or
predict has nothing to check). Exit 1: a server did not answer 200 within the timeout.
Standard library only: it runs with the image's Python, outside imgclf's import cost.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.request
from pathlib import Path

DEFAULT_PORT = 8000  # `imgclf serve --port`'s default
TIMEOUT_S = 5.0


def serve_url(argv: list[str]) -> str | None:
    """The /health URL of an `imgclf serve` command line, or None for any other command."""
    for i, arg in enumerate(argv):
        if os.path.basename(arg) == "imgclf":  # the console script, or `python -m imgclf`
            rest = argv[i + 1:]
            break
    else:
        return None
    if not rest or rest[0] != "serve":
        return None
    host, port = "127.0.0.1", str(DEFAULT_PORT)
    for j, arg in enumerate(rest):
        for name in ("--host", "--port"):
            if arg == name and j + 1 < len(rest):
                value = rest[j + 1]
            elif arg.startswith(name + "="):
                value = arg.split("=", 1)[1]
            else:
                continue
            if name == "--host":
                host = value
            else:
                port = value
    if host in ("0.0.0.0", "", "::"):  # listening everywhere: loopback reaches it
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/health"


def _same_root(pid: str) -> bool:
    """Whether process `pid` sees the same root folder as this one (the same container)."""
    try:
        theirs, ours = os.stat(f"/proc/{pid}/root"), os.stat("/")
    except OSError:  # gone, or another user's process: not ours to check
        return False
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


def find_servers(pids: list[str] | None = None) -> list[str]:
    """The /health URLs of the `imgclf serve` processes among `pids` (default: all)."""
    if pids is None:
        pids = [p.name for p in Path("/proc").iterdir() if p.name.isdigit()]
    urls = []
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        url = serve_url([a for a in argv if a])
        if url and _same_root(pid):
            urls.append(url)
    return list(dict.fromkeys(urls))  # a launcher and its child can both name the same server


def check(url: str) -> str | None:
    """None when `url` answers 200, else the reason."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:  # noqa: S310 (loopback)
            return None if response.status == 200 else f"HTTP {response.status}"
    except OSError as err:  # URLError, HTTPError, timeouts, refused connections
        return str(err)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GET /health of the imgclf serve in this container")
    parser.add_argument("--pid", action="append", help="check this process only (repeatable)")
    args = parser.parse_args(argv)
    urls = find_servers(args.pid)
    if not urls:
        print("healthy: no imgclf serve process here, nothing to check")
        return 0
    failures = [f"{url}: {reason}" for url in urls if (reason := check(url)) is not None]
    for line in failures:
        print(f"unhealthy: {line}", file=sys.stderr)
    if not failures:
        print("healthy: " + ", ".join(urls))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
