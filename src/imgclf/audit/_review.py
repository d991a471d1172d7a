"""`imgclf audit --review`: a local page to decide each finding (keep / relabel / drop), saved as
AUDIT_DIR/decisions.csv after every decision, which train's `data.exclude` reads.

The server binds 127.0.0.1 only (it reads the data's images and writes a file: not for a network),
and every request must start with a random per-run token, `/TOKEN/...`, printed in the URL: another
local user or a web page in the browser that guesses the port gets 403 (the token is compared in
constant time), as Jupyter does. The page uses relative URLs, so it never has to know the token.
A request names a finding by its number in audit.csv's order (label issues first) and an example
image by (finding, k): never a path, so nothing outside the manifest's images can be read.
Decisions are per manifest row (an image in two findings is decided once), undo is a stack of
batches kept by the server (a page reload keeps it), and each change rewrites decisions.csv
atomically through imgclf.csvfile, so a closed tab or a killed server loses nothing decided.
"""

from __future__ import annotations

import datetime as dt
import hmac
import io
import secrets
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel

from imgclf import auditdir, storage
from imgclf.errors import DataError
from imgclf.images import ImageLimits, Rejected, decode_image
from imgclf.manifest import RowRef, read_manifest, row_refs

IMAGE_SIDE = 224  # served images are at most this many pixels a side (PNG)
EXAMPLES = 4  # images of the suggested class shown next to a finding
_LIMITS = ImageLimits(min_side=1).for_resize(IMAGE_SIDE)


class Decision(BaseModel):
    """The body of POST /api/decide: findings (by number), keep|relabel|drop, the class of a relabel."""

    ids: list[int]
    action: str
    new_label: str = ""


