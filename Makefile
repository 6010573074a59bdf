# kakuremichi — the two commands a newcomer needs are `make demo` (run) and `make test` (test).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help deps venv binaries lint typecheck test test-unit test-integration test-e2e crds \
	cluster-up cluster-down demo demo-down demo-add-host bench bench-control clean

help:
	@echo "make demo        (root) install what is needed; a local cluster, the operator, a gateway and"
	@echo "                 an agent in network namespaces serving a demo tunnel; prints a curl line"
	@echo "make demo-add-host NAME=laptop  another host joins the running demo by the one-liner"
	@echo "                 kakuremichi agent-command prints (installing from control alone)"
	@echo "make demo-down   remove everything make demo started (processes, namespaces, cluster, .demo/)"
	@echo "make test        install what is needed, then lint, type-check and run every test tier"
	@echo "make test-unit   the fast tier: no root, no network namespaces"
	@echo "make test-integration  real API server, Pebble, WireGuard, network namespaces (root)"
	@echo "make test-e2e    gateway, agent, origin and client in namespaces, driven through the API server"
	@echo "make bench       the data plane against routed WireGuard and nginx (bench/RESULTS.md), the"
	@echo "                 HTTPS front end against its last revision (bench/RESULTS-front-end.md),"
	@echo "                 then the control plane (bench-control)"
	@echo "make bench-control  250 Agents / 5,000 Tunnels on a local API server, config fan-out to"
	@echo "                 every connected edge; bench/RESULTS-control-plane.md (no root needed)"
	@echo "make kind-up     (Docker) a kind cluster with the image, the chart and the quick start; make kind-down"
	@echo "make gateway-conformance  (Docker) the Gateway API conformance suite on that kind cluster"
	@echo "make cluster-up  a local API server for kubectl (hack/cluster.sh); make cluster-down"
	@echo "make crds        regenerate crds/ from the models"
	@echo "make lint        ruff check + format check + the import contracts (lint-imports);"
	@echo "                 make typecheck: mypy --strict"

# System packages the tests use; installed only when missing.
deps:
	@hack/install-deps.sh

# kube-apiserver, etcd, kube-controller-manager, kubectl, helm, Pebble, wireguard-go: built from
# the Go module proxy into ~/.cache/kakuremichi (reused when present).
binaries:
	@hack/build-binaries.sh >/dev/null

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

typecheck: $(STAMP)
	$(BIN)/mypy

crds: $(STAMP)
	$(BIN)/kakuremichi crds --output-dir crds && cp crds/*.yaml charts/kakuremichi/crds/

test-unit: $(STAMP)
	$(BIN)/pytest tests/unit

test-integration: deps binaries $(STAMP)
	$(BIN)/pytest tests/integration

test-e2e: deps binaries $(STAMP)
	$(BIN)/pytest tests/e2e

test: deps binaries $(STAMP) lint typecheck
	$(BIN)/kakuremichi crds --check crds
	$(BIN)/pytest tests/unit tests/integration tests/e2e  # fastest tier first

# Benchmarks (not part of the test suite): root; installs nginx and wrk; writes bench/RESULTS.md
# (data plane) and bench/RESULTS-control-plane.md (control plane).
bench: deps binaries $(STAMP)
	@hack/install-deps.sh bench
	$(BIN)/python bench/dataplane.py
	$(BIN)/python bench/front_end_ab.py
	$(BIN)/python bench/request_path_ab.py
	$(BIN)/python bench/grpc_calls.py
	$(BIN)/python bench/control_plane.py
	$(BIN)/python bench/route_decision.py

# The control plane alone: local API servers and the operator, no root, no network namespaces.
bench-control: binaries $(STAMP)
	$(BIN)/python bench/control_plane.py
	$(BIN)/python bench/route_decision.py

cluster-up: binaries
	@hack/cluster.sh up >/dev/null
	@hack/cluster.sh env

cluster-down:
	@hack/cluster.sh down

# The README's "run" command: hack/demo.py starts everything (as root), waits for the first HTTPS
# answer through the gateway and prints the curl command that gets it. Idempotent: it starts over.
demo: deps binaries $(STAMP)
	@$(BIN)/python hack/demo.py up

demo-down: $(STAMP)
	@$(BIN)/python hack/demo.py down

# Another machine joins the running demo by the one-liner `kakuremichi agent-command` prints:
# make demo-add-host NAME=laptop (a network namespace of its own; see hack/demo.py add-host).
demo-add-host: $(STAMP)
	@$(BIN)/python hack/demo.py add-host $(NAME)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# kakuremichi on a local kind cluster, for a machine with Docker, kind, helm and kubectl:
# builds the edge image, installs the chart and applies examples/quickstart/ (hack/kind-up.sh).
.PHONY: kind-up kind-down gateway-conformance
gateway-conformance:
	@hack/gateway-conformance.sh
kind-up:
	@hack/kind-up.sh

kind-down:
	@hack/kind-down.sh
