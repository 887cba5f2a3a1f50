#!/usr/bin/env bash
# Start a server with the given flags, run the load generator against it, stop the server.
#
#   tools/load_sweep.sh OUT_DIR "SERVER FLAGS" "LOADGEN FLAGS"
#   tools/load_sweep.sh artifacts/fcfs "--model random:qwen2.5-0.5b --max-running 256" "--rates 2,6,16"
#
# The server's log goes to OUT_DIR/server.log, the load generator's JSON (and PNG, where
# matplotlib is installed) to OUT_DIR, and the server's /stats, once a second while the load runs
# (step budget, running cap and controller state included), to OUT_DIR/stats.jsonl.
# (tools/stats_timeline.py prints it as a table over time.)
# PYTHON (default python3) and PORT (default 8123) may be set. SERVER_CPUS and LOADGEN_CPUS (taskset
# CPU lists, e.g. 2 and 4-5) pin the two processes apart. On the lent H100 hosts pinning did not
# narrow the spread between servers: each vCPU's own speed swings ~1.8x in spells of seconds
# (tools/host_probe.py; docs/BENCHMARKS.md, eleventh session), so compare many alternated servers.
set -euo pipefail
out=$1
server_flags=$2
load_flags=$3
py=${PYTHON:-python3}
port=${PORT:-8123}
pin() {  # a bad CPU list fails here, at once, not as a server that never comes up
  if [ -n "$1" ]; then taskset -c "$1" true || { echo "load_sweep.sh: bad CPU list '$1'" >&2; exit 2; }; echo "taskset -c $1"; fi
}
server_pin=$(pin "${SERVER_CPUS:-}")
loadgen_pin=$(pin "${LOADGEN_CPUS:-}")
mkdir -p "$out"
# shellcheck disable=SC2086
$server_pin $py -m streamer serve --port "$port" $server_flags >"$out/server.log" 2>&1 &
pid=$!
trap 'kill -INT $pid 2>/dev/null || true; wait $pid 2>/dev/null || true' EXIT
$py - "$port" <<'PY'
import sys, time, urllib.request
for _ in range(1200):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/healthz", timeout=1)
        sys.exit(0)
    except Exception:
        time.sleep(0.5)
sys.exit("server did not become ready in 10 minutes")
PY
$py - "$port" "$out/stats.jsonl" <<'PY' &
import sys, time, urllib.request
with open(sys.argv[2], "a") as f:
    while True:
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/stats", timeout=2).read()
        except Exception:
            break
        f.write(body.decode().replace("\n", " ") + "\n")
        f.flush()
        time.sleep(1)
PY
stats_pid=$!
trap 'kill $stats_pid 2>/dev/null || true; kill -INT $pid 2>/dev/null || true; wait $pid 2>/dev/null || true' EXIT
# shellcheck disable=SC2086
$loadgen_pin $py tools/loadgen.py --url "http://127.0.0.1:$port" --out "$out" $load_flags
