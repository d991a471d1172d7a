"""net/addresses.py: the SSRF table is ours, so every supported Python gives the same answers
(issue 22, class 10: on 3.11.7 192.0.0.192 counted as public and 2002:7f00:1:: was not unwrapped)."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest
from fault_server import FaultServer

from imgclf.net import addresses
from imgclf.net.guard import FetchedBody, FetchFailed, FetchOptions, fetch_all

# One row per registry block (first, inside and last address where it matters) and per wrapping form.
TABLE = [
    # IPv4 special-purpose registry
    ("0.0.0.0", "unspecified"), ("0.1.2.3", "unspecified"), ("10.255.255.255", "private"),
    ("100.64.0.1", "non-public"), ("100.127.255.254", "non-public"), ("100.128.0.1", None),
    ("127.0.0.1", "loopback"), ("127.255.255.254", "loopback"), ("169.254.169.254", "link-local"),
    ("172.16.0.1", "private"), ("172.31.255.255", "private"), ("172.32.0.1", None),
    ("192.0.0.0", "reserved"), ("192.0.0.8", "reserved"), ("192.0.0.192", "reserved"),
    ("192.0.0.255", "reserved"), ("192.0.2.10", "documentation"), ("192.88.99.1", "reserved"),
    ("192.168.1.1", "private"), ("198.18.0.1", "benchmarking"), ("198.19.255.255", "benchmarking"),
    ("198.20.0.1", None), ("198.51.100.7", "documentation"), ("203.0.113.9", "documentation"),
    ("224.0.0.1", "multicast"), ("239.255.255.250", "multicast"), ("240.0.0.1", "reserved"),
    ("255.255.255.254", "reserved"), ("255.255.255.255", "broadcast"),
    ("8.8.8.8", None), ("1.1.1.1", None), ("192.0.1.1", None), ("223.255.255.254", None),
    # IPv6 special-purpose registry and unallocated space
    ("::", "unspecified"), ("::1", "loopback"), ("fe80::1", "link-local"), ("fe80::1%eth0", "link-local"),
    ("fc00::1", "private"), ("fd12:3456::1", "private"), ("fec0::1", "private"), ("ff02::1", "multicast"),
    ("100::1", "reserved"), ("2001:db8::1", "documentation"), ("3fff::1", "documentation"),
    ("5f00::1", "reserved"), ("2001:2::1", "reserved"), ("2001:10::1", "reserved"),
    ("64:ff9b:1::a00:1", "private"), ("4000::1", "reserved"), ("::2:0:0:1", "reserved"),
    ("2606:4700:4700::1111", None), ("2a00:1450:4001::200e", None),
    # IPv6 that carries an IPv4 address: judged by the IPv4 address
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"), ("::ffff:8.8.8.8", None),
    ("::127.0.0.1", "loopback"), ("::169.254.169.254", "link-local"),
    ("::ffff:0:127.0.0.1", "loopback"),
    ("64:ff9b::127.0.0.1", "loopback"), ("64:ff9b::c000:c0", "reserved"), ("64:ff9b::8.8.8.8", None),
    ("2002:7f00:1::", "loopback"), ("2002:a9fe:a9fe::1", "link-local"), ("2002:c000:c0::", "reserved"),
    ("2002:808:808::1", None),
    # Teredo: server 65.54.227.120 (public), client stored inverted: 127.0.0.1 -> 80ff:fffe
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback"), ("2001:0:7f00:1::f7f7:f7f7", "loopback"),
    ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", None),
    ("not an address", "unparsable"),
]


@pytest.mark.parametrize("address,kind", TABLE)
def test_address_table(address: str, kind: str | None) -> None:
    assert addresses.classify(address) == kind


def test_the_table_does_not_consult_the_pythons_ipaddress_flags() -> None:
    """is_private, is_global, ipv4_mapped, sixtofour, teredo ... changed between patch releases."""
    flags = {"is_private", "is_global", "is_reserved", "is_loopback", "is_link_local", "is_multicast",
             "is_unspecified", "is_site_local", "ipv4_mapped", "sixtofour", "teredo"}
    net = Path(addresses.__file__).parent
    used = {node.attr for name in ("addresses.py", "guard.py")
            for node in ast.walk(ast.parse((net / name).read_text())) if isinstance(node, ast.Attribute)}
    assert not used & flags


def test_wrapped_loopback_urls_never_reach_the_server() -> None:
    with FaultServer() as server:
        server.add("x.png", b"secret", "image/png")
        port = server.base_url.rsplit(":", 1)[1].rstrip("/")
        hosts = ["[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[::127.0.0.1]", "[64:ff9b::7f00:1]",
                 "[2002:7f00:1::]", "[2001:0:4136:e378:8000:63bf:80ff:fffe]", "0x7f.1", "192.0.0.192"]
        urls = [f"http://{host}:{port}/file/x.png" for host in hosts]
        results = asyncio.run(fetch_all(urls, FetchOptions(connect_timeout=1, total_timeout=3)))
        for host, result in zip(hosts, results, strict=True):
            assert isinstance(result, FetchFailed) and result.code == "refused", (host, result)
        assert server.counts["/file/x.png"] == 0
        # The same server is reachable when private addresses are allowed: the refusal was the guard.
        (ok,) = asyncio.run(fetch_all([server.url("file/x.png")], FetchOptions(allow_private=True)))
        assert isinstance(ok, FetchedBody) and ok.data == b"secret" and server.counts["/file/x.png"] == 1


@pytest.mark.parametrize("ch", ["\t", "\n", "\r", "\x0b", "\x1f", "\x85", "\xa0", "\u1680", "\u2028",
                                "\u3000", " "])
def test_check_url_refuses_every_whitespace_and_control_character(ch: str) -> None:
    from imgclf.net.http import check_url

    assert check_url(f"http://example.com/a{ch}b.png") == "URL contains whitespace or control characters"


@pytest.mark.parametrize("url", ["http://example.com/a.png?x=1&y=%20", "https://例え.jp/写真.jpg",
                                 "http://example.com/\u200bzero-width.png"])
def test_check_url_passes_printable_urls_and_other_invisible_characters(url: str) -> None:
    from imgclf.net.http import check_url

    assert check_url(url) == ""  # a zero-width space is not whitespace: refused by neither rule, as before
