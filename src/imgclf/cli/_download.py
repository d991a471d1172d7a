"""`imgclf download`: arguments and the call into the download stage."""

from __future__ import annotations

import argparse
from pathlib import Path

from imgclf.cli._common import add_renamed
from imgclf.storage import location


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("download", help="image folders, archives or URL lists -> validated images + manifest",
                       description="Validate and store images from image folders (ImageFolder layout: "
                                   "[train|val|test/]<label>/<image>), archives of them (.zip, .tar, .tar.gz, "
                                   ".tar.zst, ...) and CSV/TSV/Parquet/JSONL tables (columns label and url and/or "
                                   "path[, split]) into a data directory; resumable and incremental: run the "
                                   "same command again.")
    p.add_argument("sources", nargs="+", type=Path,
                   help="folders, archives, CSV/TSV/Parquet/JSONL tables, mixed freely; a source named "
                        "train/val/test names the split when nothing else does")
    p.add_argument("--out", required=True, type=location,
                   help="data directory to write images and manifest into: a folder or an object-store URL "
                        "(s3://bucket/prefix; credentials and endpoint from AWS_* environment variables)")
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight in total (default 64)")
    p.add_argument("--per-host", type=int, default=None,
                   help="a fixed cap of requests in flight per host (default: each host's limit adapts: "
                        "grows while it answers cleanly, halves on 429/503/timeouts)")
    p.add_argument("--no-adaptive-timeout", dest="adaptive_timeout", action="store_false",
                   help="always wait --read-timeout for response headers (default: a few times the host's "
                        "usual latency, at least 2 s, once it has answered 16 times)")
    p.add_argument("--processes", type=int, default=None,
                   help="processes decoding/validating images (default: number of cores)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds allowed per URL fetch (one attempt)")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="connect timeout in seconds")
    p.add_argument("--read-timeout", type=float, default=15.0, help="max seconds between two reads")
    p.add_argument("--retries", type=int, default=3, help="retries for timeouts, resets, 408, 429, 5xx")
    p.add_argument("--backoff", type=float, default=0.5,
                   help="first retry waits up to this many seconds, doubling each time (with jitter)")
    p.add_argument("--max-retry-after", type=float, default=30.0,
                   help="honour a server's Retry-After up to this many seconds")
    p.add_argument("--max-redirects", type=int, default=5, help="redirects followed per URL")
    p.add_argument("--max-bytes", type=int, default=20_000_000,
                   help="cut bodies larger than this (too_large)")
    p.add_argument("--max-pixels", type=int, default=64_000_000, help="refuse larger images (bombs)")
    p.add_argument("--min-side", type=int, default=8, help="refuse images with a smaller side (too_small)")
    p.add_argument("--resize", choices=("none", "shorter", "longer"), default="longer",
                   help="resize so that this side is at most --size (default: longer)")
    p.add_argument("--size", type=int, default=512, help="target side for --resize (default 512)")
    p.add_argument("--image-format", choices=("keep", "jpeg", "png", "webp"), default="keep",
                   help="format images are stored in (keep: the original bytes when no resize was needed)")
    add_renamed(p, "download", "--format", dest="image_format", choices=("keep", "jpeg", "png", "webp"))
    p.add_argument("--quality", type=int, default=90, help="JPEG/WebP quality when re-encoding")
    p.add_argument("--retry-failed", action="store_true", help="try again rows whose failure was retryable")
    p.add_argument("--follow-links", action="store_true",
                   help="folders: also read symlinks that lead outside the source folder (default: listed, not read)")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")
    p.add_argument("--layout", choices=("files", "tar"), default="files",
                   help="files: one file per image under images/; tar: images packed into tar shards "
                        "under shards/ (WebDataset-compatible; for object storage and large data)")
    p.add_argument("--shard-size", type=int, default=1000,
                   help="--layout tar: images per tar shard; --engine ray: URLs per shard (default 1000)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this machine (default); ray: Ray workers (pip install 'imgclf[ray]'), "
                        "see docs/scale.md")
    p.add_argument("--address", default=None,
                   help="--engine ray: address of an existing Ray cluster (default: a private local Ray)")
    p.add_argument("--workers", dest="ray_workers", type=int, default=None,
                   help="--engine ray: download workers (default: 1 locally, a cluster's CPUs / --processes)")
    p.add_argument("--shard-retries", type=int, default=2,
                   help="--engine ray: times a failing shard is sent again before the command fails (default 2)")
    p.add_argument("--shard", dest="job_shard", default=None, metavar="I/N",
                   help="download only the rows of job I of N (by host, see --shard-by) into --out; join the "
                        "jobs' directories with --merge")
    p.add_argument("--shard-by", dest="job_shard_by", choices=("host", "url"), default=None,
                   help="--shard: host (default: all rows of a host in one job, so the jobs together stay "
                        "within each host's limit) or url (spreads a dominant host over the jobs; per-host "
                        "limits then hold per job), see docs/scale.md")
    p.add_argument("--merge", action="store_true",
                   help="the sources are data directories of --shard jobs: merge them into --out")
    p.add_argument("--state-dir", default=None,
                   help="object-storage --out: local folder for the resume state "
                        "(by default ~/.cache/imgclf/state/<hash of --out>)")
    p.add_argument("--label-sep", default=None, metavar="SEP",
                   help="multi-label data: label cells hold several labels joined by SEP (e.g. '|'); a list "
                        "column (Parquet) is stored joined by it, and an empty cell is an image with no label "
                        "(kept, not missing_label). Train with task: multilabel (docs/multilabel.md)")
    for name, default in (("url", "url"), ("label", "label"), ("split", "split"), ("path", "path")):
        p.add_argument(f"--{name}-col", default=None, metavar="NAME",
                       help=f"table column holding the {name} (default: {default})")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    import sys

    from imgclf.stages import download

    options = download.DownloadOptions.from_namespace(args)  # sources and --out included
    # The table of statuses is printed by the stage itself (options.print_summary): in colour, and on Ctrl-C.
    result = download.merge(list(options.sources), options.out, options) if args.merge else download.run(options)
    if result.total == 0 and options.job_shard is not None:  # the hosts all hashed to other jobs: not a failure
        print(f"imgclf download: --shard {options.job_shard} holds no rows (the other jobs hold them all)",
              file=sys.stderr)
        return 0
    if result.counts.get("ok", 0) == 0:  # nothing to train on: say so in one line, exit non-zero
        counts = ", ".join(f"{n} {status}" for status, n in sorted(result.counts.items(), key=lambda kv: -kv[1]))
        skipped = (result.report.get("skipped") or {}).get("by_kind") or {}
        extra = "; skipped: " + ", ".join(f"{n} {kind}" for kind, n in skipped.items()) if skipped else ""
        print(f"imgclf download: no row ended ok ({result.total} rows{': ' + counts if counts else ''}{extra}); "
              f"see {result.report_path}", file=sys.stderr)
        return 1
    return 0
