#!/usr/bin/env bash
# The browser client in real Chromium (issue 14): publish → DOM latency on each transport
# and node kill → receiving again, measured by loadtest/browser/measure.mjs against its
# own redis-server and two release gateways on free loopback ports.
#
# Usage: loadtest/browser.sh    (env: MESSAGES=1000 RATE=50 KILLS=10 INTERVAL=20
#                                     TRANSPORTS=sse,ws,poll PHASES=latency,kill
#                                     MAX_LOAD=3 LOAD_TRIES=20 LOAD_WAIT=30 OUT=target/browser-bench)
# Needs node, Debian's chromium (/usr/bin/chromium or $CHROMIUM) and `npm ci` in
# clients/js (playwright-core; no browser is downloaded). Before measuring it waits, at
# most LOAD_TRIES × LOAD_WAIT s, for the 1-minute load average to drop under MAX_LOAD,
# then measures anyway and says so. Everything it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
MESSAGES=${MESSAGES:-1000}
RATE=${RATE:-50}
KILLS=${KILLS:-10}
INTERVAL=${INTERVAL:-20}
TRANSPORTS=${TRANSPORTS:-sse,ws,poll}
PHASES=${PHASES:-latency,kill}
MAX_LOAD=${MAX_LOAD:-3}
LOAD_TRIES=${LOAD_TRIES:-20}
LOAD_WAIT=${LOAD_WAIT:-30}
OUT=${OUT:-target/browser-bench}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
[ -f clients/js/node_modules/playwright-core/package.json ] || { echo "run: cd clients/js && npm ci" >&2; exit 2; }

cargo build --release -q -p gateway
# A copy, so a rebuild by someone else during the run cannot change what is measured.
GW="$OUT/gateway"
cp "$CARGO_TARGET_DIR/release/gateway" "$GW.new"
mv -f "$GW.new" "$GW"

PIDS="$OUT/pids"
rm -rf "$PIDS"
mkdir -p "$PIDS"
redis_pid=
measure_pid=
cleanup() {
  [ -n "$measure_pid" ] && kill "$measure_pid" 2>/dev/null || true
  # The nodes (measure.mjs restarts killed ones and records the new pid): only a pid
  # that is still this run's gateway binary is signalled.
  for f in "$PIDS"/node*.pid; do
    [ -f "$f" ] || continue
    p=$(cat "$f")
    if [ "$(readlink "/proc/$p/exe" 2>/dev/null)" = "$GW" ]; then kill "$p" 2>/dev/null || true; fi
  done
  [ -n "$redis_pid" ] && kill "$redis_pid" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

load1() { cut -d' ' -f1 /proc/loadavg; }
tries=0
while [ "$tries" -lt "$LOAD_TRIES" ] && awk -v l="$(load1)" -v m="$MAX_LOAD" 'BEGIN { exit !(l >= m) }'; do
  echo "load average $(load1) >= $MAX_LOAD, waiting ${LOAD_WAIT}s ($((tries + 1))/$LOAD_TRIES)" >&2
  sleep "$LOAD_WAIT"
  tries=$((tries + 1))
done

rport=$(free_port)
redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no >"$OUT/redis.log" 2>&1 &
redis_pid=$!
for _ in $(seq 1 50); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.1; done

# measure.mjs restarts a killed node with these same flags.
node_args=()
: >"$OUT/node0.log"
: >"$OUT/node1.log"
for n in 0 1; do
  pport=$(free_port)
  aport=$(free_port)
  "$GW" --listen 127.0.0.1:"$pport" --admin-listen 127.0.0.1:"$aport" \
    --redis-url redis://127.0.0.1:"$rport" 2>>"$OUT/node$n.log" &
  echo $! >"$PIDS/node$n.pid"
  disown # killed on purpose: no "Killed" job notice; the trap still ends it by pid
  node_args+=(--node "127.0.0.1:$pport,127.0.0.1:$aport")
done

commit=$(git rev-parse --short HEAD)
dirty=$(git diff --quiet HEAD -- gateway shared clients/js/dist && echo "" || echo " (+ uncommitted changes)")
{
  echo "== browser client in Chromium: commit $commit$dirty, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "   $(/usr/bin/env node --version) $("${CHROMIUM:-/usr/bin/chromium}" --version 2>/dev/null), redis $(redis-server --version | grep -o 'v=[0-9.]*')"
  echo "   $MESSAGES messages per transport at $RATE msg/s; $KILLS kills per transport, a message every $INTERVAL ms"
  echo "   before: $(uptime) (waited $tries × ${LOAD_WAIT}s for it to drop under $MAX_LOAD)"
} | tee "$OUT/browser.txt"
# In the background and waited for, so that a signal reaches the trap at once.
node loadtest/browser/measure.mjs --gateway "$GW" --redis-url redis://127.0.0.1:"$rport" "${node_args[@]}" \
  --pid-dir "$PIDS" --log-dir "$OUT" --messages "$MESSAGES" --rate "$RATE" --kills "$KILLS" \
  --interval "$INTERVAL" --transports "$TRANSPORTS" --phases "$PHASES" --json "$OUT/browser.json" \
  >"$OUT/measure.out" 2> >(tee "$OUT/measure.log" >&2) &
measure_pid=$!
status=0
wait "$measure_pid" || status=$?
measure_pid=
tee -a "$OUT/browser.txt" <"$OUT/measure.out"
echo "   after: $(uptime)" | tee -a "$OUT/browser.txt"
echo "(text: $OUT/browser.txt, everything: $OUT/browser.json)"
exit "$status"
