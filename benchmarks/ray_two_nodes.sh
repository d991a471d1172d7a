#!/usr/bin/env bash
# Multi-node Ray shown on one machine (issue 25, item 3): a head and a second raylet with their
# own resources, `imgclf download --engine ray --address` across both, the second node's raylet
# SIGKILLed mid-run. Checks: every row ends ok (no row lost), and no URL committed before the kill
# is fetched again (the server counts fetches per URL). Stops every Ray process it started (found
# by a marker in their environment, never by name: other Ray clusters on the machine are left alone).
#
#     PY=.venv/bin/python benchmarks/ray_two_nodes.sh [ROWS]        # default 3000 rows, 50 ms latency
#
# Ray listens on every interface of a node whose address is not 127.0.0.1, and refuses a second node
# unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1, which makes it rewrite a join address of 127.0.0.1 to the
# machine's own IP. So: the whole run in a network namespace of its own with only a loopback interface
# (`unshare -n`, root; checked below), the head on 127.0.0.2, the second node on 127.0.0.3 (Ray treats
# only 127.0.0.1/localhost/::1 as "localhost"), token authentication with a random token (RAY_AUTH_MODE=token).
#
# The node is lost as a machine is: its raylet and every process the raylet started (the worker
# actor, its decoders) SIGKILLed at once. Output recorded in docs/scale.md ("Two Ray nodes on one
# machine"); the same procedure runs in the test suite as tests/test_ray_nodes.py (no root needed there).
set -euo pipefail
# Re-run inside a new network namespace with only loopback (Linux; root; `unshare -rn` otherwise).
if [ -z "${IMGCLF_IN_NETNS:-}" ]; then
  exec unshare -n env IMGCLF_IN_NETNS=1 bash -c 'ip link set lo up && exec bash "$0" "$@"' "$0" "$@"
fi
PY=${PY:-.venv/bin/python}
RAY="$(dirname "$PY")/ray"
ROWS=${1:-3000}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
# Before anything imports ray: token auth with a random token kept
# in the environment only (as imgclf._ray does for a private cluster); workers at our priority.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 RAY_worker_niceness=0
RAY_AUTH_TOKEN="$("$PY" -c 'import secrets; print(secrets.token_hex(32))')"
export RAY_AUTH_TOKEN RAY_AUTH_MODE=token
WORK="$(mktemp -d /tmp/r2n-XXXXXX)"   # short: Ray's unix socket paths must stay < 108 bytes
export IMGCLF_TWO_NODES_MARK="$WORK"  # inherited by every process started below

ours() {  # pids in our network namespace, or whose environment carries our marker; not this shell's
  # (the namespace catches Ray's agents too: they write their new names over their environment)
  "$PY" - "$WORK" "$$" <<'EOF'
import os, sys
mark, skip = f"IMGCLF_TWO_NODES_MARK={sys.argv[1]}".encode(), {os.getpid(), os.getppid(), int(sys.argv[2])}
netns = os.readlink("/proc/self/ns/net")
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            zombie = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
            here = os.readlink(f"/proc/{pid}/ns/net") == netns
            if (here or mark in f.read().split(b"\0")) and int(pid) not in skip and not zombie:
                print(pid)
    except OSError:
        pass
EOF
}
cleanup() {
  for pid in $(ours); do kill -9 "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true  # reap our own children (the server)
  sleep 1
  mapfile -t left < <(ours)  # not `ours | wc -l`: wc itself carries the marker
  echo "cleanup: Ray and server processes left: ${#left[@]} ${left[*]}"
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 143' INT TERM  # a timeout or Ctrl-C still runs cleanup

# A server on 127.0.0.1 counting fetches per URL (GET /counts answers them as JSON).
"$PY" - "$WORK" <<'EOF' &
import asyncio, collections, io, json, sys, zlib
from aiohttp import web
from PIL import Image
work = sys.argv[1]
counts = collections.Counter()
async def image(request):
    name = request.match_info["name"]
    counts[name] += 1
    await asyncio.sleep(0.05)
    seed = zlib.crc32(name.encode())
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (seed & 255, seed >> 8 & 255, seed >> 16 & 255)).save(buf, "PNG")
    return web.Response(body=buf.getvalue(), content_type="image/png")
async def dump(request):
    return web.json_response(counts)
async def main():
    app = web.Application()
    app.router.add_get("/counts", dump)
    app.router.add_get("/img/{name}", image)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    open(f"{work}/port", "w").write(str(site._server.sockets[0].getsockname()[1]))
    await asyncio.Event().wait()
asyncio.run(main())
EOF
for _ in $(seq 100); do [ -s "$WORK/port" ] && break; sleep 0.1; done
SRV="http://127.0.0.1:$(cat "$WORK/port")"
"$PY" -c "
import sys; n = int(sys.argv[1])
print('url,label'); [print(f'$SRV/img/{i}.png,c{i % 2}') for i in range(n)]" "$ROWS" > "$WORK/urls.csv"

