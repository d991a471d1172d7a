"""Hostile inputs to imgclf's smaller surfaces (issue 22, classes 7 and 9): checkpoint metadata
that would size the model before its weights are checked, and HTTPS servers whose certificate
this system does not trust (a real TLS server on 127.0.0.1 with a private CA made in the test).

Checkpoints are real files written with torch.save and loaded by `imgclf predict` in a child
process under RLIMIT_AS, whose peak RSS (VmHWM) is compared with the same command on an honest
checkpoint in the same test.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import tiny_config
from helpers import demo_images
from hostile import run_cli

from imgclf import checkpoint
from imgclf.errors import DataError
from imgclf.models import create_model
from imgclf.net.guard import FetchFailed, FetchOptions, fetch_all

# ---------------------------------------------------------------- class 9: checkpoint metadata


def _checkpoint(path: Path, class_names: list[str], *overrides: str, state_classes: int = 3,
                timm_kwargs: dict[str, Any] | None = None) -> Path:
    """A slim checkpoint whose tensors are an honest `state_classes`-way model, and whose metadata
    says `class_names` and `timm_kwargs` (set after validation: what a hostile file may hold)."""
    config = tiny_config(*overrides)
    model = create_model(config.model.arch, state_classes, small_input=config.model.small_input,
                         timm_kwargs=config.model.timm_kwargs)
    meta = checkpoint.make_meta(config, class_names)
    if timm_kwargs is not None:
        meta["config"]["model"]["timm_kwargs"] = timm_kwargs
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    return checkpoint.save_slim(path, state, meta)


def test_300000_class_names_are_refused_before_the_head_is_built(tmp_path: Path) -> None:
    image = str(demo_images("test", "Bag", 1)[0])
    honest = _checkpoint(tmp_path / "honest.pt", ["a", "b", "c"])
    names = [f"class-{i}" for i in range(300_000)]  # resnet18's head for these: 300,000 x 512 floats
    hostile = _checkpoint(tmp_path / "hostile.pt", names)
    base = run_cli(["predict", "--model", str(honest), image], address_space_mib=6144)
    assert base.returncode == 0, base.stderr[-2000:]
    got = run_cli(["predict", "--model", str(hostile), image], address_space_mib=6144)
    assert got.returncode == 2, got.stderr[-2000:]
    line = [x for x in got.stderr.splitlines() if "hostile.pt" in x]
    assert line and "weights do not match resnet18 with 300000 classes" in line[0]
    assert "fc.weight is (3, 512), expected (300000, 512)" in line[0]
    # Before: 1.95 GB. The names themselves (~20 MB of str) are all the hostile file may cost.
    assert got.peak_rss_mib < base.peak_rss_mib + 150, (got.peak_rss_mib, base.peak_rss_mib)


def test_metadata_over_the_pickle_budget_is_refused_before_unpickling(tmp_path: Path) -> None:
    names = [f"{i:06d}" + "x" * 1000 for i in range(20_000)]  # 20 MB of names (3M short ones: 90 MB)
    path = _checkpoint(tmp_path / "fat.pt", names)
    started = time.monotonic()
    with pytest.raises(DataError, match=r"fat\.pt: its metadata \(data\.pkl\) is 19 MiB, over the 16 MiB"):
        checkpoint.load_model(path)
    assert time.monotonic() - started < 2  # unpickled, this took seconds (3M names: a minute, +0.5 GB)


def test_timm_arguments_that_load_files_are_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.pth"
    secret.write_bytes(b"not a checkpoint")
    for key, value in (("checkpoint_path", str(secret)), ("pretrained_cfg", "x"), ("pretrained", True),
                       ("pruned", str(secret)), ("features_only", True)):
        path = _checkpoint(tmp_path / f"{key}.pt", ["a", "b", "c"], "model.arch=timm/resnet10t",
                           timm_kwargs={key: value})
        with pytest.raises(DataError, match=rf"{key}\.pt: .*timm_kwargs\.{key}, which controls how weights"):
            checkpoint.load_model(path)
    path = _checkpoint(tmp_path / "nested.pt", ["a", "b", "c"], "model.arch=timm/resnet10t",
                       timm_kwargs={"act_layer": {"__class__": "os.system"}})
    with pytest.raises(DataError, match=r"timm_kwargs\.act_layer is not a plain value"):
        checkpoint.load_model(path)


def test_timm_kwargs_far_from_the_stored_tensors_cost_nothing(tmp_path: Path) -> None:
    arch = "model.arch=timm/vit_tiny_patch16_224"
    wide = _checkpoint(tmp_path / "wide.pt", ["a", "b", "c"], arch, "data.image_size=224",
                       timm_kwargs={"embed_dim": 12288})
    image = str(demo_images("test", "Bag", 1)[0])
    got = run_cli(["predict", "--model", str(wide), image], address_space_mib=6144)
    assert got.returncode == 2, got.stderr[-2000:]
    assert "weights do not match timm/vit_tiny_patch16_224" in got.stderr and "expected" in got.stderr
    assert got.peak_rss_mib < 1500, got.peak_rss_mib  # before: 3.1 GB for this 192-wide file
    # Depth drives the number of Python objects, which the meta device does not make free: the
    # build stops once it registers far more than the file stores.
    deep = _checkpoint(tmp_path / "deep.pt", ["a", "b", "c"], arch, "data.image_size=224",
                       timm_kwargs={"depth": 100_000})
    with pytest.raises(DataError, match=r"deep\.pt: .*far larger than the \d+ tensors the file stores"):
        checkpoint.load_model(deep)


def test_an_honest_timm_checkpoint_with_kwargs_still_loads(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path / "ok.pt", ["a", "b", "c"], "model.arch=timm/resnet10t",
                       "model.timm_kwargs={drop_path_rate: 0.1}")
    loaded = checkpoint.load_model(path)
    assert loaded.class_names == ["a", "b", "c"] and loaded.config.model.timm_kwargs == {"drop_path_rate": 0.1}
    with pytest.raises(Exception, match=r"timm_kwargs\.checkpoint_path: controls how timm loads weights"):
        create_model("timm/resnet10t", 3, timm_kwargs={"checkpoint_path": "/etc/passwd"})


# ---------------------------------------------------------------- class 7: TLS


def _private_ca(folder: Path) -> tuple[Path, Path, Path]:
    """A private CA and a certificate it signed for 127.0.0.1: (ca.pem, cert.pem, key.pem)."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(subject: str, key, issuer: str, signer, ca: bool, san=None):  # noqa: ANN001, ANN202
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("imgclf test CA", ca_key, "imgclf test CA", ca_key, True)
    leaf = cert("127.0.0.1", key, "imgclf test CA", ca_key, False,
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    paths = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


class TlsServer:
    """HTTPS on 127.0.0.1 that counts TCP connections (each one a handshake) and served requests."""

    def __init__(self, cert: Path, key: Path, body: bytes) -> None:
        self.handshakes, self.requests, self.body = 0, 0, body
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> TlsServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
        self.thread.join(5)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed by __exit__
            self.handshakes += 1
            with conn:
                conn.settimeout(5)
                try:
                    with self.context.wrap_socket(conn, server_side=True) as tls:
                        tls.recv(65536)
                        self.requests += 1
                        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nConnection: close\r\n"
                                    b"Content-Length: %d\r\n\r\n" % len(self.body) + self.body)
                except (ssl.SSLError, OSError):
                    pass  # the client refused our certificate


