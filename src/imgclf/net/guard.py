"""Fetch one image URL safely: timeouts, a size cap, bounded redirects, and SSRF protection.

Used by predict (URLs given on the command line) and serve (`{"url": ...}` requests).
Results are values (`FetchedBody` or `FetchFailed`), never exceptions, so one bad URL never
stops a batch or a server.

SSRF: unless `allow_private` is set, every address a request would connect to must be a public
unicast address, by the table in `imgclf.net.addresses` (IANA special-purpose ranges listed
explicitly; 6to4, Teredo, NAT64 and IPv4-mapped addresses judged by the IPv4 inside). Host
names are checked inside the connector's resolver, i.e. on the very addresses the socket
connects to, so a DNS answer that changes between a check and the connect (DNS rebinding)
cannot slip through; IP literals, which aiohttp never resolves, are checked before each hop,
and redirects are followed by hand so every hop is checked (imgclf.net.http follows them and
caps the body, as it does for download). Proxies from the environment are ignored (a proxy
would hide the target).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

from imgclf.net import http as _http
from imgclf.net.addresses import classify
from imgclf.version import __version__


@dataclass(frozen=True)
class FetchOptions:
    allow_private: bool = False
    connect_timeout: float = 5.0
    total_timeout: float = 15.0  # whole fetch, all redirects included
    max_bytes: int = 10_000_000
    max_redirects: int = 3
    concurrency: int = 16


@dataclass(frozen=True)
class FetchedBody:
    data: bytes
    url: str  # final URL after redirects


@dataclass(frozen=True)
class FetchFailed:
    code: str  # invalid_url, refused, timeout, connection_error, tls_error, http_error, too_many_redirects, too_large
    reason: str


class AddressRefused(OSError):
    """The host resolves to an address that SSRF protection forbids."""


def refusal(ip_text: str) -> str | None:
    """What kind of non-public address this is ("loopback", ...), or None for a public unicast one.
    The table is ours (net.addresses), so the answer does not depend on the Python patch level."""
    return classify(ip_text)


def _article(kind: str) -> str:
    return "an" if kind[:1] in "aeiou" else "a"  # "an unspecified address", "a loopback address"


_NUMERIC_HOST = re.compile(r"(?:0[xX][0-9a-fA-F]*|[0-9]+)(?:\.(?:0[xX][0-9a-fA-F]*|[0-9]+))*")


def literal_address(hostname: str) -> str | None:
    """The canonical address when `hostname` is an IP literal in any form the OS accepts, else None.

    `127.1`, `2130706433`, `0177.0.0.1`, `0x7f.1` and `127.0.0.1.` all reach loopback through
    the system resolver, while `ipaddress` rejects them; some aiohttp versions skip the resolver
    for such numeric hosts, so they are canonicalised here. "" means numeric but not a valid address.
    """
    host = hostname.rstrip(".")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _NUMERIC_HOST.fullmatch(host):
        return None
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        return ""


class GuardedResolver(AbstractResolver):
    """Resolve with the system resolver, then refuse the host if any answer is not public."""

    def __init__(self) -> None:
        self._inner = ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        answers = await self._inner.resolve(host, port, family)
        for answer in answers:
            kind = refusal(answer["host"])
            if kind:
                raise AddressRefused(f"{host} resolves to {answer['host']}, {_article(kind)} {kind} address")
        return answers

    async def close(self) -> None:
        await self._inner.close()


def _find_refusal(err: BaseException | None) -> AddressRefused | None:
    while err is not None:
        if isinstance(err, AddressRefused):
            return err
        err = getattr(err, "os_error", None) or err.__cause__ or err.__context__
    return None


class GuardedFetcher:
    """`async with GuardedFetcher(options) as f: result = await f.fetch(url)`; one session, many fetches."""

    def __init__(self, options: FetchOptions = FetchOptions()) -> None:
        self.options = options
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> GuardedFetcher:
        resolver = ThreadedResolver() if self.options.allow_private else GuardedResolver()
        connector = aiohttp.TCPConnector(resolver=resolver, limit=self.options.concurrency,
                                         use_dns_cache=False)  # a cached answer would skip the guard
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.options.connect_timeout,
                                        sock_read=self.options.connect_timeout * 2)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False,
                                              headers={"User-Agent": f"imgclf/{__version__}"})
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    def _check_url(self, url: str) -> FetchFailed | None:
        """Refuse a URL whose host is a non-public IP literal (scheme and host: _http.check_url)."""
        hostname = urlsplit(url).hostname or ""
        host = literal_address(hostname)
        if host is None:
            return None  # a name: the guarded resolver checks what it resolves to
        if host == "":
            return FetchFailed("invalid_url", f"{hostname!r} is not a valid IPv4 address")
        kind = refusal(host)
        if kind:
            return FetchFailed("refused", f"{hostname} is {_article(kind)} {kind} address; such URLs are refused")
        return None

    async def fetch(self, url: str) -> FetchedBody | FetchFailed:
        try:
            return await asyncio.wait_for(self._fetch(url), self.options.total_timeout)
        except TimeoutError:
            return FetchFailed("timeout", f"no complete answer within {self.options.total_timeout:g}s")

    def _check_hop(self, url: URL) -> None:
        bad = self._check_url(str(url))
        if bad:
            raise _http.HttpFailure(bad.code, bad.reason)

    async def _fetch(self, url: str) -> FetchedBody | FetchFailed:
        assert self._session is not None, "use GuardedFetcher as an async context manager"
        try:
            guard = None if self.options.allow_private else self._check_hop
            async with _http.get(self._session, url, self.options.max_redirects, guard) as resp:
                if resp.status != 200:
                    return FetchFailed("http_error", f"HTTP {resp.status} from {str(resp.url)[:200]}")
                return FetchedBody(await _http.read_capped(resp, self.options.max_bytes), str(resp.url))
        except _http.HttpFailure as err:
            return FetchFailed(err.status, err.error)
        except aiohttp.InvalidURL as err:
            return FetchFailed("invalid_url", f"{url[:200]!r}: {err}")
        except aiohttp.ClientSSLError as err:  # an untrusted certificate: never a connection problem
            return FetchFailed("tls_error", f"{err.__class__.__name__}: {str(err)[:200]}")
        except (aiohttp.ClientError, OSError) as err:
            refused = _find_refusal(err)
            if refused:
                return FetchFailed("refused", f"{refused}; such URLs are refused")
            return FetchFailed("connection_error", f"{err.__class__.__name__}: {str(err)[:160]}")


async def fetch_all(urls: list[str], options: FetchOptions) -> list[FetchedBody | FetchFailed]:
    """Fetch many URLs concurrently (bounded by options.concurrency); results in input order."""
    async with GuardedFetcher(options) as fetcher:
        gate = asyncio.Semaphore(options.concurrency)

        async def one(url: str) -> Any:
            async with gate:
                return await fetcher.fetch(url)

        return list(await asyncio.gather(*(one(u) for u in urls)))
