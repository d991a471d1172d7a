"""Child of tests/test_ray_nodes.py: two Ray nodes in one process tree, the second one's raylet
SIGKILLed while `download --engine ray --address` runs across both.

    python tests/ray_nodes_child.py WORK ROWS    # writes WORK/result.json

Run as a child process because Ray reads its settings (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER, the
token, health checks) once per process. `ray.cluster_utils.Cluster` starts the nodes itself (not
`ray start`, which refuses a second node while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), so both nodes
keep every listener on 127.0.0.1. Each node has 1 CPU and each worker reserves 1 (`--processes 1`):
one worker per node, and the lost one cannot be placed again on the surviving node.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pandas as pd  # noqa: E402
from fault_server import FaultServer  # noqa: E402
from PIL import Image  # noqa: E402

from imgclf import _reaper  # noqa: E402
from imgclf._ray import import_ray  # noqa: E402
from imgclf.stages import download  # noqa: E402

ray = import_ray()
from ray import ray_constants  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), (i % 256, (i // 256) * 40, 200)).save(buf, "PNG")
    return buf.getvalue()


def _committed(state: Path) -> list[str]:
    try:
        from imgclf.download._state import committed_urls

        db = sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=5)
        return sorted(committed_urls(db))  # folded or still in a part
    except sqlite3.Error:
        return []


def ours() -> list[int]:
    """Live pids carrying this run's marker in their environment (every Ray process it started)."""
    mark = f"IMGCLF_RAY_NODES_MARK={os.environ['IMGCLF_RAY_NODES_MARK']}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            alive = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
            if alive and mark in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.append(int(pid))
        except OSError:
            continue
    return found


def listening(pids: list[int]) -> list[str]:
    """The addresses (hex, as /proc/net/tcp* writes them) of the TCP listeners of `pids`."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.append(fields[1].split(":")[0])
    return found


def become_subreaper() -> None:
    """Orphans below this process (Ray's agents, once their raylet is gone) become its children,
    not init's: after the run, whatever is still below it was left behind. Ray's agents write their
    new names over their environment, so the marker alone would miss them."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def left_below(deadline_s: float) -> list[str]:
    """Live processes still below this one after `deadline_s` (zombies are reaped on the way)."""
    deadline = time.monotonic() + deadline_s
    while True:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        alive = [p for p in _reaper.descendants(os.getpid())
                 if Path(f"/proc/{p}/stat").exists() and _state(p) not in "ZX"]
        if not alive or time.monotonic() > deadline:
            return [f"{p} {Path(f'/proc/{p}/comm').read_text().strip()}" for p in alive
                    if Path(f"/proc/{p}/comm").exists()]
        time.sleep(0.2)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


def main(work: Path, rows: int) -> None:
    become_subreaper()
    result: dict = {}
    (work / "ray").mkdir()  # Ray's temporary directory: $TMPDIR/ray, TMPDIR=WORK set by the test
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, include_dashboard=False))
    node2 = cluster.add_node(num_cpus=1, resources={"node2": 1})
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        result["nodes"] = len([n for n in ray.nodes() if n["Alive"]])
        loopback = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}
        # 127.0.0.1, ::1, ::ffff:127.0.0.1
        listeners = listening(ours())
        result["listeners"] = len(listeners)
        result["below_during_run"] = len(_reaper.descendants(os.getpid()))  # what left_below watches
        result["listeners_not_loopback"] = [a for a in listeners if a not in loopback]
        with FaultServer(latency=0.1) as srv:
            urls = [srv.add(f"{i}.png", _png(i), "image/png") for i in range(rows)]
            pd.DataFrame({"url": urls, "label": [f"c{i % 2}" for i in range(rows)]}).to_csv(
                work / "urls.csv", index=False)
            state = work / "data" / download.STATE_NAME
            outcome: dict = {}

            def run() -> None:
                try:
                    res = download.run(download.DownloadOptions(
                        sources=[work / "urls.csv"], out=work / "data",
                        timeout=3.0, read_timeout=2.0, connect_timeout=1.0, retries=1, backoff=0.05,
                        show_progress=False, print_summary=False, engine="ray", address=cluster.address,
                        ray_workers=2, processes=1, shard_size=50))
                    outcome["counts"] = res.counts
                except BaseException as err:  # noqa: BLE001 - reported to the test
                    outcome["error"] = repr(err)

            thread = threading.Thread(target=run, daemon=True)
            started = time.monotonic()
            thread.start()
            while thread.is_alive() and len(_committed(state)) < rows // 4:
                time.sleep(0.1)
            before = _committed(state)
            # The node is lost: its raylet and every process it started (the worker actor, its
            # decoders), SIGKILLed at once, as a machine that dies takes them all.
            raylet = node2.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process
            lost = [raylet.pid, *_reaper.descendants(raylet.pid)]
            for pid in lost:
                os.kill(pid, signal.SIGKILL)
            result["killed_processes"] = len(lost)
            result["committed_at_kill"] = len(before)
            thread.join(timeout=float(os.environ.get("CHILD_WAIT_S", "60")))
            result["finished"] = not thread.is_alive()
            result["seconds"] = round(time.monotonic() - started, 1)
            result.update(outcome)
            counts = dict(srv.counts)
            paths = [u.split("127.0.0.1", 1)[1].split("/", 1)[1] for u in before]
            result["committed_fetched_again"] = sum(counts.get("/" + p, 0) != 1 for p in paths)
            result["fetches_beyond_one"] = sum(c - 1 for c in counts.values() if c > 1)
            result["never_fetched"] = sum(counts.get(f"/file/{i}.png", 0) == 0 for i in range(rows))
            if (work / "data" / "manifest.parquet").exists():
                manifest = pd.read_parquet(work / "data" / "manifest.parquet")
                result["manifest_rows"] = len(manifest)
                result["statuses"] = manifest["status"].value_counts().to_dict()
    finally:
        ray.shutdown()
        cluster.shutdown()
        result["left_behind"] = left_below(15)
        for entry in result["left_behind"]:  # ours (below us): never leave them running
            with contextlib.suppress(OSError):
                os.kill(int(entry.split()[0]), signal.SIGKILL)
        (work / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