def _download(csv: Path, out: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "imgclf", "download", str(csv), "--out", str(out),
                           "--retries", "3"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env, "COLUMNS": "200"})


def test_an_untrusted_certificate_is_tls_error_once_and_ca_bundle_fixes_it(tmp_path: Path) -> None:
    ca, cert, key = _private_ca(tmp_path)
    png = demo_images("test", "Bag", 1)[0].read_bytes()
    env = {k: "" for k in ("SSL_CERT_FILE", "SSL_CERT_DIR") if k in os.environ}
    with TlsServer(cert, key, png) as server:
        csv = tmp_path / "train.csv"
        csv.write_text(f"url,label\nhttps://127.0.0.1:{server.port}/bag.png,Bag\n")
        got = _download(csv, tmp_path / "data", env)
        assert got.returncode == 1 and "no row ended ok (1 rows: 1 tls_error)" in got.stderr, got.stderr[-2000:]
        row = pd.read_parquet(tmp_path / "data" / "manifest.parquet").iloc[0]
        assert (row["status"], row["attempts"]) == ("tls_error", 1), row["error"]
        assert "not trusted" in row["error"] and "SSL_CERT_FILE" in row["error"]
        assert (server.handshakes, server.requests) == (1, 0)  # before: connection_error after 4 handshakes
        assert "SSL_CERT_FILE=/path/to/ca.pem" in got.stdout and "--retry-failed" in got.stdout
        # What the summary says works: trust the private CA, retry the failed rows.
        again = subprocess.run([sys.executable, "-m", "imgclf", "download", str(csv), "--out",
                                str(tmp_path / "data"), "--retry-failed"], capture_output=True, text=True,
                               timeout=120, env={**os.environ, "SSL_CERT_FILE": str(ca)})
        assert again.returncode == 0, again.stderr[-2000:]
        row = pd.read_parquet(tmp_path / "data" / "manifest.parquet").iloc[0]
        assert row["status"] == "ok", row["error"]
        assert (server.handshakes, server.requests) == (2, 1)
        # predict and serve (the guarded fetcher) name it the same way.
        (failed,) = asyncio.run(fetch_all([f"https://127.0.0.1:{server.port}/bag.png"],
                                          FetchOptions(allow_private=True)))
        assert isinstance(failed, FetchFailed) and failed.code == "tls_error", failed
        assert (server.handshakes, server.requests) == (3, 1)
