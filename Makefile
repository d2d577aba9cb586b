# Developer shortcuts. The README's test command is `cargo test --workspace`.
.PHONY: check test fmt clippy run up bench dashboard

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

# The benchmark scenarios behind loadtest/RESULTS.md.
bench:
	loadtest/bench.sh

# Every Grafana dashboard query against real Prometheus and two real nodes.
dashboard:
	python3 deploy/check_dashboard.py
