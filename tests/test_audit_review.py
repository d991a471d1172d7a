"""imgclf audit --review in headless Chromium: a real audit of real images with planted flips, the
review server started here on 127.0.0.1, findings decided with the keyboard (drop, relabel, a batch
kept and undone, a keep undone), decisions.csv checked, and a tiny retrain that reads it through
data.exclude (the dropped row absent from split.csv, the relabelled row with its new label)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from imgclf import auditdir
from imgclf.errors import DataError

pytest.importorskip("cleanlab")
pytest.importorskip("imagehash")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

TOKEN = "t0ken-Of-This-Test_run"  # the CLI makes a random one per run (_review.new_token)


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, set[int]]:
    from test_audit import SHIPPED, build_noisy

    from imgclf.stages import audit

    data, flips, _ = build_noisy(tmp_path_factory.mktemp("review") / "data")
    out = data.parent / "audit"
    audit.run(audit.AuditOptions(data=data, out=out, model=SHIPPED))
    return data, out, flips


@contextlib.contextmanager
def _serving(state):
    """The review server over `state` on a free 127.0.0.1 port, in a thread; stopped on exit."""
    from imgclf.audit import _review

    sock = _review.bind(0)
    server = _review.server(state, TOKEN)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/{TOKEN}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def served(audited):
    from imgclf.audit import _review

    data, out, _ = audited
    (out / auditdir.DECISIONS).unlink(missing_ok=True)
    state = _review.ReviewState.load(out, data)
    with _serving(state) as url:
        yield url, state


def _decisions(out: Path) -> pd.DataFrame:
    return auditdir.read_findings(out / auditdir.DECISIONS)


@pytest.mark.browser
def test_keyboard_review_writes_decisions_that_train_reads(audited, served, tmp_path: Path) -> None:
    from conftest import tiny_config
    from playwright.sync_api import sync_playwright
    from test_report import CHROMIUM, CHROMIUM_ARGS

    from imgclf.stages import train

    data, out, flips = audited
    url, state = served
    issues = state.findings[state.findings["kind"] == "label_issue"]
    assert len(issues) >= 4 and list(issues.index[:4]) == [0, 1, 2, 3]  # label issues come first
    f0, f1 = state.findings.loc[0], state.findings.loc[1]
    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("pageerror", lambda err: problems.append(str(err)))
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("request", lambda r: None if r.url.startswith((url, "data:"))
                    else problems.append("network: " + r.url))
            page.goto(url + "/", wait_until="networkidle")
            page.wait_for_selector("#f0.current")
            # Every image of the first page decoded (the finding's and its examples).
            assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
            assert page.locator("#f0 .examples img").count() > 0
            page.keyboard.press("d")  # finding 0: drop
            page.wait_for_selector("#f1.current")
            page.keyboard.press("r")  # finding 1: relabel to its suggested class
            page.wait_for_selector("#f2.current")
            page.keyboard.press("x")  # select findings 2 and 3, keep both at once ...
            page.keyboard.press("j")
            page.keyboard.press("x")
            assert page.locator(".card.selected").count() == 2
            page.keyboard.press("k")
            page.wait_for_selector("#f4.current")
            assert len(_decisions(out)) == 4
            page.keyboard.press("Control+z")  # ... and take the batch back
            page.wait_for_function("document.querySelectorAll('.decision').length === 2")
            page.wait_for_selector("#f2.current")  # the cursor is back on what was undone
            # A leakage finding is shown with its copy in the other split, not with class examples.
            leak = int(state.findings.index[state.findings["kind"] == "leakage"][0])
            caption = page.inner_text(f"#f{leak} .examples figcaption")
            assert "test" in caption and "same picture" in page.inner_text(f"#f{leak} .examples")
            page.screenshot(path=str(tmp_path / "review.png"), full_page=False)
            text = page.inner_text("body")
        finally:
            browser.close()
    assert problems == []
    assert "2 of" in text and "relabel → " + f1["suggested"] in text
    decided = _decisions(out).set_index("row")
    assert sorted(decided.index) == sorted({int(f0["row"]), int(f1["row"])})
    assert decided.at[int(f0["row"]), "action"] == "drop"
    assert decided.at[int(f1["row"]), "action"] == "relabel"
    assert decided.at[int(f1["row"]), "new_label"] == f1["suggested"]
    assert decided.at[int(f1["row"]), "sha256"] == f1["sha256"] and decided["decided_at"].str.len().min() > 0

    # A tiny retrain reads the decisions: the dropped row is gone, the relabelled one has its new label.
    run = tmp_path / "run"
    train.run(train.TrainOptions(tiny_config(f"data.exclude={out / auditdir.DECISIONS}", "trainer.epochs=1"), data,
                                 run))
    split = pd.read_csv(run / "split.csv", keep_default_na=False).set_index("row")
    assert int(f0["row"]) not in split.index
    assert split.at[int(f1["row"]), "label"] == f1["suggested"] != f1["label"]


def test_server_refuses_paths_bad_actions_and_unknown_classes(audited, served) -> None:
    data, out, _ = audited
    url, state = served

    def post(path: str, body: dict) -> tuple[int, dict]:
        req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as err:
            return err.code, json.load(err)

    def status(path: str) -> int:
        try:
            with urllib.request.urlopen(url + path, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as err:
            return err.code

    assert status("/img/0") == 200
    assert status(f"/img/{len(state.findings)}") == 404
    assert status("/img/..%2f..%2fetc%2fpasswd") in (404, 422)  # an id, never a path
    assert status("/img/0/example/99") == 404
    assert post("/api/decide", {"ids": [0], "action": "burn"})[0] == 400
    code, body = post("/api/decide", {"ids": [0], "action": "relabel", "new_label": "Unicorn"})
    assert code == 400 and "Unicorn" in body["detail"]
    assert not (out / auditdir.DECISIONS).exists()  # nothing refused was written
    assert post("/api/decide", {"ids": [0], "action": "keep"})[0] == 200
    assert post("/api/undo", {})[1]["decisions"] == {}
    assert _decisions(out).empty


def test_every_request_needs_the_token(audited, served) -> None:
    """Without the run's token in the URL (or with a wrong one) nothing is served and nothing written."""
    data, out, _ = audited
    url, _ = served
    root = url.rsplit("/", 1)[0]

    def request(path: str, body: dict | None = None) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(root + path, data, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    wrong = "t0ken-Of-This-Test_ruN"  # same length, last character differs
    for prefix in ("", "/" + wrong, "/" + TOKEN[:-1], "/" + TOKEN + "x", "/api", "/img"):
        for path in ("/", "/api/state", "/img/0", "/img/0/example/0"):
            code, body = request(prefix + path)
            assert code == 403 and b"token" in body, (prefix + path, code)
        assert request(prefix + "/api/decide", {"ids": [0], "action": "drop"})[0] == 403
        assert request(prefix + "/api/undo", {})[0] == 403
    assert not (out / auditdir.DECISIONS).exists()
    assert request(f"/{TOKEN}/")[0] == 200 and b"<html" in request(f"/{TOKEN}/")[1].lower()
    assert request(f"/{TOKEN}")[0] == 200  # redirected to /TOKEN/, where the page's relative URLs work
    assert request(f"/{TOKEN}/img/0")[0] == 200


def test_the_cli_serves_behind_a_fresh_token_it_prints(audited) -> None:
    """`imgclf audit --review` in a child process: the URL it prints works, the same port without the
    token is 403, and a second run prints another token."""
    import re
    import subprocess
    import sys

    data, out, _ = audited
    tokens = []
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-m", "imgclf", "audit", "--review", "--data", str(data),
                                 "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()
            found = re.search(r"(http://127\.0\.0\.1:\d+)/([A-Za-z0-9_-]{22,})/ ", line)
            assert found, line
            base, token = found.groups()
            tokens.append(token)
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(f"{base}/{token}/api/state", timeout=5) as r:
                        assert r.status == 200 and "findings" in json.load(r)
                    break
                except urllib.error.URLError:  # not listening yet
                    assert time.monotonic() < deadline and proc.poll() is None
                    time.sleep(0.2)
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"{base}/api/state", timeout=5)
            assert refused.value.code == 403
        finally:
            proc.terminate()
            proc.wait(20)
    assert tokens[0] != tokens[1]


