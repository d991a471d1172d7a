"""Shared HTTP pieces (core layer): used by download (many URLs, retried) and predict/serve.

`net.http`: URL check, a redirect follower that checks every hop, a capped body reader.
`net.guard`: a one-off fetch for predict/serve that refuses private addresses (SSRF).
`net.addresses`: the table of non-public address ranges that guard uses (ours, not ipaddress's).
"""