GCS_PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.2", 0)); print(s.getsockname()[1])')
ADDR="127.0.0.2:$GCS_PORT"
echo "== head node ($ADDR, 2 CPUs) and a second node (2 CPUs, resource node2)"
"$RAY" start --head --node-ip-address 127.0.0.2 --port "$GCS_PORT" --num-cpus 2 --include-dashboard false \
  --temp-dir "$WORK/ray" --disable-usage-stats > "$WORK/head.log" 2>&1 || { cat "$WORK/head.log"; exit 1; }
# Ray refuses to add a node while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (its name notwithstanding, it
# means "single node" on Linux too); for this one command it is 1, with the node's address pinned to
# 127.0.0.1; the listeners are checked below.
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 "$RAY" start --address "$ADDR" --node-ip-address 127.0.0.3 --num-cpus 2 --resources '{"node2": 2}' \
  --disable-usage-stats > "$WORK/node2.log" 2>&1 || { cat "$WORK/node2.log"; exit 1; }
RAYLETS=$(for pid in $(ours); do if grep -qa "raylet/raylet" "/proc/$pid/cmdline" 2>/dev/null; then echo "$pid"; fi; done)
NODE2=$(for pid in $RAYLETS; do if tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q "node2"; then echo "$pid"; fi; done)
echo "raylets: $(echo $RAYLETS); the second node's raylet: $NODE2"
LISTEN=$(ss -Hltnp 2>/dev/null | grep -E "pid=($(ours | paste -sd'|'))," | awk '{print $4}' | sort -u)
echo "listening sockets of our processes: $(echo $LISTEN)"
if ip -brief link | grep -vq '^lo '; then echo "FAIL: an interface besides loopback"; exit 1; fi
echo "interfaces in this network namespace: $(ip -brief link | awk '{print $1}' | paste -sd' ')"
[ -n "$NODE2" ] || { echo "FAIL: the second raylet was not found"; exit 1; }

echo "== download --engine ray --address $ADDR --workers 2 --processes 2 ($ROWS URLs, shards of 200)"
"$PY" -m imgclf download "$WORK/urls.csv" --out "$WORK/data" --engine ray --address "$ADDR" \
  --workers 2 --processes 2 --shard-size 200 --no-progress > "$WORK/dl.log" 2>&1 &
DL=$!
committed() { "$PY" -c "
import sqlite3, sys
from imgclf.download._state import committed_urls
try:
    db = sqlite3.connect(f'file:{sys.argv[1]}?mode=ro', uri=True, timeout=5)
    print(len(committed_urls(db)))
except sqlite3.Error:
    print(0)" "$WORK/data/.state.sqlite"; }
while kill -0 "$DL" 2>/dev/null && [ "$(committed)" -lt $((ROWS * 3 / 10)) ]; do sleep 0.3; done
"$PY" -c "
import sqlite3, sys
from imgclf.download._state import committed_urls
db = sqlite3.connect(f'file:{sys.argv[1]}?mode=ro', uri=True, timeout=5)
print('\n'.join(u.rsplit('/', 1)[1] for u in sorted(committed_urls(db))))
" "$WORK/data/.state.sqlite" > "$WORK/committed_at_kill"
LOST="$NODE2 $("$PY" -c 'import sys; from imgclf import _reaper; print(*_reaper.descendants(int(sys.argv[1])))' "$NODE2")"
echo "SIGKILL the second node: its raylet (pid $NODE2) and the $(($(echo $LOST | wc -w) - 1)) processes it started," \
  "with $(wc -l < "$WORK/committed_at_kill")/$ROWS rows committed"
KILLED_AT=$(date +%s)
kill -9 $LOST
set +e
wait "$DL"; RC=$?
set -e
grep "Ray worker" "$WORK/dl.log" || echo "(no worker loss logged)"
grep -v "^ *\[" "$WORK/dl.log" | tail -2
echo "download exit code: $RC, $(($(date +%s) - KILLED_AT)) s after the kill"
"$PY" - "$WORK" "$SRV" "$ROWS" "$RC" <<'EOF'
import json, sys, urllib.request
import pandas as pd
work, srv, rows, rc = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
counts = json.load(urllib.request.urlopen(f"{srv}/counts"))
before = open(f"{work}/committed_at_kill").read().split()
manifest = pd.read_parquet(f"{work}/data/manifest.parquet")
statuses = manifest["status"].value_counts().to_dict()
again = [n for n in before if counts.get(n, 0) != 1]
refetched = sum(c - 1 for c in counts.values() if c > 1)
print(f"manifest: {len(manifest)} rows, {statuses}; rows committed before the kill fetched again: {len(again)}; "
      f"fetches beyond one per URL (in-flight rows of the killed node's shards): {refetched}")
ok = rc == 0 and len(manifest) == rows and statuses == {"ok": rows} and not again
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
EOF
