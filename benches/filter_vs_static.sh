#!/usr/bin/env bash
# Throughput and p99 of Envoy + libsandbox_gateway.so against a plain static-route Envoy, in one
# run, interleaved (S M S M ...) so machine drift hits both alike. Envoy is pinned to CPU 0 with one
# worker; wrk and the upstream share CPU 1. Usage: benches/filter_vs_static.sh [rounds] [seconds]
# Needs: make envoy and a release build (`make bench-wrk` does both); installs wrk if missing.
set -euo pipefail
shopt -s inherit_errexit  # a failed request inside $(measure ...) must stop the script
cd "$(dirname "$0")/.."
for bin in target/release/sandbox-echo-server target/release/libsandbox_gateway.so; do
  [ -e "$bin" ] || { echo "$bin missing: run 'make build' first" >&2; exit 1; }
done
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
ROUNDS=${1:-3}; SECS=${2:-10}; CONNS=${CONNS:-32}
ENVOY=$(ls .venv/lib/python3*/site-packages/envoy/_bin/envoy | head -1)
UP_PORT=18181; S_PORT=18280; S_ADMIN=18281; M_PORT=18290; M_ADMIN=18291
work=$(mktemp -d); pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

taskset -c 1 target/release/sandbox-echo-server --name bench --listen 127.0.0.1:$UP_PORT > "$work/up.log" 2>&1 & pids+=($!)
echo "{\"sandboxes\": [{\"id\": \"bench\", \"ip\": \"127.0.0.1\", \"port\": $UP_PORT}]}" > "$work/routes.json"
render() { # template out KEY=VALUE...
  python3 - "$@" <<'PY'
import json, sys
t = open(sys.argv[1]).read()
for kv in sys.argv[3:]:
    k, v = kv.split("=", 1)
    t = t.replace("@" + k + "@", v)
open(sys.argv[2], "w").write(t)
PY
}
cfg=$(python3 -c 'import json,sys; print(json.dumps(json.dumps({"route_source": {"type": "file", "path": sys.argv[1]}})))' "$work/routes.json")
render envoy/static.yaml.tmpl "$work/static.yaml" ADMIN_PORT=$S_ADMIN LISTEN_PORT=$S_PORT UPSTREAM_HOST=127.0.0.1 UPSTREAM_PORT=$UP_PORT
render envoy/gateway.yaml.tmpl "$work/module.yaml" ADMIN_PORT=$M_ADMIN LISTEN_PORT=$M_PORT "FILTER_CONFIG=$cfg"
taskset -c 0 "$ENVOY" -c "$work/static.yaml" --concurrency 1 --disable-hot-restart -l error > "$work/s.log" 2>&1 & pids+=($!); S_PID=$!
ENVOY_DYNAMIC_MODULES_SEARCH_PATH=target/release SANDBOX_GATEWAY_LOG=warn \
  taskset -c 0 "$ENVOY" -c "$work/module.yaml" --concurrency 1 --disable-hot-restart -l error > "$work/m.log" 2>&1 & pids+=($!); M_PID=$!
for port in $S_PORT $M_PORT; do
  for _ in $(seq 100); do curl -sf -o /dev/null -H 'x-sandbox-id: bench' "http://127.0.0.1:$port/bench" && break; sleep 0.1; done
  curl -sf -o /dev/null -H 'x-sandbox-id: bench' "http://127.0.0.1:$port/bench" || { echo "port $port not serving"; cat "$work"/*.log; exit 1; }
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
run() { # name port pid -> "rps p99_ms cpu_us_per_req"
  local t0; t0=$(cpu_ticks "$3")
  taskset -c 1 wrk -t1 -c"$CONNS" -d"${SECS}s" --latency -H 'x-sandbox-id: bench' "http://127.0.0.1:$2/bench" > "$work/wrk.out"
  grep -q "Non-2xx" "$work/wrk.out" && { echo "non-2xx responses for $1"; cat "$work/wrk.out"; exit 1; }
  local t1; t1=$(cpu_ticks "$3")
  python3 - "$work/wrk.out" "$((t1 - t0))" "$(getconf CLK_TCK)" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
total = int(re.search(r"(\d+) requests in", t).group(1))
v, unit = re.search(r"99%\s+([\d.]+)(us|ms|s)", t).groups()
cpu_us = int(sys.argv[2]) / int(sys.argv[3]) * 1e6 / total
print(rps, float(v) * {"us": 1e-3, "ms": 1, "s": 1e3}[unit], cpu_us)
PY
}
# Warm both up once (connection pools, page cache), then measure.
SECS=2 run static $S_PORT $S_PID >/dev/null; SECS=2 run module $M_PORT $M_PID >/dev/null
printf "%-6s %-8s %12s %10s %14s\n" round variant "req/s" "p99 ms" "Envoy CPU us/req"
for r in $(seq "$ROUNDS"); do
  for v in static module; do
    port=$S_PORT; pid=$S_PID; [ $v = module ] && { port=$M_PORT; pid=$M_PID; }
    read -r rps p99 cpu < <(run $v $port $pid)
    printf "%-6s %-8s %12.0f %10.3f %14.2f\n" "$r" "$v" "$rps" "$p99" "$cpu"
    echo "$v $rps $p99 $cpu" >> "$work/results"
  done
done
python3 - "$work/results" <<'PY'
import sys, statistics as st
rows = [l.split() for l in open(sys.argv[1])]
m = {v: [[float(r[i]) for r in rows if r[0] == v] for i in (1, 2, 3)] for v in ("static", "module")}
s_rps, m_rps = st.median(m["static"][0]), st.median(m["module"][0])
s_p99, m_p99 = st.median(m["static"][1]), st.median(m["module"][1])
print(f"median static: {s_rps:.0f} req/s, p99 {s_p99:.3f} ms")
print(f"median module: {m_rps:.0f} req/s, p99 {m_p99:.3f} ms")
s_cpu, m_cpu = st.median(m["static"][2]), st.median(m["module"][2])
print(f"median Envoy CPU per request: static {s_cpu:.2f} us, module {m_cpu:.2f} us")
print(f"module/static: throughput {m_rps/s_rps:.3f}x, p99 {m_p99/s_p99:.3f}x, CPU/request {m_cpu/s_cpu:.3f}x")
PY
