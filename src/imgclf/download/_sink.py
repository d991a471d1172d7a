"""Where a download run puts its results: the output (a local folder or an object-store URL), the
local work folder that holds the resume state, and, for `--layout tar`, the shard sink.

    target = Target.resolve("s3://bucket/data", state_dir=None)   # state in ~/.cache/imgclf/state/<hash>
    target.publish(MANIFEST_NAME, REPORT_NAME)                      # upload the finished outputs

A local --out is its own work folder (DATA_DIR/.state.sqlite, as always). SQLite cannot live on
object storage, so for a URL the state, the temporary files and the outputs before upload live
in a local folder: `--state-dir`, by default $XDG_CACHE_HOME/imgclf/state/<sha256(out)[:16]>
(~/.cache/...). Run the same command on the same machine (or with the same --state-dir) to resume.

`TarSink` is the local engine's side of the tar layout: stored images are appended to the
current shard; their outcomes are held until the shard's tar is complete and published, then
committed in one transaction (the shard is the commit point, as for a Ray shard). A kill loses
at most the open shard's images (fetched again by the next run), never a committed row.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from imgclf import storage
from imgclf.download._state import Outcome
from imgclf.download._writers import SHARDS_DIR, TarShardWriter, shard_name, shard_number
from imgclf.errors import ConfigError, DataError, first_line

log = logging.getLogger(__name__)


def default_state_dir(out: str) -> Path:
    """The local folder holding the resume state of an object-storage --out."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    key = hashlib.sha256(out.rstrip("/").encode()).hexdigest()[:16]
    return Path(cache) / "imgclf" / "state" / key


@dataclass(frozen=True)
class Target:
    out: str  # DATA_DIR as given: a local folder or a URL
    work_dir: Path  # local: resume state, temporary files, outputs before upload

    @property
    def remote(self) -> bool:
        return storage.is_url(self.out)

    @classmethod
    def resolve(cls, out: str | os.PathLike[str], state_dir: str | os.PathLike[str] | None = None) -> Target:
        out = os.fspath(storage.location(out))
        if not storage.is_url(out):
            if state_dir is not None:
                raise ConfigError("download: --state-dir is for an object-storage --out (s3://...); a local "
                                  "--out keeps its state inside itself")
            return cls(out, Path(out))
        storage.check_scheme(out, write=True)  # memory://, zip://, http(s)://: one line, before anything runs
        storage.filesystem(out)  # a missing s3fs is one line now, not after the ingest
        work = Path(state_dir) if state_dir is not None else default_state_dir(out)
        work.mkdir(parents=True, exist_ok=True)
        (work / "out.txt").write_text(out + "\n")  # which output this state belongs to, for people
        return cls(out, work)

    def publish(self, *names: str) -> None:
        """Upload finished outputs from the work folder (nothing to do for a local --out)."""
        if self.remote:
            for name in names:
                storage.upload(self.work_dir / name, self.out, name)

    def shard_files(self) -> list[str]:
        """Tar shards present under out/shards/ (names relative to out)."""
        if self.remote:
            fs, root = storage.filesystem(storage.join(self.out, SHARDS_DIR))
            try:
                return [f"{SHARDS_DIR}/{p.rstrip('/').rsplit('/', 1)[-1]}" for p in fs.ls(root, detail=False)]
            except FileNotFoundError:
                return []
        folder = Path(self.out) / SHARDS_DIR
        return [f"{SHARDS_DIR}/{p.name}" for p in folder.glob("*.tar")] if folder.is_dir() else []

    def remove_orphan_shards(self, committed: set[str]) -> int:
        """After a killed run: remove shards that were published but never committed."""
        orphans = [name for name in self.shard_files() if name not in committed and shard_number(name) >= 0]
        for name in orphans:
            if self.remote:
                fs, path = storage.filesystem(storage.join(self.out, name))
                fs.rm_file(path)
            else:
                (Path(self.out) / name).unlink(missing_ok=True)
        return len(orphans)


def next_shard_number(committed: set[str]) -> int:
    return 1 + max((shard_number(name) for name in committed), default=-1)


class TarSink:
    """Appends stored images to the current shard; commits their rows when the shard is published."""

    def __init__(self, target: Target, first_number: int, shard_size: int,
                 release: Callable[[list[Outcome]], None]) -> None:
        self.target, self.shard_size, self.release = target, shard_size, release
        self._number = first_number
        self._writer: TarShardWriter | None = None
        self._held: list[Outcome] = []
        self._sealing: set[asyncio.Task[None]] = set()
        self._error: BaseException | None = None
        self.shards_written = 0

    def add(self, outcome: Outcome) -> None:
        """An ok outcome whose `data` is the stored image (StoreSettings.layout == "tar")."""
        data = outcome.data
        assert data is not None
        if self._error is not None:
            raise self._error  # a shard could not be published: stop, its rows stay pending
        if self._writer is None:
            self._writer = TarShardWriter(self.target.out, shard_name(self._number), self.target.work_dir)
            self._number += 1
        ext = outcome.path.rsplit(".", 1)[-1]
        location = self._writer.write(outcome.sha256, ext, data)
        self._held.append(replace(outcome, path=location.path, shard=location.shard, data=None))
        if len(self._writer) >= self.shard_size:
            self._seal()

    def _seal(self) -> None:
        writer, held = self._writer, self._held
        self._writer, self._held = None, []
        if writer is None:
            return
        task = asyncio.get_running_loop().create_task(self._publish(writer, held))
        self._sealing.add(task)
        task.add_done_callback(self._sealing.discard)

    async def _publish(self, writer: TarShardWriter, held: list[Outcome]) -> None:
        try:
            final = await asyncio.to_thread(writer.close)  # the tar write and upload off the event loop
        except Exception as err:  # disk full, denied, endpoint down: stop; the rows stay pending
            writer.abort()
            where = storage.join(self.target.out, writer.name)
            self._error = self._error or DataError(f"{where}: cannot write this shard ({first_line(err)}); "
                                                   "fix it and run the same command again")
            return
        self.shards_written += 1
        self.release([replace(o, offset=final[o.path].offset) for o in held])

    async def aclose(self) -> None:
        """Publish the open shard (also on Ctrl-C: nothing done is lost) and wait for every shard."""
        self._seal()
        while self._sealing:
            await asyncio.gather(*list(self._sealing), return_exceptions=True)
        if self._error is not None:
            raise self._error
