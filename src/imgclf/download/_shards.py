"""How the URL list is cut into shards: for the Ray engine, and for `--shard i/n` jobs.

Ray engine: shard k holds the URLs whose id in the resume state (`urls.id`, given once when a
URL is first seen and never changed) falls in [k * size + 1, (k + 1) * size]. The boundaries
depend on nothing else (not on which rows are still pending, nor on the order of the sources),
so a retried shard or a resumed run can never let two shards own one URL; and since a shard is
committed whole or not at all, a resumed run with another --shard-size is safe too.

`--shard i/n` (SLURM, Kubernetes jobs: no shared state): a row belongs to job i when a stable
hash of its host is i modulo n (`--shard-by host`, the default), so every row of one host lands
in the same job. The jobs share nothing, so each holds its own per-host limits (_politeness);
with the host partition no two jobs ever talk to one host, and a host gets exactly the limit one
download gives it, not n times that. The key is `_politeness.host_key` (host lowercased, IDNA,
with its effective port): the very key the limits are counted by. `--shard-by url` (a stable
hash of the URL) is kept for a list dominated by a few hosts, where the host partition would put
most rows in one job; then every job holds its own limit for those hosts (see docs/scale.md).
Either way every row of one URL (duplicates included) lands in the same job, and a job's set of
rows never depends on what the other jobs did.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from imgclf.download._politeness import host_key
from imgclf.errors import ConfigError

PARTITIONS = ("host", "url")
CROWDED = 2.0  # a job holding more than CROWDED / n of the rows gets a note: one host dominates


@dataclass(frozen=True)
class Shard:
    """The pending URLs of one shard, as (url id, url), in id order."""

    index: int
    items: list[tuple[int, str]]

    def describe(self, size: int) -> str:
        return f"shard {self.index} (URL ids {self.index * size + 1}-{(self.index + 1) * size}, " \
               f"{len(self.items)} URLs pending)"


def shard_of(url_id: int, size: int) -> int:
    return (url_id - 1) // size


def iter_shards(pending: Iterable[tuple[int, str]], size: int) -> Iterator[Shard]:
    """Group pending (id, url) pairs, in id order, into their shards (empty shards are skipped)."""
    current, items = -1, []
    for url_id, url in pending:
        index = shard_of(url_id, size)
        if index != current and items:
            yield Shard(current, items)
            items = []
        current = index
        items.append((url_id, url))
    if items:
        yield Shard(current, items)


@dataclass(frozen=True)
class JobShard:
    """`--shard i/n`: this job downloads the rows whose host (or URL) hashes to i modulo n."""

    index: int
    count: int
    by: str = "host"

    @classmethod
    def parse(cls, text: str, by: str = "host") -> JobShard:
        try:
            left, right = text.split("/")
            index, count = int(left), int(right)
        except ValueError:
            raise ConfigError(f"download: --shard must look like i/n, e.g. 0/4 (got {text!r})") from None
        if count < 1 or not 0 <= index < count:
            raise ConfigError(f"download: --shard {text}: need 0 <= i < n (the jobs are 0/{max(count, 1)} "
                              f"to {max(count, 1) - 1}/{max(count, 1)})")
        if by not in PARTITIONS:
            raise ConfigError(f"download: --shard-by must be one of {', '.join(PARTITIONS)} (got {by!r})")
        return cls(index, count, by)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, url: str) -> bool:
        return job_bucket(url, self.count, self.by) == self.index

    def filter(self) -> JobFilter:
        return JobFilter(self)


class JobFilter:
    """`owns` for the ingest, counting the rows it saw and kept (for the crowded-job note).

    Its repr is part of the ingest fingerprint (a resumed run reads its input again only when
    it changed): the same for the same partition, the counts left out; the URL partition keeps
    the repr it had before the host partition existed, so its job folders resume without a re-read.
    """

    def __init__(self, job: JobShard) -> None:
        self.job, self.seen, self.kept = job, 0, 0

    def __call__(self, url: str) -> bool:
        self.seen += 1
        mine = self.job.owns(url)
        self.kept += mine
        return mine

    def __repr__(self) -> str:
        extra = "" if self.job.by == "url" else f", by={self.job.by!r}"
        return f"<bound method JobShard.owns of JobShard(index={self.job.index}, count={self.job.count}{extra})>"

    def note(self) -> str | None:
        """One line when this job holds far more than its 1/n share (None when it does not, or on
        a resumed run that did not read the input again)."""
        if self.job.count < 2 or self.seen == 0 or self.kept <= CROWDED * self.seen / self.job.count:
            return None
        return (f"--shard {self.job} holds {self.kept} of {self.seen} rows ({self.kept / self.seen:.0%}, "
                f"a fair share is {1 / self.job.count:.0%}): a few hosts hold most of the list, so one job "
                f"gets them (each host is polite to one job only); see docs/scale.md for --shard-by url")


def job_bucket(url: str, count: int, by: str = "host") -> int:
    """The job of a URL: by its politeness key (host and port) or by the URL itself."""
    return url_bucket(host_key(url) if by == "host" else url, count)


def url_bucket(url: str, count: int) -> int:
    """A stable bucket in [0, count) for a URL (the same on every machine and Python version)."""
    digest = hashlib.blake2b(url.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count
