"""Test helpers for the storage layouts: a real local S3 endpoint (moto's server on 127.0.0.1) and a
real download of bundled images over HTTP into a local folder or an s3:// URL."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
from helpers import DEMO_ROOT

from imgclf._localserver import LocalServer
from imgclf.stages import download

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def demo_files(split: str, classes: list[str], per_class: int) -> list[Path]:
    return [f for label in classes for f in sorted((DEMO_ROOT / split / label).glob("*.png"))[:per_class]]


def write_sources(dest: Path, srv: LocalServer, splits: dict[str, list[Path]]) -> list[Path]:
    """One CSV per split (train.csv, test.csv ...) listing the files' URLs on `srv`."""
    dest.mkdir(parents=True, exist_ok=True)
    tables = []
    for split, files in splits.items():
        table = dest / f"{split}.csv"
        pd.DataFrame({"url": [srv.url(str(f.relative_to(DEMO_ROOT))) for f in files],
                      "label": [f.parent.name for f in files]}).to_csv(table, index=False)
        tables.append(table)
    return tables


def download_demo(out: str | Path, sources: list[Path], **options: object) -> download.DownloadResult:
    quiet = {"show_progress": False, "print_summary": False, "processes": 1, **options}
    return download.run(download.DownloadOptions(sources=sources, out=out, **quiet))


def port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


_SERVE = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # until the parent closes it (or dies)
server.stop()
"""


class _ChildServer:
    """moto's server in a child process; stopped by closing its stdin."""

    def __init__(self) -> None:
        self.child = subprocess.Popen([sys.executable, "-c", _SERVE], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.port = int(self.child.stdout.readline())

    def stop(self) -> None:
        self.child.stdin.close()
        try:
            self.child.wait(10)
        except subprocess.TimeoutExpired:
            self.child.kill()
            self.child.wait()


@contextmanager
def moto_s3(bucket: str = "bkt", own_process: bool = False) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (a free port), AWS_* pointing at it; yields its endpoint URL.

    The environment variables are what a user sets for a real endpoint; child processes (DDP
    ranks, DataLoader workers, a CLI subprocess) inherit them. Restored, and the server stopped
    (its port closed), on exit. `own_process`: the server runs in a child process, so it does
    not compete for this process's GIL (benchmarks); the tests keep it in a thread.
    """
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    s3fs.S3FileSystem.clear_instance_cache()  # a cached instance would keep an older endpoint
    if own_process:
        server = _ChildServer()
        host, port = "127.0.0.1", server.port
    else:
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in (*S3_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    try:
        s3fs.S3FileSystem().mkdir(bucket)
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()
        assert not port_open(host, port), "moto server still listening"
