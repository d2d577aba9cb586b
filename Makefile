# Developer shortcuts. The README's test command is `cargo test --workspace`.
.PHONY: check test fmt clippy run up cluster cluster-down cluster-status bench dashboard

check: fmt clippy test

fmt:
	cargo fmt --all -- --check

clippy:
	cargo clippy --workspace --all-targets -- -D warnings

test:
	cargo test --workspace

# One node on the in-process broker (no Redis needed).
run:
	cargo run --release -p gateway

# Redis, three nodes behind nginx, Prometheus and Grafana (needs Docker).
up:
	docker compose up --build

# The same topology without Docker, from Debian packages (redis-server, nginx,
# prometheus), on the same host ports; Grafana is left out (not packaged).
cluster:
	deploy/local-cluster.sh up

cluster-down:
	deploy/local-cluster.sh down

cluster-status:
	deploy/local-cluster.sh status

# The benchmark scenarios behind loadtest/RESULTS.md.
bench:
	loadtest/bench.sh

# Every Grafana dashboard query against real Prometheus and two real nodes.
dashboard:
	python3 deploy/check_dashboard.py
