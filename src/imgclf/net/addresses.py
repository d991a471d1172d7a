"""Which IP addresses a guarded fetch may connect to: our own table, not the Python patch level's.

`ipaddress`'s `is_private`/`is_global` tables changed between patch releases (3.11.7 counts
192.0.0.192 as public; later releases do not) and never look inside addresses that embed an
IPv4 address. SSRF protection must give the same answer on every supported Python, so the
special-purpose ranges are listed here, from the IANA IPv4 and IPv6 Special-Purpose Address
Registries (plus the ranges that are not allocated for unicast at all), and IPv6 forms that
carry an IPv4 address are unwrapped and judged by that address:

    ::ffff:a.b.c.d (IPv4-mapped), ::a.b.c.d (IPv4-compatible), ::ffff:0:a.b.c.d (IPv4-translated),
    64:ff9b::/96 (NAT64, RFC 6052), 2002::/16 (6to4: bits 16-47), 2001::/32 (Teredo: the server
    and the client, whose address is stored inverted).

Deliberately conservative: a whole registry block is refused even where IANA marks a few of its
addresses globally reachable (192.0.0.9 and .10 in 192.0.0.0/24, anycast in 2001::/23): none of
them serves images. `ipaddress` is used only to parse addresses and to test membership.
"""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

# (network, kind) in order; the first match wins, so a narrower block comes before a wider one.
IPV4_TABLE: tuple[tuple[IPv4Network, str], ...] = tuple((IPv4Network(net), kind) for net, kind in (
    ("0.0.0.0/8", "unspecified"),          # "this network" (RFC 791); 0.0.0.0 reaches the local host
    ("10.0.0.0/8", "private"),             # RFC 1918
    ("100.64.0.0/10", "non-public"),       # shared address space, carrier-grade NAT (RFC 6598)
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),      # cloud metadata services live here (169.254.169.254)
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "reserved"),          # IETF protocol assignments (RFC 6890), incl. 192.0.0.192
    ("192.0.2.0/24", "documentation"),     # TEST-NET-1
    ("192.88.99.0/24", "reserved"),        # 6to4 relay anycast (deprecated, RFC 7526)
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),     # RFC 2544
    ("198.51.100.0/24", "documentation"),  # TEST-NET-2
    ("203.0.113.0/24", "documentation"),   # TEST-NET-3
    ("224.0.0.0/4", "multicast"),
    ("255.255.255.255/32", "broadcast"),
    ("240.0.0.0/4", "reserved"),           # class E, future use
))

IPV6_TABLE: tuple[tuple[IPv6Network, str], ...] = tuple((IPv6Network(net), kind) for net, kind in (
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("64:ff9b:1::/48", "private"),         # local-use NAT64 (RFC 8215): not globally reachable
    ("100::/64", "reserved"),              # discard-only (RFC 6666)
    ("100:0:0:1::/64", "reserved"),        # dummy prefix (RFC 9780)
    ("2001::/23", "reserved"),             # IETF protocol assignments (Teredo is unwrapped first)
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),        # RFC 9637
    ("5f00::/16", "reserved"),             # SRv6 SIDs (RFC 9602)
    ("fc00::/7", "private"),               # unique local
    ("fe80::/10", "link-local"),
    ("fec0::/10", "private"),              # site-local (deprecated)
    ("ff00::/8", "multicast"),
))
GLOBAL_UNICAST_V6 = IPv6Network("2000::/3")  # everything else is unallocated (or listed above)

_MAPPED = IPv6Network("::ffff:0:0/96")
_COMPATIBLE = IPv6Network("::/96")
_TRANSLATED = IPv6Network("::ffff:0:0:0/96")
_NAT64 = IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR = IPv6Network("2002::/16")
_TEREDO = IPv6Network("2001::/32")


def embedded_ipv4(ip: IPv6Address) -> list[IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (and would reach through a translator or tunnel)."""
    value = int(ip)
    if ip in _MAPPED or ip in _TRANSLATED or ip in _NAT64 or (ip in _COMPATIBLE and value > 1):
        return [IPv4Address(value & 0xFFFFFFFF)]
    if ip in _SIX_TO_FOUR:
        return [IPv4Address((value >> 80) & 0xFFFFFFFF)]
    if ip in _TEREDO:  # server in bits 32-63; the client's address is stored XOR 0xffffffff
        return [IPv4Address((value >> 64) & 0xFFFFFFFF), IPv4Address(~value & 0xFFFFFFFF)]
    return []


def _v4_kind(ip: IPv4Address) -> str | None:
    return next((kind for net, kind in IPV4_TABLE if ip in net), None)


def classify(address: str) -> str | None:
    """What kind of non-public address `address` is ("loopback", "private", ...), or None when a
    guarded fetch may connect to it. An IPv6 address that embeds an IPv4 one is judged by it."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # a zone (fe80::1%eth0) is not part of it
    except ValueError:
        return "unparsable"
    if isinstance(ip, IPv4Address):
        return _v4_kind(ip)
    if int(ip) <= 1:  # :: and ::1, before the IPv4-compatible block (::/96) would unwrap them
        return "unspecified" if int(ip) == 0 else "loopback"
    inner = embedded_ipv4(ip)
    if inner:
        return next((kind for kind in map(_v4_kind, inner) if kind), None)
    found = next((kind for net, kind in IPV6_TABLE if ip in net), None)
    if found is None and ip not in GLOBAL_UNICAST_V6:
        return "reserved"
    return found
