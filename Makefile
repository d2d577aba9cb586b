# Developer shortcuts. The README's test command is `cargo test --workspace`.
.PHONY: check test fmt clippy run

check: fmt clippy test

fmt:
	cargo fmt --all -- --check

clippy:
	cargo clippy --workspace --all-targets -- -D warnings

test:
	cargo test --workspace

run:
	cargo run --release -p gateway
