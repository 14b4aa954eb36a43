#!/usr/bin/env bash
# Deterministic cost of the module: Envoy's executed instructions per request (valgrind callgrind),
# static route vs module, for the same N GETs (keep-alive; CONN=new: a new connection each). Unlike wall-clock load tests this does
# not move with machine noise, so it shows where the module's cost is and whether a change helps.
# Usage: benches/instructions_per_request.sh [requests]   (`make bench-callgrind`; installs valgrind if missing)
# MODULE_DIR=dir measures the libsandbox_gateway.so in dir (default target/release).
set -euo pipefail
shopt -s inherit_errexit  # a failed request inside $(measure ...) must stop the script
cd "$(dirname "$0")/.."
for bin in target/release/sandbox-echo-server target/release/libsandbox_gateway.so; do
  [ -e "$bin" ] || { echo "$bin missing: run 'make build' first" >&2; exit 1; }
done
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind; }
N=${1:-2000}
ENVOY=$(ls .venv/lib/python3*/site-packages/envoy/_bin/envoy | head -1)
UP_PORT=18381
work=$(mktemp -d); pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
target/release/sandbox-echo-server --name bench --listen 127.0.0.1:$UP_PORT > "$work/up.log" 2>&1 & pids+=($!)
echo "{\"sandboxes\": [{\"id\": \"bench\", \"ip\": \"127.0.0.1\", \"port\": $UP_PORT}]}" > "$work/routes.json"
cfg=$(python3 -c 'import json,sys; print(json.dumps(json.dumps({"route_source": {"type": "file", "path": sys.argv[1]}})))' "$work/routes.json")
render() { python3 - "$@" <<'PY'
import sys
t = open(sys.argv[1]).read()
for kv in sys.argv[3:]:
    k, v = kv.split("=", 1); t = t.replace("@" + k + "@", v)
open(sys.argv[2], "w").write(t)
PY
}
render envoy/static.yaml.tmpl "$work/static.yaml" ADMIN_PORT=18391 LISTEN_PORT=18390 UPSTREAM_HOST=127.0.0.1 UPSTREAM_PORT=$UP_PORT
render envoy/gateway.yaml.tmpl "$work/module.yaml" ADMIN_PORT=18393 LISTEN_PORT=18392 "FILTER_CONFIG=$cfg"

requests() { # port count: GETs in a row, on one connection or (CONN=new) one connection each
  python3 - "$1" "$2" "${CONN:-keepalive}" <<'PY'
import http.client, sys
port, n, fresh = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "new"
c = None
for _ in range(n):
    if c is None or fresh:
        if c: c.close()
        c = http.client.HTTPConnection("127.0.0.1", port)
    c.request("GET", "/bench", headers={"x-sandbox-id": "bench"}); r = c.getresponse(); r.read()
    assert r.status == 200, r.status
PY
}

measure() { # variant yaml port
  local out="$work/cg.$1"
  ENVOY_DYNAMIC_MODULES_SEARCH_PATH="${MODULE_DIR:-target/release}" SANDBOX_GATEWAY_LOG=warn \
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out.%p" \
    "$ENVOY" -c "$2" --concurrency 1 --disable-hot-restart -l error > "$work/$1.log" 2>&1 &
  local pid=$!
  for _ in $(seq 600); do curl -sf -o /dev/null -H 'x-sandbox-id: bench' "http://127.0.0.1:$3/bench" && break; sleep 0.2; done
  requests "$3" 200   # warm-up, not counted
  callgrind_control -i on "$pid" > /dev/null
  requests "$3" "$N"
  callgrind_control -i off "$pid" > /dev/null
  callgrind_control -d "$pid" > /dev/null
  sleep 1
  local ir; ir=$(cat "$out".* | awk '/^summary:|^totals:/ {s += $2} END {print s}')
  [ -n "${KEEP_CALLGRIND:-}" ] && cp "$out".* "$KEEP_CALLGRIND/" || true
  kill "$pid"; wait "$pid" 2>/dev/null || true
  # The numbered file is the dump taken above (the unnumbered one is written at exit, empty).
  [ "$1" = module ] && callgrind_annotate --inclusive=yes "$out".*.1 2>/dev/null \
    | grep -E "^ *[0-9,]+ .*(envoy_dynamic_module_on_|sandbox_gateway::|routing::|moka::)" | head -15 > "$work/module_top.txt" || true
  echo "$ir"
}
s=$(measure static "$work/static.yaml" 18390)
m=$(measure module "$work/module.yaml" 18392)
python3 - "$s" "$m" "$N" "${CONN:-keepalive}" <<'PY'
import sys
s, m, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
print(f"{n} GETs, connections: {sys.argv[4]}")
print(f"static: {s/n:,.0f} instructions/request")
print(f"module: {m/n:,.0f} instructions/request ({(m-s)/n:+,.0f}, {m/s:.3f}x)")
PY
echo "module hooks and functions, inclusive instructions over all $N requests (callgrind_annotate):"
cat "$work/module_top.txt"
