#!/usr/bin/env bash
# Reproducible benchmark runs for loadtest/RESULTS.md. Each scenario starts its own
# redis-server and a fresh release gateway on free loopback ports, runs loadgen, and
# stops them. Usage: loadtest/bench.sh [scenario ...]   (default: all)
# Scenarios: idle-ws idle-sse idle-poll cpu-ws cpu-sse fanout-100x100 latency-1k
# Token streams (not in the default set; redis-server's CPU is measured too):
#   tokens-1k      1,000 streams x 50 tokens/s (50,000/s), one ws or sse watcher each,
#                  one streaming POST /publish/{ch}?stream=lines per stream
#   tokens-fanout  100 streams x 20 tokens/s, 100 watchers each (200,000 deliveries/s)
#   tokens-post    the tokens-1k load published the old way, one POST /publish/{ch} per
#                  token: today's single-request publish rate (history on)
#   TOKENS_PER_SEC=n sets tokens-1k's and tokens-post's rate per stream (default 50)
# Floors (no gateway: `loadgen floor`, the kernel's own cost of the same traffic on this
# machine): floor-1k floor-10k floor-100x100 floor-connect
# Memory per (subscriber, channel) pair (`loadtest/pairs.py`: 3,000 WebSockets x 32
# channels against 3,000 x 1, fresh nodes): pairs (with Redis), pairs-noredis
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-target/bench}
mkdir -p "$OUT"
# GW / LG name other binaries, e.g. an older build for an A/B pair:
#   GW=/tmp/gateway-before loadtest/bench.sh cpu-ws
cargo build --release -q -p gateway -p loadgen
GW=${GW:-./target/release/gateway}
LG=${LG:-./target/release/loadgen}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

run() { # name, gateway-extra-args..., -- loadgen args...
  local name=$1; shift
  local gwargs=()
  while [ "$1" != "--" ]; do gwargs+=("$1"); shift; done; shift
  local rport pport aport
  rport=$(free_port); pport=$(free_port); aport=$(free_port)
  redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no >/dev/null 2>&1 &
  local rpid=$!
  sleep 0.3
  "$GW" --listen 127.0.0.1:"$pport" --admin-listen 127.0.0.1:"$aport" \
        --redis-url redis://127.0.0.1:"$rport" "${gwargs[@]}" 2>"$OUT/$name.gateway.log" &
  local gpid=$!
  sleep 0.5
  echo "== $name" | tee "$OUT/$name.txt"
  local pids=(--server-pid "$gpid")
  [ -n "${REDIS_CPU:-}" ] && pids+=(--server-pid "$rpid")
  "$LG" run --url http://127.0.0.1:"$pport" --redis-url redis://127.0.0.1:"$rport" \
        "${pids[@]}" --json "$OUT/$name.json" "$@" | tee -a "$OUT/$name.txt" || true
  kill "$gpid" "$rpid" 2>/dev/null || true
  wait "$gpid" "$rpid" 2>/dev/null || true
}

floor() { # name, loadgen floor args...
  local name=$1; shift
  echo "== $name" | tee "$OUT/$name.txt"
  "$LG" floor "$@" | tee -a "$OUT/$name.txt" || true
}

IPS=127.0.0.2-127.0.0.20
scenario() {
  case $1 in
    idle-ws)   run idle-ws -- --transport ws --subscribers 10000 --channels 100 --rate 0 --duration 10 --source-ips $IPS --connect-concurrency 200 ;;
    idle-sse)  run idle-sse -- --transport sse --subscribers 10000 --channels 100 --rate 0 --duration 10 --source-ips $IPS --connect-concurrency 200 ;;
    idle-poll) run idle-poll -- --transport poll --subscribers 10000 --channels 100 --rate 0 --duration 10 --source-ips $IPS --connect-concurrency 200 ;;
    cpu-ws)    run cpu-ws -- --transport ws --subscribers 10000 --channels 1 --rate 20 --duration 20 --warmup 2 --source-ips $IPS --connect-concurrency 200 ;;
    cpu-sse)   run cpu-sse -- --transport sse --subscribers 10000 --channels 1 --rate 20 --duration 20 --warmup 2 --source-ips $IPS --connect-concurrency 200 ;;
    fanout-100x100) run fanout-100x100 -- --transport ws --subscribers 10000 --channels 100 --rate 100 --duration 20 --warmup 2 --source-ips $IPS --connect-concurrency 200 ;;
    latency-1k) run latency-1k -- --transport ws --subscribers 1000 --channels 1 --rate 20 --duration 20 --warmup 2 ;;
    tokens-1k) REDIS_CPU=1 run tokens-1k -- --publish stream --transport ws,sse --subscribers 1000 --channels 1000 --rate $((1000 * ${TOKENS_PER_SEC:-50})) --duration 10 --warmup 2 --connect-concurrency 200 ;;
    tokens-fanout) REDIS_CPU=1 run tokens-fanout -- --publish stream --transport ws,sse --subscribers 10000 --channels 100 --rate 2000 --duration 10 --warmup 2 --source-ips $IPS --connect-concurrency 200 ;;
    tokens-post) REDIS_CPU=1 run tokens-post -- --publish http --transport ws,sse --subscribers 1000 --channels 1000 --rate $((1000 * ${TOKENS_PER_SEC:-50})) --duration 10 --warmup 2 --connect-concurrency 200 ;;
    floor-1k)  floor floor-1k fanout --subscribers 1000 --channels 1 --rate 20 --duration 20 ;;
    floor-10k) floor floor-10k fanout --subscribers 10000 --channels 1 --rate 20 --duration 20 --source-ips $IPS ;;
    floor-100x100) floor floor-100x100 fanout --subscribers 10000 --channels 100 --rate 100 --duration 20 --source-ips $IPS ;;
    floor-connect) floor floor-connect connect --connections 10000 --concurrency 200 --source-ips $IPS ;;
    pairs|pairs-noredis)
      local flags=(); [ "$1" = pairs-noredis ] && flags=(--no-redis)
      echo "== $1" | tee "$OUT/$1.txt"
      python3 loadtest/pairs.py --gateway "$GW" "${flags[@]}" --out "$OUT/$1" --json "$OUT/$1.json" \
        | tee -a "$OUT/$1.txt" || true ;;
    *) echo "unknown scenario $1" >&2; exit 2 ;;
  esac
}

if [ $# -eq 0 ]; then set -- idle-ws idle-sse idle-poll cpu-ws cpu-sse fanout-100x100 latency-1k pairs pairs-noredis; fi
for s in "$@"; do scenario "$s"; done
