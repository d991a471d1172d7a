"""Hostile input, timed: what each bomb costs once refused, and what it cost without the guard (issue 10).

    .venv/bin/python benchmarks/hostile_input.py                      # decode, resize, YAML figures
    .venv/bin/python benchmarks/hostile_input.py --serve RUN_DIR      # + /health latency under idle and slow clients
    .venv/bin/python benchmarks/hostile_input.py --download           # + metadata bombs given to `imgclf download`

"Unguarded" figures run the same code with the limits lifted, on scaled-down bombs where the full
one would take minutes or gigabytes (the scale is printed); the guarded figure is the full bomb.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import hostile  # noqa: E402
import yaml  # noqa: E402

from imgclf.images import ImageLimits, decode_image  # noqa: E402
from imgclf.presets import Preprocessing, eval_resize  # noqa: E402

UNGUARDED = ImageLimits(max_pixels=10**12, min_side=1, max_side=10**9, max_resized_pixels=10**15,
                        max_jpeg_scans=10**9)
GUARDED = ImageLimits(min_side=1).for_resize(73)  # image_size 64, as the demo and tests train


def _timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def decode_figures() -> None:
    print("decode (best of 3):  bomb | refused in | unguarded decode")
    cases = [
        ("1 x 200,000 PNG", hostile.extreme_aspect_png(1, 200_000), None),
        ("JPEG header 65,000 x 65,000", hostile.huge_header_jpeg(), None),
        ("progressive JPEG 64x64, 2,000 scans", hostile.many_scans_jpeg(2_000), hostile.many_scans_jpeg(2_000)),
        ("progressive JPEG 1024x1024, 300 scans", hostile.many_scans_jpeg(300, 1024),
         hostile.many_scans_jpeg(300, 1024)),
        ("PNG, 200 zTXt chunks of 1 MB", hostile.png_text_bomb(), None),
        ("GIF, 200,000 frames", hostile.many_frames_gif(), None),
        ("TIFF, 100,000 pages", hostile.many_pages_tiff(), None),
    ]
    for name, data, unguarded in cases:
        refused = _timed(lambda d=data: decode_image(d, GUARDED))
        result = decode_image(data, GUARDED)
        verdict = getattr(result, "status", "decoded (first frame)")
        line = f"  {name:40s} | {verdict:>10s} {refused * 1000:8.1f} ms"
        if unguarded is not None:
            line += f" | {_timed(lambda d=unguarded: decode_image(d, UNGUARDED), 1) * 1000:8.1f} ms"
        print(line)
    import io

    from PIL import Image

    for frames in (20_000, 200_000):
        gif = Image.open(io.BytesIO(hostile.many_frames_gif(frames)))
        counted = _timed(lambda g=gif: (setattr(g, "_n_frames", None), g.n_frames), 1)
        print(f"  counting the frames of a {frames:,}-frame GIF (what `n_frames` did): {counted:.2f} s")


def resize_figures() -> None:
    print("eval resize to a shorter side of 73 (image_size 64), unguarded; allocation = resized pixels x 3 bytes")
    pre = Preprocessing(image_size=64, resize_size=73, mean=(0.5,) * 3, std=(0.5,) * 3)
    transform = eval_resize(pre)
    transform.transforms = transform.transforms[1:]  # without the ResizeGuard
    for height in (2_000, 20_000):
        image = decode_image(hostile.extreme_aspect_png(1, height), UNGUARDED).image
        seconds = _timed(lambda im=image: transform(im), 1)
        pixels = 73 * int(73 * height)
        print(f"  1 x {height:>7,}: {seconds:6.2f} s, {pixels * 3 / 2**20:8.0f} MiB "
              f"(1 x 200,000 would be {73 * 73 * 200_000 * 3 / 2**30:.1f} GiB)")


def yaml_figures() -> None:
    from imgclf.config import load_config
    from imgclf.errors import ConfigError

    print("YAML alias bomb (9 aliases a level): refused vs unguarded yaml.safe_load + repr of the value")
    for levels in (5, 6, 9):
        text = hostile.yaml_alias_bomb(levels)
        path = Path(f"/tmp/imgclf_bomb_{levels}.yaml")
        path.write_text(text)

        def refuse(p: Path = path) -> None:
            try:
                load_config(p)
            except ConfigError:
                pass

        line = f"  {levels} levels ({9 ** levels:>12,} values): refused in {_timed(refuse) * 1000:6.1f} ms"
        if levels <= 6:
            line += f" | unguarded {_timed(lambda t=text: len(repr(yaml.safe_load(t))), 1):6.2f} s"
        print(line)


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def serve_figures(model: str) -> None:
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "imgclf", "serve", "--model", model, "--port", str(port),
                             "--max-concurrency", "4", "--head-timeout", "30", "--body-timeout", "60"],
                            stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                httpx.get(f"{base}/health", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.5)

        client = httpx.Client(timeout=10)  # one client: time the server, not the client's set-up

        def health_ms() -> list[float]:
            out = []
            for _ in range(20):
                started = time.perf_counter()
                client.get(f"{base}/health").raise_for_status()
                out.append((time.perf_counter() - started) * 1000)
            return out

        quiet = health_ms()
        idle = [_connect(port) for _ in range(200)]
        slow = []
        for _ in range(4):
            sock = _connect(port)
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                         b"Content-Length: 9999\r\n\r\nx")
            slow.append(sock)
        time.sleep(1)
        loaded = health_ms()
        busy = httpx.post(f"{base}/predict", content=b"x", headers={"content-type": "image/png"}, timeout=10)
        for sock in idle + slow:
            sock.close()
        print(f"serve /health, 20 calls: quiet median {statistics.median(quiet):.1f} ms max {max(quiet):.1f} ms; "
              f"with 200 idle sockets + 4 slow bodies filling --max-concurrency 4: median "
              f"{statistics.median(loaded):.1f} ms max {max(loaded):.1f} ms; a 5th /predict: {busy.status_code} "
              f"{busy.json()['error']}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def download_figures(members: int) -> None:
    """Metadata bombs (issue 22, class 1) given to `imgclf download` in a child under a 2 GiB
    RLIMIT_AS: exit code, seconds, peak RSS (VmHWM) and the size of .state.sqlite, against a
    baseline of as many rows with short cells in the same run."""
    import tempfile

    import pandas as pd

    print("download (child under RLIMIT_AS 2 GiB):  input | exit | s | peak RSS MiB | state MiB")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        baseline = root / "short.csv"
        pd.DataFrame({"url": [f"ftp://example.com/{i}.png" for i in range(20_000)], "label": "x"}).to_csv(
            baseline, index=False)
        cases = [
            ("20,000 rows, short URLs (baseline)", baseline),
            ("Parquet 20,000 x 50 KB URLs", hostile.long_url_parquet(root / "bomb.parquet")),
            ("Parquet 1,000 x 50 KB URLs (under budget)", hostile.long_url_parquet(root / "cut.parquet", 1_000)),
            (f".tar.gz {members:,} empty members, 8 KB names", hostile.long_name_targz(root / "n.tar.gz", members)),
        ]
        for name, path in cases:
            out = root / f"out-{path.stem}"
            ran = hostile.run_cli(["download", str(path), "--out", str(out), "--no-progress"], 2048)
            state = sum(p.stat().st_size for p in out.glob(".state.sqlite*")) / 2**20
            print(f"  {name:45s} ({path.stat().st_size / 1024:7.0f} KB) | {ran.returncode:4d} | "
                  f"{ran.seconds:5.1f} | {ran.peak_rss_mib:7.0f} | {state:7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", metavar="MODEL", help="also time /health under hostile clients")
    parser.add_argument("--download", action="store_true", help="also give metadata bombs to imgclf download")
    parser.add_argument("--members", type=int, default=100_000, help="--download: members of the name bomb")
    args = parser.parse_args()
    decode_figures()
    resize_figures()
    yaml_figures()
    if args.serve:
        serve_figures(args.serve)
    if args.download:
        download_figures(args.members)


if __name__ == "__main__":
    main()
