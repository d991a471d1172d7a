"""Shared HTTP pieces (core layer): used by download (many URLs, retried) and predict/serve.

`net.http`: URL check, a redirect follower that checks every hop, a capped body reader.
`net.guard`: a one-off fetch for predict/serve that refuses private addresses (SSRF).
`net.addresses`: the table of non-public address ranges that guard uses (ours, not ipaddress's).
`net.run`: asyncio.run on uvloop where it is installed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on uvloop's event loop where uvloop is installed (it is not on Windows).

    The download's fetch loop is one core's work per image (aiohttp's client, the politeness gate,
    the pool's pipes); uvloop's C transports and timers make that loop cheaper (docs/benchmarks.md,
    issue 23 item 5). Behaviour is asyncio's: the same tasks, timeouts and Ctrl-C.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
