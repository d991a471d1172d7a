"""HTTP pieces shared by download (many URLs, retried) and predict/serve (a few URLs, guarded).

Both follow redirects one hop at a time, so that every hop is checked (scheme and host; serve
also checks the address) and a loop is caught, and both read bodies under a size cap that a
missing or lying Content-Length cannot get round. A final failure is raised as `HttpFailure`,
whose status is a manifest status word; each caller turns it into its own result value.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiohttp
from yarl import URL

ALLOWED_SCHEMES = ("http", "https")
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
CHUNK = 64 * 1024


class HttpFailure(Exception):
    """An outcome that retrying will not change: invalid_url, too_many_redirects, too_large, ..."""

    def __init__(self, status: str, error: str, http_status: int = 0) -> None:
        super().__init__(error)
        self.status, self.error, self.http_status = status, error, http_status


MAX_URL_CHARS = 8192  # as browsers and servers accept (download caps stored cells the same way)


def check_url(url: str) -> str:
    """"" when `url` is an absolute http(s) URL with a host, else the reason it is not."""
    if not url:
        return "empty URL"
    # isprintable() is False for every control character and every whitespace but " ": one C pass
    # for the usual URL; the character loop only for the rare one it cannot clear.
    if (" " in url or not url.isprintable()) and any(ch.isspace() or ord(ch) < 32 for ch in url):
        return "URL contains whitespace or control characters"
    try:
        parsed = URL(url)
        host, _port = parsed.host, parsed.port
    except (ValueError, TypeError) as err:
        return f"malformed URL ({str(err)[:80]})"
    if parsed.scheme.lower() not in ALLOWED_SCHEMES:
        return f"scheme {parsed.scheme + ':' if parsed.scheme else '(none)'} not allowed (only http, https)"
    if not host:
        return "URL has no host"
    if len(url) > MAX_URL_CHARS:
        return f"URL of {len(url)} characters (limit {MAX_URL_CHARS})"
    # DNS limits; a longer name makes the resolver's IDNA step raise instead of failing the row.
    if len(host) > 253 or any(len(label) > 63 for label in host.rstrip(".").split(".")):
        return "host name too long (DNS allows 63 characters per label, 253 in all)"
    return ""


@asynccontextmanager
async def get(session: aiohttp.ClientSession, url: str, max_redirects: int,
              check_hop: Callable[[URL], None] | None = None) -> AsyncIterator[aiohttp.ClientResponse]:
    """GET `url`, following at most `max_redirects` redirects; yields the first other response.

    `check_hop(url)` runs before each request, the first included, and raises HttpFailure to
    refuse it. A redirect loop, a redirect without Location or to a non-http(s) URL ends the fetch.
    """
    problem = check_url(url)
    if problem:
        raise HttpFailure("invalid_url", f"{url[:100]!r}: {problem}")
    current, seen = URL(url, encoded=False), set[str]()
    for _ in range(max_redirects + 1):
        if check_hop is not None:
            check_hop(current)
        seen.add(str(current))
        async with session.get(current, allow_redirects=False) as resp:
            if resp.status not in REDIRECT_STATUSES:
                yield resp
                return
            current = _next_location(resp, current, seen)
    raise HttpFailure("too_many_redirects", f"more than {max_redirects} redirects")


def _next_location(resp: aiohttp.ClientResponse, current: URL, seen: set[str]) -> URL:
    location = resp.headers.get("Location", "")
    if not location:
        raise HttpFailure("http_error", f"HTTP {resp.status} redirect without Location", resp.status)
    try:
        target = current.join(URL(location))
    except ValueError:
        raise HttpFailure("invalid_url", f"redirect to malformed URL {location[:100]!r}", resp.status) from None
    problem = check_url(str(target))
    if problem:
        raise HttpFailure("invalid_url", f"redirect to {str(target)[:100]}: {problem}", resp.status)
    if str(target) in seen:
        raise HttpFailure("too_many_redirects", f"redirect loop back to {str(target)[:100]}", resp.status)
    return target


async def read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, or HttpFailure("too_large") as soon as it passes `limit` bytes."""
    if resp.content_length is not None and resp.content_length > limit:
        raise HttpFailure("too_large", f"Content-Length {resp.content_length} exceeds {limit} bytes", resp.status)
    chunks, total = [], 0
    async for chunk in resp.content.iter_chunked(CHUNK):
        total += len(chunk)
        if total > limit:  # counted after decompression, so a gzip bomb is cut too
            raise HttpFailure("too_large", f"body exceeds {limit} bytes", resp.status)
        chunks.append(chunk)
    return b"".join(chunks)
