#!/usr/bin/env bash
# Memory of a gateway node by what it holds (an input of docs/CAPACITY.md): RSS growth of
# a fresh gateway per SSE connection in three shapes, N connections each:
#   one     each connection on 1 channel, CHANNELS channels in all
#   pairs   each connection on K channels (the same CHANNELS channels): N x (K - 1) more
#           (subscriber, channel) pairs than `one`, no more channels
#   unique  each connection on its own channel: N channels, N - CHANNELS more than `one`
# so  per pair = (pairs - one) / (N (K - 1))  and  per channel = (unique - one) / (N - CHANNELS).
# RUNS rounds, the shapes alternating; a fresh gateway (and Redis) per run, since freed
# memory is not all returned to the OS. The connections come from a Python asyncio client
# (`GET /sse?channel=..&channel=..`, held once the stream's first comment arrives).
#
# Usage: loadtest/memory-pairs.sh   (env: N=5000 K=32 CHANNELS=1000 RUNS=3
#          OUT=target/bench/memory-pairs)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-5000}
K=${K:-32}
CHANNELS=${CHANNELS:-1000}
RUNS=${RUNS:-3}
OUT=${OUT:-target/bench/memory-pairs}
mkdir -p "$OUT"
. loadtest/common.sh
trap cleanup EXIT
trap 'exit 130' INT TERM
cargo build --release -q -p gateway -p loadgen
BIN=$(mktemp -d /tmp/fanout-bin.XXXXXX)
tmpdirs+=("$BIN")
cp "${CARGO_TARGET_DIR:-target}"/release/gateway "$BIN/"
GW=$BIN/gateway
rss() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

# hold PORT SHAPE: opens N connections in that shape, prints "ready", holds them until
# stdin closes (at most 120 s).
HOLD=$(cat <<'PY'
import asyncio, sys
port, shape, n, k, m = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
def channels(i):
    if shape == "one":
        return [f"c-{i % m}"]
    if shape == "pairs":
        return [f"c-{(i + j * 31) % m}" for j in range(k)]
    return [f"u-{i}"]
async def one(i, sem, conns):
    async with sem:
        r, w = await asyncio.open_connection("127.0.0.1", int(port))
        q = "&".join(f"channel={c}" for c in channels(i))
        w.write(f"GET /sse?{q} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode())
        buf = b""
        while not (b"\r\n\r\n" in buf and b":" in buf.split(b"\r\n\r\n", 1)[1]):
            chunk = await asyncio.wait_for(r.read(4096), 10)
            if not chunk:
                raise RuntimeError(f"connection {i} closed: {buf[:200]!r}")
            buf += chunk
        if not buf.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"connection {i}: {buf[:200]!r}")
        conns.append((r, w))
async def main():
    sem, conns = asyncio.Semaphore(200), []
    await asyncio.gather(*(one(i, sem, conns) for i in range(n)))
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.read), 120)
asyncio.run(main())
PY
)

printf 'shape\trun\tconnections\tpairs\tchannels\trss_before_kib\trss_idle_kib\n' >"$OUT/runs.tsv"
for r in $(seq 1 "$RUNS"); do
  case $((r % 3)) in 1) order="one pairs unique" ;; 2) order="pairs unique one" ;; *) order="unique one pairs" ;; esac
  for shape in $order; do
    start_redis
    start_gateway "redis://127.0.0.1:$REDIS_PORT" "$OUT/$shape-$r.gateway.log"
    sleep 1
    before=$(rss "$GW_PID")
    coproc HOLDER { python3 -c "$HOLD" "${GW_URL##*:}" "$shape" "$N" "$K" "$CHANNELS"; }
    holder_pid=$HOLDER_PID
    pids+=("$holder_pid")
    read -r -t 120 line <&"${HOLDER[0]}" || true
    [ "${line:-}" = ready ] || { echo "the client did not connect ($shape)" >&2; exit 1; }
    sleep 2
    idle=$(rss "$GW_PID")
    case $shape in
      one) pairs=$N; chans=$CHANNELS ;;
      pairs) pairs=$((N * K)); chans=$CHANNELS ;;
      unique) pairs=$N; chans=$N ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$shape" "$r" "$N" "$pairs" "$chans" "$before" "$idle" | tee -a "$OUT/runs.tsv"
    exec {HOLDER[1]}>&-
    stop "$holder_pid" "$GW_PID" "$REDIS_PID"
  done
done
python3 - "$OUT/runs.tsv" "$N" "$K" "$CHANNELS" <<'PY' | tee "$OUT/table.md"
import statistics as st, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().splitlines()[1:]]
n, k, m = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
per = {}
for shape, r, conns, pairs, chans, b, i in rows:
    per.setdefault(shape, []).append((int(i) - int(b)) / n)
med = {s: st.median(v) for s, v in per.items()}
for s, v in per.items():
    print(f"{s:7} KiB per connection: median {med[s]:.2f} (runs {', '.join(f'{x:.2f}' for x in v)})")
print(f"per extra (subscriber, channel) pair: {(med['pairs'] - med['one']) * n / (n * (k - 1)) * 1024:.0f} bytes")
print(f"per extra channel on the node: {(med['unique'] - med['one']) * n / (n - m) * 1024:.0f} bytes")
PY