def test_a_relabel_to_an_unknown_class_is_one_line(audited, tmp_path: Path) -> None:
    from imgclf.data import make_split
    from imgclf.manifest import read_manifest

    data, _, _ = audited
    m = read_manifest(data)
    row = m[m["split"] == "train"].iloc[0]
    bad = tmp_path / "decisions.csv"
    auditdir.write_decisions(pd.DataFrame([{"row": row["row"], "sha256": row["sha256"], "action": "relabel",
                                            "new_label": "Unicorn", "decided_at": "2026-01-01"}]), tmp_path)
    with pytest.raises(DataError, match=rf"decisions.csv: row {row['row']}: relabel to 'Unicorn'.*not a class"):
        make_split(data, 0.15, 0, bad)


def test_review_cli_mistakes_are_one_line(audited, tmp_path: Path, capsys) -> None:
    from test_audit import _one_line_error

    data, out, _ = audited
    err = _one_line_error(capsys, ["audit", "--review", "--data", str(data), "--out", str(tmp_path / "none")])
    assert "no audit.csv to review" in err
    err = _one_line_error(capsys, ["audit", "--review", "--apply", "--data", str(data), "--out", str(out)])
    assert "--review serves an existing audit" in err
    err = _one_line_error(capsys, ["audit", "--review", "--port", "70000", "--data", str(data), "--out", str(out)])
    assert "--port 70000" in err


@pytest.mark.browser
def test_hostile_labels_stay_text(audited, tmp_path: Path) -> None:
    """Labels and details come from scraped data: the page shows them as text, runs none of them."""
    from playwright.sync_api import sync_playwright
    from test_report import CHROMIUM, CHROMIUM_ARGS

    from imgclf.audit import _review

    data, out, _ = audited
    state = _review.ReviewState.load(out, data)
    hostile = '<img src=x onerror="alert(1)"><script>alert(2)</script>'
    state.findings.loc[0, ["label", "detail"]] = [hostile, hostile]
    state.classes = [*state.classes, hostile]
    problems: list[str] = []
    with _serving(state) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("dialog", lambda d: (problems.append("dialog: " + d.message), d.dismiss()))
            page.goto(url + "/", wait_until="networkidle")
            page.wait_for_selector("#f0.current")
            assert hostile in page.inner_text("#f0 .given") and hostile in page.inner_text("#f0 .detail")
            assert page.locator("#f0 img[src='x']").count() == 0
            assert page.evaluate("document.querySelectorAll('script').length") == 1  # the page's own
        finally:
            browser.close()
    assert problems == []
