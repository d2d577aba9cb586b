#!/usr/bin/env bash
# Cluster run (issue #4): NODES gateway processes on one Redis, SUBS_PER_NODE WebSocket
# subscribers on each (all on one channel), RATE msg/s published with raw Redis PUBLISH;
# loadgen spreads subscribers over the nodes (subscriber i -> node i % NODES) and over
# worker processes (each process may hold at most 20,000 sockets here).
#
# Usage: loadtest/cluster.sh    (env: NODES=3 SUBS_PER_NODE=16000 RATE=4 SECS=20
#                                     TRANSPORT=ws OUT=target/bench)
# Starts its own redis-server and release gateways on free loopback ports; stops them.
set -euo pipefail
cd "$(dirname "$0")/.."
NODES=${NODES:-3}
SUBS_PER_NODE=${SUBS_PER_NODE:-16000}
RATE=${RATE:-4}
SECS=${SECS:-20}
TRANSPORT=${TRANSPORT:-ws}
OUT=${OUT:-target/bench}
mkdir -p "$OUT"
cargo build --release -q -p gateway -p loadgen

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT

rport=$(free_port)
redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no >/dev/null 2>&1 &
pids+=($!)
sleep 0.3
urls=()
server_pids=()
for n in $(seq 1 "$NODES"); do
  pport=$(free_port); aport=$(free_port)
  ./target/release/gateway --listen 127.0.0.1:"$pport" --admin-listen 127.0.0.1:"$aport" \
    --redis-url redis://127.0.0.1:"$rport" 2>"$OUT/cluster.node$n.log" &
  pids+=($!)
  server_pids+=(--server-pid "$!")
  urls+=("http://127.0.0.1:$pport")
done
sleep 0.5

subs=$((NODES * SUBS_PER_NODE))
workers=$(( (subs + 15999) / 16000 ))
url_list=$(IFS=,; echo "${urls[*]}")
echo "== cluster: $NODES nodes x $SUBS_PER_NODE $TRANSPORT subscribers ($subs), 1 channel, $RATE msg/s for ${SECS}s, $workers loadgen workers" \
  | tee "$OUT/cluster.txt"
./target/release/loadgen run --url "$url_list" --redis-url redis://127.0.0.1:"$rport" \
  --transport "$TRANSPORT" --subscribers "$subs" --channels 1 --rate "$RATE" --duration "$SECS" \
  --warmup 2 --workers "$workers" --source-ips 127.0.0.2-127.0.0.40 --connect-concurrency 300 \
  "${server_pids[@]}" --json "$OUT/cluster.json" | tee -a "$OUT/cluster.txt"
