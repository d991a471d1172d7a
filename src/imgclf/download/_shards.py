"""How the URL list is cut into shards: for the Ray engine, and for `--shard i/n` jobs.

Ray engine: shard k holds the URLs whose id in the resume state (`urls.id`, given once when a
URL is first seen and never changed) falls in [k * size + 1, (k + 1) * size]. The boundaries
depend on nothing else (not on which rows are still pending, nor on the order of the sources),
so a retried shard or a resumed run can never let two shards own one URL; and since a shard is
committed whole or not at all, a resumed run with another --shard-size is safe too.

`--shard i/n` (SLURM, Kubernetes jobs: no shared state): a row belongs to job i when a stable
hash of its URL is i modulo n, so every row of one URL (duplicates included) lands in the same
job, and a job's set of rows never depends on what the other jobs did.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from imgclf.errors import ConfigError


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
    """`--shard i/n`: this job downloads the rows whose URL hashes to i modulo n."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> JobShard:
        try:
            left, right = text.split("/")
            index, count = int(left), int(right)
        except ValueError:
            raise ConfigError(f"download: --shard must look like i/n, e.g. 0/4 (got {text!r})") from None
        if count < 1 or not 0 <= index < count:
            raise ConfigError(f"download: --shard {text}: need 0 <= i < n (the jobs are 0/{max(count, 1)} "
                              f"to {max(count, 1) - 1}/{max(count, 1)})")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, url: str) -> bool:
        return url_bucket(url, self.count) == self.index


def url_bucket(url: str, count: int) -> int:
    """A stable bucket in [0, count) for a URL (the same on every machine and Python version)."""
    digest = hashlib.blake2b(url.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count
