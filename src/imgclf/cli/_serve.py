"""`imgclf serve`: arguments and the call into the serve stage."""

from __future__ import annotations

import argparse

from imgclf.cli._common import add_backend_argument, add_model_argument, add_renamed
from imgclf.rundir import require_model


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP (FastAPI): /predict, /health, /labels, /",
                       description="HTTP service: POST /predict (multipart image or JSON {\"url\": ...}), "
                                   "GET /health, GET /labels, GET /docs, and a page at /.")
    add_model_argument(p, "serve", required=True)
    add_backend_argument(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--allow-private-urls", action="store_true",
                   help="let {'url': ...} fetch private, loopback and link-local addresses")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted request body")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds allowed per URL fetch ({'url': ...})")
    add_renamed(p, "serve", "--fetch-timeout", dest="timeout", type=float)
    p.add_argument("--max-batch", type=int, default=16,
                   help="requests that arrive together are classified in one batch of at most this size")
    p.add_argument("--body-timeout", type=float, default=60.0,
                   help="seconds allowed for a whole request body; slower uploads get HTTP 408")
    p.add_argument("--head-timeout", type=float, default=10.0,
                   help="seconds allowed for a request's line and headers, from connecting or from the "
                        "previous response; idle and slow clients are disconnected after it")
    p.add_argument("--max-concurrency", type=int, default=64,
                   help="POST /predict requests handled at once; more get HTTP 503 (bounds memory: each "
                        "holds up to --max-upload-mb); /health and /labels are never limited")
    p.add_argument("--model-threads", type=int, default=0,
                   help="intra-op threads of a PyTorch or TorchScript model (0: half the cores; the rest decode "
                        "and preprocess requests)")
    p.add_argument("--trusted-proxy", action="append", default=[], type=_network, metavar="ADDR[/BITS]",
                   help="a reverse proxy whose X-Forwarded-For names the client in the access log (repeat "
                        "for several); without it the header is ignored, since any client can send it")
    p.set_defaults(handler=handle)


def _network(value: str) -> str:
    import ipaddress

    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address or network: {value!r}") from None


def handle(args: argparse.Namespace) -> int:
    from imgclf import serve
    from imgclf.net.guard import FetchOptions

    max_bytes = int(args.max_upload_mb * 1024 * 1024)
    fetch = FetchOptions(allow_private=args.allow_private_urls, total_timeout=args.timeout, max_bytes=max_bytes)
    options = serve.ServeOptions(model=require_model(args.model), backend=args.backend, host=args.host, port=args.port,
                                 max_upload_bytes=max_bytes, fetch=fetch, max_batch=args.max_batch,
                                 max_concurrency=args.max_concurrency, body_timeout=args.body_timeout,
                                 head_timeout=args.head_timeout, model_threads=args.model_threads,
                                 trusted_proxies=tuple(args.trusted_proxy))
    if summary := serve.run(options).summary():  # "" today: the start line said where it listened
        print(summary)
    return 0
