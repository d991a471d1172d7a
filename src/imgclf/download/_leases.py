"""Politeness across Ray workers: one set of per-host limits for the cluster, leased out in slices.

`LeaseBook` (held by one small actor, see _engine_ray._Leases) owns one `_politeness.Aimd` per
host for the whole cluster and leases each worker a slice of each host's limit. A worker's
`LeasedLimiter` gates its requests locally against its slices and, every `SYNC_S` seconds (at
once when a new host turns up), reports what its hosts did and how many requests it wants per
host, and gets its new slices back: no remote call per request.
"""

from __future__ import annotations

import asyncio
import time

from imgclf.download._politeness import INITIAL, Aimd, HostLimiter, Signals, Slot, _Host, _one

SYNC_S = 0.2  # workers report and renew their leases this often
LEASE_TTL_S = 3.0  # a worker silent this long (killed) loses its leases


class LeasedLimiter(HostLimiter):
    """A Ray worker's gate: each host's capacity is the slice leased by the cluster's LeaseBook.

    `report()` hands over what was seen since the last call and each host's demand (the most
    requests in flight + waiting since the last report); `apply(grants)` installs the new
    leases and wakes whoever they let through.
    """

    def __init__(self) -> None:
        super().__init__(ceiling=1)
        self.wanted = asyncio.Event()  # set when a host without a lease turns up: sync now

    def _new_host(self) -> _Host:
        return _Host(None)

    def _capacity(self, host: _Host) -> int:
        return host.grant

    def _on_new_host(self, key: str) -> None:
        self.wanted.set()

    def _observe(self, host: _Host, slot: Slot, saturated: bool) -> None:
        host.seen.add(_one(slot, saturated))

    def report(self) -> dict[str, tuple[Signals, int]]:
        out = {}
        for key, host in self._hosts.items():
            now = host.in_flight + len(host.waiters)
            # The peak since the last report, not the count right now: a request between two
            # attempts (decoding, backing off) would otherwise hand its slot to another worker
            # for a whole sync interval.
            demand, host.peak = max(host.peak, now), now
            if demand or host.seen or host.grant:
                out[key] = (host.seen, demand)
                host.seen = Signals()
        return out

    def apply(self, grants: dict[str, int]) -> None:
        for key, grant in grants.items():
            host = self._hosts.get(key)
            if host is None:
                continue
            host.grant = grant
            while host.waiters and host.in_flight < host.grant:
                waiter = host.waiters.popleft()
                if not waiter.done():
                    host.in_flight += 1
                    waiter.set_result(None)


class LeaseBook:
    """The cluster-wide per-host limits (one Aimd each), leased out to workers in slices.

    A worker's slice of a host is its fair share of the host's limit by demand (water-filling),
    never more than what the other workers' current leases leave free; so the leases of a host add
    up to at most its limit, except for one sync interval after the limit drops (leases already
    given are taken back at the holder's next sync; requests already in flight finish).
    """

    def __init__(self, ceiling: int, fixed: int | None = None) -> None:
        self.ceiling, self.fixed = ceiling, fixed
        self.limits: dict[str, Aimd] = {}
        self.leases: dict[str, dict[str, tuple[int, int, float]]] = {}  # host -> worker -> (grant, demand, seen)

    def limit(self, key: str) -> int:
        if self.fixed:
            return self.fixed
        aimd = self.limits.get(key)
        return aimd.capacity if aimd is not None else min(INITIAL, self.ceiling)

    def sync(self, worker: str, report: dict[str, tuple[Signals, int]], now: float | None = None) -> dict[str, int]:
        now = time.monotonic() if now is None else now
        grants = {}
        for key, (seen, demand) in report.items():
            if not self.fixed:
                self.limits.setdefault(key, Aimd(self.ceiling)).observe(seen, now)
            held = self.leases.setdefault(key, {})
            for other in [w for w, (_, _, at) in held.items() if now - at > LEASE_TTL_S]:
                del held[other]  # a worker that stopped syncing (killed) gives its slice back
            held[worker] = (held.get(worker, (0, 0, now))[0], demand, now)
            grants[key] = self._grant(key, worker, held)
            if demand:
                held[worker] = (grants[key], demand, now)
            else:
                del held[worker]
                if not held:
                    del self.leases[key]
                    self._maybe_forget(key, now)
        return grants

    def _grant(self, key: str, worker: str, held: dict[str, tuple[int, int, float]]) -> int:
        limit = self.limit(key)
        demands = {w: d for w, (_, d, _) in held.items() if d > 0}
        if worker not in demands:
            return 0
        share = _water_fill(limit, demands)[worker]
        free = limit - sum(g for w, (g, _, _) in held.items() if w != worker)
        return max(0, min(share, free))

    def _maybe_forget(self, key: str, now: float) -> None:
        aimd = self.limits.get(key)
        if aimd is not None and len(self.limits) > 100_000:  # bounded memory on huge host lists
            del self.limits[key]


def _water_fill(limit: int, demands: dict[str, int]) -> dict[str, int]:
    """Split `limit` among demands: nobody gets more than it asks, the rest is shared evenly."""
    shares, left = {}, limit
    pending = sorted(demands, key=lambda w: (demands[w], w))
    while pending:
        even = left // len(pending)
        worker = pending[0]
        if demands[worker] <= even:
            shares[worker] = demands[worker]
            left -= demands[worker]
            pending.pop(0)
            continue
        extra = left - even * len(pending)  # the remainder goes to the hungriest, one each
        for i, w in enumerate(sorted(pending, key=lambda w: -demands[w])):
            shares[w] = even + (1 if i < extra else 0)
        break
    return shares
