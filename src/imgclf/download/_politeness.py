"""Politeness that adapts: how many requests each host gets at a time.

Every host starts at a modest limit (`INITIAL` requests in flight) that grows while the host
answers cleanly and quickly, and shrinks when it pushes back (AIMD, as TCP does for a link):

- slow start: +1 per clean answer, so the limit doubles every round trip, until the first push-back;
- then additive increase: +1 per round trip (+1/limit per clean answer);
- growth only while the limit is actually in use (requests were waiting for it) and the smoothed
  time to response headers stays within `LATENCY_HOLD` x the host's baseline (its lowest recent
  latency): a host that starts queueing our requests gets no more of them;
- multiplicative decrease x0.5 on a 429 or 503 answer, or when timeouts and connection
  errors pass `SOFT_FAILURE_RATE` of recent attempts (one dead URL on a healthy host is not
  push-back; a host that stops answering is). At most one decrease per smoothed round trip,
  so the burst of 429s answering one window of requests counts once.
- a 429 or 503 also pauses the whole host (every URL of it): for its Retry-After, at most
  `PAUSE_MAX_S`, else two smoothed round trips. A 429 answers at once, so a limit on requests in
  flight alone does not bound the rate a host that counts requests per second sees.

Latency only ever stops growth, it never shrinks the limit: time to headers is measured by the
client, and a busy client (2 cores decoding images) sees its own event-loop lag in it; measured
here, letting that lag shrink the limit collapsed it to 1 on a healthy host.

The same answers time each host (RFC 6298's smoothed round trip and its variation, as TCP
does): once a host has answered `RTT_SAMPLES` times, an attempt that gets no response headers
within `HEADER_TIMEOUT_FACTOR` x (srtt + 4 x rttvar), at least `HEADER_TIMEOUT_FLOOR_S` and at
most --read-timeout, is a timeout (and retried as one). A host answering in 20 ms does not hold a
slot for 15 s, four times, on a URL that will never answer (measured: that tail alone was longer
than img2dataset's whole run of 20,000 URLs). Only while the host answered something within the
last `ALIVE_S`: a host that went quiet as a whole is waited for the full --read-timeout again
(its rows cut short meanwhile end `timeout`, which --retry-failed retries).

The ceiling is the total concurrency (`--concurrency`, times the workers on Ray). `--per-host N`
replaces all of this by a fixed N. A redirect to another host is counted against the first one.

`Aimd` is the pure arithmetic; `HostLimiter` is the asyncio gate of one process (the single-
machine download). On Ray the same limits hold for the whole cluster: see `_leases`.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from yarl import URL

INITIAL = 8
LATENCY_HOLD = 2.0  # grow only while srtt <= LATENCY_HOLD x baseline + LATENCY_SLACK_S
LATENCY_SLACK_S = 0.01  # absolute slack: scheduling noise on a busy client is not the host's fault
SOFT_FAILURE_RATE = 0.1
SOFT_ALPHA = 1 / 32  # EWMA weight of one attempt: about 4 soft failures in a row cross the rate
BASELINE_WINDOW_S = 10.0  # the baseline is the lowest latency of the last one or two windows
IDLE_FORGET_S = 120.0  # an idle host's state is dropped after this long (bounded memory)
RTT_SAMPLES = 16  # answers before a host's header deadline adapts
HEADER_TIMEOUT_FACTOR = 4.0
HEADER_TIMEOUT_FLOOR_S = 2.0
ALIVE_S = 30.0
PAUSE_MAX_S = 2.0  # a 429/503's Retry-After pauses the whole host, at most this long (see _pause)


def host_key(url: str) -> str:
    """The politeness key of a URL: host and port, as aiohttp's own per-host limit counts them.

    Host and port depend only on the scheme and the authority (what urlsplit, under yarl, cuts at
    the first of / ? #), so yarl parses each distinct authority once: a 20,000-row list from one
    host is one parse, not 20,000 (one per attempt, on the event loop's hot path).
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _host_key(url)
    end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    return _host_key(f"{scheme}://{rest[:end]}")


@functools.lru_cache(maxsize=4096)
def _host_key(origin: str) -> str:
    try:
        parsed = URL(origin)
        return f"{parsed.host}:{parsed.port}"
    except (ValueError, TypeError):
        return ""


@dataclass
class Signals:
    """What a host did over a while: clean answers (with their latency) and push-back."""

    answered: int = 0
    latency_sum: float = 0.0
    latency_min: float = math.inf
    saturated: int = 0  # answers that came while requests were waiting for this host's limit
    overloaded: int = 0  # 429 / 503
    soft: int = 0  # timeouts, resets, refused connections

    def add(self, other: Signals) -> None:
        self.answered += other.answered
        self.latency_sum += other.latency_sum
        self.latency_min = min(self.latency_min, other.latency_min)
        self.saturated += other.saturated
        self.overloaded += other.overloaded
        self.soft += other.soft

    def __bool__(self) -> bool:
        return bool(self.answered or self.overloaded or self.soft)


@dataclass
class Aimd:
    """The adaptive limit of one host (see the module docstring for the rules)."""

    ceiling: int
    limit: float = float(INITIAL)
    slow_start: bool = True
    srtt: float | None = None
    soft_rate: float = 0.0
    last_decrease: float = -math.inf
    _window_start: float = -math.inf
    _min_now: float = math.inf
    _min_before: float = math.inf

    def __post_init__(self) -> None:
        self.limit = float(max(1, min(self.limit, self.ceiling)))

    @property
    def capacity(self) -> int:
        return max(1, int(self.limit))

    @property
    def baseline(self) -> float:
        return min(self._min_now, self._min_before)

    def observe(self, seen: Signals, now: float) -> None:
        attempts = seen.answered + seen.overloaded + seen.soft
        if attempts:
            weight = 1.0 - (1.0 - SOFT_ALPHA) ** attempts
            self.soft_rate += weight * (seen.soft / attempts - self.soft_rate)
        if seen.answered:
            self._latency(seen.latency_sum / seen.answered, seen.answered, seen.latency_min, now)
        if seen.overloaded or self.soft_rate > SOFT_FAILURE_RATE:
            self._decrease(now)
        elif seen.saturated and self._latency_holds():
            step = seen.saturated if self.slow_start else seen.saturated / self.limit
            self.limit = min(float(self.ceiling), self.limit + step)

    def _latency(self, mean: float, count: int, lowest: float, now: float) -> None:
        # EWMA with weight 1/8 per answer, as TCP's srtt; a batch of n answers weighs n of them.
        self.srtt = mean if self.srtt is None else self.srtt + (1 - 0.875 ** count) * (mean - self.srtt)
        if now - self._window_start > BASELINE_WINDOW_S:  # let the baseline follow a route change
            self._min_before, self._min_now, self._window_start = self._min_now, math.inf, now
        self._min_now = min(self._min_now, lowest)

    def _latency_holds(self) -> bool:
        return self.srtt is None or self.srtt <= LATENCY_HOLD * self.baseline + LATENCY_SLACK_S

    def _decrease(self, now: float) -> None:
        # Once per round trip: the answers to one window of requests are one signal, not many.
        if now - self.last_decrease < max(self.srtt or 0.0, 0.05):
            return
        self.limit = max(1.0, self.limit * 0.5)
        self.slow_start = False
        self.last_decrease = now
        self.soft_rate = 0.0  # the next decrease needs fresh evidence


@dataclass
class Rtt:
    """A host's time to response headers (RFC 6298's estimator) and the header deadline it gives."""

    srtt: float = 0.0
    rttvar: float = 0.0
    samples: int = 0
    last_answer: float = -math.inf

    def sample(self, latency: float) -> None:
        if self.samples == 0:
            self.srtt, self.rttvar = latency, latency / 2
        else:
            self.rttvar += 0.25 * (abs(self.srtt - latency) - self.rttvar)
            self.srtt += 0.125 * (latency - self.srtt)
        self.samples += 1
        self.last_answer = time.monotonic()

    def deadline(self, ceiling: float) -> float:
        """Seconds to wait for response headers: `ceiling` (--read-timeout) unless the host is known."""
        if self.samples < RTT_SAMPLES or time.monotonic() - self.last_answer > ALIVE_S:
            return ceiling
        return min(ceiling, max(HEADER_TIMEOUT_FLOOR_S, HEADER_TIMEOUT_FACTOR * (self.srtt + 4 * self.rttvar)))


class Slot:
    """One attempt's hold on a host; the fetcher says how the host answered."""

    __slots__ = ("signal", "latency", "rtt", "retry_after")

    def __init__(self, rtt: Rtt | None = None) -> None:
        self.signal, self.latency, self.retry_after = "", 0.0, None
        self.rtt = rtt or Rtt()

    def answered(self, latency: float, status: int, retry_after: float | None = None) -> None:
        self.signal = "overloaded" if status in (429, 503) else "answered"
        self.latency, self.retry_after = latency, retry_after

    def failed(self) -> None:
        self.signal = "soft"


class _Host:
    __slots__ = ("aimd", "rtt", "in_flight", "waiters", "idle_since", "grant", "seen", "peak", "paused_until")

    def __init__(self, aimd: Aimd | None) -> None:
        self.aimd, self.in_flight, self.idle_since = aimd, 0, 0.0
        self.peak = 0  # most requests in flight or waiting since the last lease report (LeasedLimiter)
        self.rtt = Rtt()
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.grant = 0  # LeasedLimiter only
        self.seen = Signals()  # LeasedLimiter only: not yet reported
        self.paused_until = 0.0  # monotonic time before which no new attempt goes to this host


class HostLimiter:
    """Per-host gate of one event loop: `async with limiter.slot(url) as slot:` around each attempt.

    `fixed` set: every host gets exactly that many slots (--per-host N); else each host's
    limit adapts (Aimd) up to `ceiling`.
    """

    def __init__(self, ceiling: int, fixed: int | None = None) -> None:
        self.ceiling, self.fixed = ceiling, fixed
        self._hosts: dict[str, _Host] = {}
        self._releases = 0

    def limit(self, url_or_key: str) -> int:
        """The current limit of a host (for tests and progress)."""
        key = url_or_key if "://" not in url_or_key else host_key(url_or_key)
        host = self._hosts.get(key)
        return self._capacity(host) if host is not None else self._capacity(self._new_host())

    def _new_host(self) -> _Host:
        return _Host(None if self.fixed else Aimd(self.ceiling))

    def _capacity(self, host: _Host) -> int:
        return self.fixed if self.fixed else host.aimd.capacity  # type: ignore[union-attr]

    @asynccontextmanager
    async def slot(self, url: str) -> AsyncIterator[Slot]:
        key = host_key(url)
        host = self._hosts.get(key)
        if host is None:
            host = self._hosts[key] = self._new_host()
            self._on_new_host(key)
        host.peak = max(host.peak, host.in_flight + len(host.waiters) + 1)
        if host.waiters or host.in_flight >= self._capacity(host):
            waiter = asyncio.get_running_loop().create_future()
            host.waiters.append(waiter)
            try:
                await waiter  # a release hands its freed slot straight to us (in_flight already counted)
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._release(key, host, Slot())  # the slot was handed over just as we were cancelled
                elif waiter in host.waiters:
                    host.waiters.remove(waiter)
                raise
        else:
            host.in_flight += 1
        slot = Slot(host.rtt)
        try:
            while (pause := host.paused_until - time.monotonic()) > 0:  # the host pushed back: wait it out
                await asyncio.sleep(pause)
            yield slot
        finally:
            self._release(key, host, slot)

    def _release(self, key: str, host: _Host, slot: Slot) -> None:
        saturated = bool(host.waiters) or host.in_flight >= self._capacity(host)
        host.in_flight -= 1
        if slot.signal == "overloaded" and not self.fixed:  # a 429/503 speaks for the whole host: pause it
            host.paused_until = max(host.paused_until, time.monotonic() + _pause(slot, host.rtt))
        if slot.signal in ("answered", "overloaded"):
            host.rtt.sample(slot.latency)
        if slot.signal:
            self._observe(host, slot, saturated)
        while host.waiters and host.in_flight < self._capacity(host):
            waiter = host.waiters.popleft()
            if not waiter.done():
                host.in_flight += 1
                waiter.set_result(None)
        if host.in_flight == 0 and not host.waiters:
            host.idle_since = time.monotonic()
        self._releases += 1
        if self._releases % 4096 == 0:
            self._forget_idle()

    def _observe(self, host: _Host, slot: Slot, saturated: bool) -> None:
        if host.aimd is not None:
            host.aimd.observe(_one(slot, saturated), time.monotonic())

    def _on_new_host(self, key: str) -> None:
        pass

    def _forget_idle(self) -> None:
        cutoff = time.monotonic() - IDLE_FORGET_S
        for key in [k for k, h in self._hosts.items()
                    if h.in_flight == 0 and not h.waiters and 0 < h.idle_since < cutoff and not h.seen]:
            del self._hosts[key]


def _pause(slot: Slot, rtt: Rtt) -> float:
    """How long a host that pushed back gets no new attempt: its Retry-After (capped), else two round trips.

    A 429 comes back at once, so a limit on requests in flight does not bound the rate at which
    they hit a host that counts requests per second: measured, one download sent 3x a host's
    rate limit, 429s included (benchmarks/politeness_shards.py). Retry-After is the host's own
    word for when to ask again (RFC 6585), for any URL: honoured for the whole host."""
    if slot.retry_after is not None:
        return min(slot.retry_after, PAUSE_MAX_S)
    return 2 * (rtt.srtt if rtt.samples else slot.latency)


def _one(slot: Slot, saturated: bool) -> Signals:
    if slot.signal == "answered":
        return Signals(answered=1, latency_sum=slot.latency, latency_min=slot.latency, saturated=int(saturated))
    if slot.signal == "overloaded":
        return Signals(overloaded=1)
    return Signals(soft=1)
