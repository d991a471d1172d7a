"""Network side of the download: one URL in, a body or a failure status out (never an exception).

Each attempt has a connect timeout, a read timeout (longest silence) and a total deadline that
covers redirects and the whole body, so a server that trickles a byte a second frees its slot.
Timeouts, connection errors, 408, 429 and 5xx are retried with exponential backoff and full
jitter; Retry-After is honoured up to a bound; other 4xx are final. A certificate the system
does not trust (self-signed, private CA, expired, wrong host) ends the row at once as
`tls_error`: asking again gets the same certificate. Redirects and the capped
body read are imgclf.net.http's, shared with predict and serve. How many attempts each host
gets at a time is the limiter's call (`_politeness`: adaptive by default, `--per-host N` fixed);
each attempt tells it how the host answered.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from dataclasses import dataclass

import aiohttp

from imgclf.download._options import DownloadOptions
from imgclf.download._politeness import HostLimiter, Slot
from imgclf.errors import first_line
from imgclf.net import http as _http

RETRY_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))
STALL_S = 0.25  # a header deadline whose timer fires this late was missed by us, not by the host


@dataclass
class Fetched:
    """Outcome of fetching one URL: `body` is set when status is None (a 2xx body to validate)."""

    status: str | None
    error: str = ""
    http_status: int = 0
    attempts: int = 0
    body: bytes | None = None


class _Retryable(Exception):
    def __init__(self, status: str, error: str, http_status: int = 0, wait: float | None = None) -> None:
        super().__init__(error)
        self.status, self.error, self.http_status, self.wait = status, error, http_status, wait


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds asked by a Retry-After header (delta-seconds or HTTP date), None when absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Fetcher:
    """Owns the aiohttp session; `await fetcher.fetch(url)` for each URL, then `await close()`."""

    def __init__(self, options: DownloadOptions, limiter: HostLimiter | None = None) -> None:
        self.options = options
        self.limiter = limiter or HostLimiter(options.concurrency, options.per_host)
        # Per host, the limiter decides (limit_per_host=0: none in the connector).
        connector = aiohttp.TCPConnector(limit=options.concurrency, limit_per_host=0,
                                         ttl_dns_cache=300, enable_cleanup_closed=True)
        timeout = aiohttp.ClientTimeout(total=None, connect=options.connect_timeout,
                                        sock_connect=options.connect_timeout, sock_read=options.read_timeout)
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=True, trust_env=False,
            headers={"User-Agent": options.user_agent, "Accept": "image/*,*/*;q=0.8"},
            max_field_size=16384, read_bufsize=_http.CHUNK)

    async def close(self) -> None:
        await self.session.close()

    async def fetch(self, url: str) -> Fetched:
        opts = self.options
        attempts, last = 0, Fetched("connection_error", "not attempted")
        while True:
            attempts += 1
            async with self.limiter.slot(url) as slot:  # waiting for a slot is not part of the deadline
                try:
                    async with asyncio.timeout(opts.timeout):
                        body, http_status = await self._attempt(url, slot)
                    return Fetched(None, "", http_status, attempts, body)
                except _http.HttpFailure as err:
                    return Fetched(err.status, err.error, err.http_status, attempts)
                except _Retryable as err:
                    last, wait = Fetched(err.status, err.error, err.http_status, attempts), err.wait
                except _NoHeaders as err:
                    last, wait = Fetched("timeout", str(err), 0, attempts), None
                    slot.failed()
                except aiohttp.ServerTimeoutError as err:  # connect or read timeout (a TimeoutError too)
                    last, wait = Fetched("timeout", first_line(err), 0, attempts), None
                    slot.failed()
                except TimeoutError:
                    last, wait = Fetched("timeout", f"no complete answer within the {opts.timeout:g}s deadline",
                                         0, attempts), None
                    slot.failed()
                except aiohttp.ClientConnectorCertificateError as err:  # before ClientError: never retried
                    return Fetched("tls_error", tls_reason(err), 0, attempts)
                except aiohttp.ClientSSLError as err:  # a handshake that failed otherwise may go through
                    last, wait = Fetched("tls_error", first_line(err), 0, attempts), None
                    slot.failed()
                except (aiohttp.ClientError, OSError) as err:
                    last, wait = Fetched("connection_error", first_line(err), 0, attempts), None
                    slot.failed()
            if attempts > opts.retries:
                if attempts > 1:
                    last.error = f"{last.error} (after {attempts} attempts)"
                return last
            await asyncio.sleep(self._backoff(attempts, wait))

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        opts = self.options
        if retry_after is not None:
            return min(retry_after, opts.max_retry_after)
        # Full jitter: spreads retries of many rows that failed together (a flapping host).
        return random.uniform(0.5, 1.0) * min(opts.max_backoff, opts.backoff * 2 ** (attempt - 1))

    async def _attempt(self, url: str, slot: Slot) -> tuple[bytes, int]:
        started = time.monotonic()
        wait = slot.rtt.deadline(self.options.read_timeout) if self.options.adaptive_timeout else None
        if wait is not None and wait >= self.options.read_timeout:
            wait = None  # aiohttp's own read timeout says it (same value)
        try:
            async with asyncio.timeout(None) as headers_due:
                deadline = _HeaderDeadline(headers_due, wait) if wait is not None else None
                try:
                    async with _http.get(self.session, url, self.options.max_redirects) as resp:
                        if deadline is not None:
                            deadline.cancel()  # the body has its own limits (--read-timeout, --timeout)
                        slot.answered(time.monotonic() - started, resp.status,  # time to headers: host latency
                                      retry_after_seconds(resp.headers.get("Retry-After")))  # a 429's pause
                        return await self._answer(resp)
                finally:
                    if deadline is not None:
                        deadline.cancel()
        except TimeoutError:
            if wait is not None and headers_due.expired():
                raise _NoHeaders(f"no response headers within {wait:.1f}s (this host usually answers in "
                                 f"{slot.rtt.srtt * 1000:.0f} ms)") from None
            raise

    async def _answer(self, resp: aiohttp.ClientResponse) -> tuple[bytes, int]:
        if resp.status in RETRY_STATUSES:
            wait = retry_after_seconds(resp.headers.get("Retry-After"))
            raise _Retryable("http_error", f"HTTP {resp.status} {resp.reason or ''}".strip(), resp.status, wait)
        if not 200 <= resp.status < 300:
            raise _http.HttpFailure("http_error", f"HTTP {resp.status} {resp.reason or ''}".strip(), resp.status)
        return await _http.read_capped(resp, self.options.max_bytes), resp.status


class _HeaderDeadline:
    """Expires `timeout` `wait` seconds from now, unless its timer fires late: then this process's
    event loop was stalled (2 busy cores, a slow SQLite page), the host's answer may be sitting in
    the socket unread, and the host gets `wait` more seconds. Expiring anyway blamed the host for
    our own stall and fetched a good image a second time (issue 22: 30-42 of 5,000 refetched)."""

    def __init__(self, timeout: asyncio.Timeout, wait: float) -> None:
        self.timeout, self.wait = timeout, wait
        self.loop = asyncio.get_running_loop()
        self.handle = self._arm()

    def _arm(self) -> asyncio.TimerHandle:
        due = self.loop.time() + self.wait
        return self.loop.call_at(due, self._check, due)

    def _check(self, due: float) -> None:
        if self.loop.time() - due > STALL_S:
            self.handle = self._arm()  # I/O that arrived during the stall runs before the request resumes
        else:
            self.timeout.reschedule(self.loop.time())  # expire now: asyncio.Timeout cancels the attempt

    def cancel(self) -> None:
        self.handle.cancel()
def tls_reason(err: aiohttp.ClientConnectorCertificateError) -> str:
    """What OpenSSL said about the certificate, and the way to trust a private CA."""
    said = getattr(err.certificate_error, "verify_message", "") or first_line(err.certificate_error)
    return (f"certificate of {err.host}:{err.port} not trusted ({said}); for a private CA set "
            "SSL_CERT_FILE=/path/to/ca-bundle.pem")


class _NoHeaders(Exception):
    """The host's adaptive header deadline passed (see _politeness.Rtt)."""


