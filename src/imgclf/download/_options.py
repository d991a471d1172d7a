"""Typed options of the download stage, validated once at the edge (ConfigError on a bad value)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from imgclf.errors import ConfigError

if TYPE_CHECKING:
    from imgclf.download._shards import JobShard
from imgclf.images import ImageLimits
from imgclf.sources import Columns


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


ResizeMode = Literal["none", "shorter", "longer"]
ImageFormat = Literal["keep", "jpeg", "png", "webp"]


@dataclass(frozen=True)
class StoreSettings:
    """What the CPU workers need to validate and store one body (small and picklable)."""

    data_dir: str
    limits: ImageLimits
    resize: ResizeMode
    size: int
    image_format: ImageFormat
    quality: int
    max_bytes: int = 20_000_000  # local files and archive members: read at most this much
    layout: str = "files"  # "tar": bodies go back to the parent's shard writer (see _writers)


@dataclass(frozen=True)
class DownloadOptions:
    # What: the sources (tables, folders, archives) and the data directory they go into (a folder or s3://...)
    sources: tuple[Path, ...] = ()
    out: Path | str | None = None
    # Network
    concurrency: int = 64
    per_host: int | None = None  # None: adapts per host (see _politeness); N: a fixed cap per host
    timeout: float = 30.0  # total deadline per attempt: connect + headers + redirects + body
    connect_timeout: float = 10.0
    read_timeout: float = 15.0  # longest silence between two reads
    adaptive_timeout: bool = True  # wait for headers a few times the host's usual latency (see _politeness)
    retries: int = 3
    backoff: float = 0.5  # first retry waits about this long; doubles each time, with jitter
    max_backoff: float = 30.0
    max_retry_after: float = 30.0  # Retry-After is honoured up to this many seconds
    max_redirects: int = 5
    max_bytes: int = 20_000_000
    user_agent: str = "imgclf-download/0.1 (+https://github.com/imgclf)"
    # Images
    max_pixels: int = 64_000_000
    min_side: int = 8
    resize: ResizeMode = "longer"
    size: int = 512
    image_format: ImageFormat = "keep"
    quality: int = 90
    # Run
    processes: int | None = None  # None: one per core
    retry_failed: bool = False
    show_progress: bool = True
    print_summary: bool = True
    chunk_rows: int = 50_000
    follow_links: bool = False  # folders: read symlinks that leave the source folder (see _local)
    # Tables: which column holds what (None: url, label, split, path)
    url_col: str | None = None
    label_col: str | None = None
    split_col: str | None = None
    path_col: str | None = None
    # --label-sep: multi-label data (label cells are sets joined by it; empty = no label, kept).
    # Recorded in download_report.json; train/evaluate split the cells with the config's data.label_sep.
    label_sep: str | None = None
    # Storage (see _writers, _sink): --out may be an object-store URL; its state then lives locally
    layout: Literal["files", "tar"] = "files"
    shard_size: int = 1000  # --layout tar: images per tar shard (a kill loses at most one open shard)
    state_dir: str | None = None  # URL --out: local folder for the resume state (None: ~/.cache/imgclf/state/...)
    # Scale-out (see _engine_ray, _shards, _merge); shard_size above is also the URLs per Ray shard
    engine: Literal["local", "ray"] = "local"
    address: str | None = None  # --engine ray: an existing cluster (None: a private local one)
    ray_workers: int | None = None  # --engine ray --workers: None = 1 locally, all CPUs of a cluster
    shard_retries: int = 2  # --engine ray: a failing shard is sent again this many times
    job_shard: str | None = None  # --shard i/n: only the rows whose host hashes to i (SLURM/Kubernetes jobs)
    job_shard_by: str = "host"  # --shard-by url: by URL hash instead (per-host limits then hold per job)

    def __post_init__(self) -> None:
        if isinstance(self.sources, str | Path):  # one source given alone
            object.__setattr__(self, "sources", (self.sources,))
        object.__setattr__(self, "sources", tuple(Path(p) for p in self.sources))  # frozen: normalised once
        if self.per_host is not None and self.per_host < 1:
            raise ConfigError(f"download: --per-host must be > 0 (got {self.per_host})")
        positive = ("concurrency", "timeout", "connect_timeout", "read_timeout", "max_bytes",
                    "max_pixels", "size", "chunk_rows", "shard_size")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"download: {_flag(name)} must be > 0 (got {getattr(self, name)})")
        for name in ("retries", "backoff", "max_backoff", "max_retry_after", "max_redirects", "min_side"):
            if getattr(self, name) < 0:
                raise ConfigError(f"download: {_flag(name)} must be >= 0 (got {getattr(self, name)})")
        if self.resize not in ("none", "shorter", "longer"):
            raise ConfigError(f"download: --resize must be none, shorter or longer (got {self.resize!r})")
        if self.image_format not in ("keep", "jpeg", "png", "webp"):
            raise ConfigError(f"download: --format must be keep, jpeg, png or webp "
                              f"(got {self.image_format!r})")
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"download: --quality must be within 1..100 (got {self.quality})")
        if self.processes is not None and self.processes < 1:
            raise ConfigError(f"download: --processes must be >= 1 (got {self.processes})")
        if self.engine not in ("local", "ray"):
            raise ConfigError(f"download: --engine must be local or ray (got {self.engine!r})")
        if self.ray_workers is not None and self.ray_workers < 1:
            raise ConfigError(f"download: --workers must be >= 1 (got {self.ray_workers})")
        if self.shard_retries < 0:
            raise ConfigError(f"download: --shard-retries must be >= 0 (got {self.shard_retries})")
        if self.job_shard_by not in ("host", "url"):
            raise ConfigError(f"download: --shard-by must be host or url (got {self.job_shard_by!r})")
        self.job()  # --shard i/n: a one-line error now
        if self.label_sep is not None and not 1 <= len(self.label_sep) <= 8:
            raise ConfigError(f"download: --label-sep must be 1 to 8 characters (got {self.label_sep!r})")
        if self.layout not in ("files", "tar"):
            raise ConfigError(f"download: --layout must be files or tar (got {self.layout!r})")

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> DownloadOptions:
        """Build from `imgclf download` arguments; attributes the CLI does not define keep defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
        if getattr(args, "no_progress", False):
            values["show_progress"] = False
        return cls(**values)

    @property
    def workers(self) -> int:
        return self.processes or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                     else (os.cpu_count() or 1))

    def store_settings(self, data_dir: str) -> StoreSettings:
        shrinks = None if self.resize == "none" else (self.resize, self.size)  # see images.jpeg_scale
        return StoreSettings(data_dir=data_dir, limits=ImageLimits(self.max_pixels, self.min_side, shrinks_to=shrinks),
                             resize=self.resize, size=self.size, image_format=self.image_format,
                             quality=self.quality, max_bytes=self.max_bytes, layout=self.layout)

    def columns(self) -> Columns:
        return Columns(url=self.url_col, label=self.label_col, split=self.split_col, path=self.path_col,
                       label_sep=self.label_sep)

    def storage_key(self) -> str:
        """Options that change the stored files: a resumed run must use the same ones."""
        key = f"resize={self.resize} size={self.size} format={self.image_format} quality={self.quality}"
        key = key if self.layout == "files" else f"{key} layout={self.layout}"  # old states: files
        if self.job_shard is None:
            return key
        # One job's rows only. The URL partition keeps its old key, so its job folders still resume.
        return f"{key} shard={self.job()}" if self.job_shard_by == "url" else f"{key} by=host shard={self.job()}"

    def job(self) -> JobShard | None:
        """--shard i/n, parsed (None: every row)."""
        from imgclf.download._shards import JobShard

        return JobShard.parse(self.job_shard, self.job_shard_by) if self.job_shard is not None else None