@dataclass
class ReviewState:
    """The findings, the data's classes and example rows, and the decisions (with their undo stack)."""

    audit_dir: Path
    data_dir: str | Path
    findings: pd.DataFrame
    classes: list[str]
    refs: dict[int, RowRef]
    meta: dict[int, tuple[str, str]]  # row -> (split, label), for example captions
    examples: dict[str, list[int]]
    decisions: dict[int, dict[str, Any]] = field(default_factory=dict)
    history: list[list[tuple[int, dict[str, Any] | None]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, audit_dir: Path, data_dir: str | Path) -> ReviewState:
        findings = auditdir.read_findings(Path(audit_dir) / auditdir.CSV).reset_index(drop=True)
        manifest = read_manifest(data_dir)
        auditdir.check_against_manifest(findings, manifest, Path(audit_dir) / auditdir.CSV)
        ok = manifest[manifest["status"] == "ok"]
        if ok.empty:
            raise DataError(f"{data_dir}: no ok images to review")
        refs = dict(zip(manifest["row"].astype(int).tolist(), row_refs(manifest), strict=True))
        flagged = set(findings["row"])
        # Examples of a class: its first train images that no finding doubts.
        clean = ok[~ok["row"].isin(flagged) & (ok["split"] == "train")]
        examples = {str(k): g["row"].astype(int).head(EXAMPLES).tolist() for k, g in clean.groupby("label")}
        meta = dict(zip(ok["row"].astype(int).tolist(), zip(ok["split"], ok["label"], strict=True), strict=True))
        state = cls(Path(audit_dir), data_dir, findings, sorted(ok["label"].unique().tolist()), refs, meta, examples)
        state._read_decisions(manifest)
        return state

    def _read_decisions(self, manifest: pd.DataFrame) -> None:
        path = self.audit_dir / auditdir.DECISIONS
        if not path.is_file():
            return
        frame = auditdir.read_findings(path)
        auditdir.check_against_manifest(frame, manifest, path)
        for rec in frame.to_dict("records"):
            self.decisions[int(rec["row"])] = {c: rec.get(c, "") for c in auditdir.DECISION_COLUMNS}

    # --- what the page reads ------------------------------------------------------------------
    def view(self) -> dict[str, Any]:
        cols = ["kind", "row", "split", "label", "suggested", "score", "action", "detail"]
        items = []
        for i, rec in enumerate(self.findings[cols].to_dict("records")):
            title, rows = self.example_rows(i)
            items.append({"id": i, **rec, "row": int(rec["row"]), "score": float(rec["score"]),
                          "examples_title": title, "examples": [self._caption(r) for r in rows]})
        return {"classes": self.classes, "findings": items, **self.decided()}

    def example_rows(self, finding: int) -> tuple[str, list[int]]:
        """What a finding is compared with: the other members of its duplicate group (leakage,
        conflict, near-duplicate), else train images of the suggested class (or of its own)."""
        f = self.findings.loc[finding]
        if int(f["group"]) >= 0:
            same = self.findings[(self.findings["kind"] == f["kind"]) & (self.findings["group"] == f["group"])]
            rows = [int(r) for r in dict.fromkeys(same["row"]) if int(r) != int(f["row"])]
            return "the same picture elsewhere", rows[:EXAMPLES]
        shown = f["suggested"] or f["label"]
        return f"examples of {shown}", self.examples.get(shown, [])

    def _caption(self, row: int) -> str:
        m = self.meta.get(row)
        return f"row {row}" if m is None else f"row {row} · {m[0]} · {m[1]}"

    def decided(self) -> dict[str, Any]:
        return {"decisions": {str(r): d for r, d in self.decisions.items()}, "undo": len(self.history)}

    def image(self, finding: int, example: int | None = None) -> bytes | None:
        """PNG bytes of a finding's image or of its k-th example; None when there is none or it is unreadable."""
        if not 0 <= finding < len(self.findings):
            return None
        row = int(self.findings.at[finding, "row"])
        if example is not None:
            rows = self.example_rows(finding)[1]
            if not 0 <= example < len(rows):
                return None
            row = rows[example]
        try:
            decoded = decode_image(storage.read_row(self.data_dir, self.refs[row]), _LIMITS)
        except (OSError, ValueError, DataError):
            return None
        if isinstance(decoded, Rejected):
            return None
        decoded.image.thumbnail((IMAGE_SIDE, IMAGE_SIDE))
        buf = io.BytesIO()
        decoded.image.save(buf, format="PNG")
        return buf.getvalue()

    # --- what the page changes ----------------------------------------------------------------
    def decide(self, ids: list[int], action: str, new_label: str = "") -> dict[str, Any]:
        """One batch: the same decision for every finding in `ids`; saved before this returns."""
        if action not in auditdir.DECISION_ACTIONS:
            raise ValueError(f"action must be one of {', '.join(auditdir.DECISION_ACTIONS)}, got {action!r}")
        if action == "relabel" and new_label not in self.classes:
            raise ValueError(f"relabel to {new_label!r}: not a class of this data")
        if not ids or any(not 0 <= i < len(self.findings) for i in ids):
            raise ValueError("name findings by their number in audit.csv")
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        with self.lock:
            batch = []
            for row, sha in dict(zip(self.findings.loc[ids, "row"].astype(int), self.findings.loc[ids, "sha256"],
                                     strict=True)).items():
                batch.append((row, self.decisions.get(row)))
                self.decisions[row] = {"row": row, "sha256": sha, "action": action,
                                       "new_label": new_label if action == "relabel" else "", "decided_at": now}
            self.history.append(batch)
            self._save()
            return self.decided()

    def undo(self) -> dict[str, Any]:
        """Take back the last batch (each row gets its decision from before it, or none)."""
        with self.lock:
            if self.history:
                for row, before in reversed(self.history.pop()):
                    if before is None:
                        self.decisions.pop(row, None)
                    else:
                        self.decisions[row] = before
                self._save()
            return self.decided()

    def _save(self) -> None:
        frame = pd.DataFrame([self.decisions[r] for r in sorted(self.decisions)],
                             columns=list(auditdir.DECISION_COLUMNS))
        auditdir.write_decisions(frame, self.audit_dir)


def new_token() -> str:
    """A per-run secret for the URL: 128 random bits, URL-safe."""
    return secrets.token_urlsafe(16)


class TokenGate:
    """ASGI middleware: only `/TOKEN/...` reaches the app (with the prefix removed); anything else is 403.

    The token is the first path segment rather than a query parameter so that the page's relative
    URLs (images, api calls) carry it without the page knowing it.
    """

    def __init__(self, inner: Any, token: str) -> None:
        self.inner = inner
        self.token = token.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # lifespan: startup and shutdown of the server itself
            await self.inner(scope, receive, send)
            return
        first, slash, rest = scope["path"].lstrip("/").partition("/")
        # compare_digest: the time taken does not tell how many leading characters were right.
        if not hmac.compare_digest(first.encode(errors="surrogateescape"), self.token):
            await _plain(send, 403, b"forbidden: open the URL that imgclf audit --review printed (with its token)\n")
        elif not slash:  # /TOKEN -> /TOKEN/, so that the page's relative URLs resolve under the token
            await _plain(send, 307, b"", [(b"location", b"/" + self.token + b"/")])
        else:
            await self.inner({**scope, "path": "/" + rest, "raw_path": ("/" + rest).encode()}, receive, send)


async def _plain(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def app(state: ReviewState, token: str) -> Any:
    """The review application over one ReviewState, behind its token (no docs pages: nothing but the review)."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import HTMLResponse, Response

    api = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    page = (Path(__file__).parent / "templates" / "review.html").read_text(encoding="utf-8")

    @api.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @api.get("/api/state")
    def view() -> dict[str, Any]:
        return state.view()

    def png(data: bytes | None) -> Response:
        if data is None:
            raise HTTPException(404, "no such image")
        return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @api.get("/img/{finding}")
    def image(finding: int) -> Response:
        return png(state.image(finding))

    @api.get("/img/{finding}/example/{k}")
    def example(finding: int, k: int) -> Response:
        return png(state.image(finding, k))

    @api.post("/api/decide")
    def decide(body: Decision) -> dict[str, Any]:
        try:
            return state.decide(body.ids, body.action, body.new_label)
        except ValueError as err:
            raise HTTPException(400, str(err)) from None

    @api.post("/api/undo")
    def undo() -> dict[str, Any]:
        return state.undo()

    return TokenGate(api, token)


def bind(port: int = 0) -> socket.socket:
    """A listening socket on 127.0.0.1 (port 0: a free one, chosen by the system)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(64)
    return sock


def server(state: ReviewState, token: str) -> Any:
    """A uvicorn Server for the page at /TOKEN/; `.run(sockets=[bind()])` runs it, `.should_exit = True` stops it."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app(state, token), log_level="warning", access_log=False))


def serve(audit_dir: Path, data_dir: str | Path, port: int = 0) -> None:
    """Serve the review until Ctrl-C, printing where."""
    state = ReviewState.load(audit_dir, data_dir)
    sock = bind(port)
    token = new_token()
    print(f"review {len(state.findings)} finding(s) at http://127.0.0.1:{sock.getsockname()[1]}/{token}/ "
          f"(decisions saved to {audit_dir / auditdir.DECISIONS}; Ctrl-C to stop)", flush=True)
    server(state, token).run(sockets=[sock])
