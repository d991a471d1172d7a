"""Two Ray nodes on one machine (issue 25, item 3): `download --engine ray --address` across a
head and a second node with their own resources; the second node lost mid-run (its raylet and
every process it started, SIGKILL). Its shards must be redone by the surviving worker, no row
lost, no row committed before the loss fetched again, the run must end (it used to wait for ever
for a worker Ray could not place again), every listener on loopback, no Ray process left.

The cluster runs in a child (`ray_nodes_child.py`): Ray reads its settings once per process.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from imgclf._ray import import_ray
from imgclf.errors import ConfigError

try:
    import_ray()
except ConfigError:
    pytest.skip("the ray extra is not installed (pip install 'imgclf[ray]')", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).parent))
from ray_nodes_child import ours  # noqa: E402

ROWS = 800  # shards of 50: the lost worker holds 3 open shards (150 rows) when it dies


@pytest.mark.slow
def test_a_lost_node_s_shards_are_redone_by_the_surviving_worker() -> None:
    work = Path(tempfile.mkdtemp(prefix="rn-"))  # short: Ray's unix socket paths must stay < 108 bytes
    try:
        _run_and_check(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_and_check(work: Path) -> None:
    mark = secrets.token_hex(8)
    env = {**os.environ, "TMPDIR": str(work), "IMGCLF_RAY_NODES_MARK": mark,
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")]),
           # Loopback only, token authentication with a random token, as imgclf._ray does.
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_worker_niceness": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           # A lost node is declared dead after 4 missed health checks of 0.5 s (Ray's default: 5 of 3 s).
           "RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "4"}
    try:
        child = subprocess.run([sys.executable, str(Path(__file__).parent / "ray_nodes_child.py"), str(work),
                                str(ROWS)], env=env, capture_output=True, text=True, timeout=150)
    finally:
        os.environ["IMGCLF_RAY_NODES_MARK"] = mark  # what `ours` looks for
        try:
            deadline = time.monotonic() + 15
            while ours() and time.monotonic() < deadline:
                time.sleep(0.2)
            left = ours()
        finally:
            del os.environ["IMGCLF_RAY_NODES_MARK"]
    assert (work / "result.json").exists(), child.stderr[-3000:]
    result = json.loads((work / "result.json").read_text())
    assert result["nodes"] == 2
    assert result["listeners_not_loopback"] == []
    assert result["killed_processes"] >= 2  # the raylet and at least the worker actor
    assert result["finished"], f"the download did not end after the node was lost: {result}"
    assert result.get("counts") == {"ok": ROWS}, result
    assert result["statuses"] == {"ok": ROWS} and result["manifest_rows"] == ROWS
    assert result["never_fetched"] == 0
    assert result["committed_fetched_again"] == 0
    assert 0 < result["fetches_beyond_one"] <= 150, result  # the lost shards' in-flight rows only
    assert "Ray worker 1 lost" in child.stderr or "Ray worker 0 lost" in child.stderr
    assert result["below_during_run"] >= 4  # GCS, two raylets, their agents: the check below sees them
    assert result["left_behind"] == [], "Ray processes outlived the cluster's shutdown by 15 s"
    assert not left, f"Ray processes left behind: {left}"
