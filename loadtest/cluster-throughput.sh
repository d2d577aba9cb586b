#!/usr/bin/env bash
# History-publish throughput on ONE redis-server against a Redis Cluster of MASTERS
# masters (issue 16): the same gateway build, the same loadgen command, in the same run,
# alternating which goes first, RUNS runs each; prints medians.
#
# Load: STREAMS token streams (`loadgen --publish stream`: one streaming
# POST /publish/{ch}?stream=lines per channel, every line a history publish), RATE
# messages/s asked in total (open loop; set it above what the machine sustains and read
# the acknowledged rate), SUBS watchers (subscriber i on channel i % STREAMS, WebSocket
# and SSE mixed). 1,000 channels hash to slots spread evenly over the masters.
# Measured per run (loadgen `--server-pid`): each gateway's and each redis-server's CPU
# in the measured window, per acknowledged publish, and the acknowledged msgs/s.
#
# Usage: loadtest/cluster-throughput.sh   (env: RUNS=3 STREAMS=1000 SUBS=$STREAMS
#          RATE=30000 SECS=8 WARMUP=2 NODES=1 MASTERS=3 REPLICAS=0 PUBLISH=stream
#          TRANSPORT=ws,sse MODES="single cluster" OUT=target/bench/cluster-throughput;
#          TABLE_ONLY=1 reprints the table from OUT)
# Starts its own redis-servers (no persistence) and release gateways on free loopback
# ports, a fresh gateway per run (Redis is FLUSHALLed between runs), and stops all of it
# on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
STREAMS=${STREAMS:-1000}
SUBS=${SUBS:-$STREAMS}
RATE=${RATE:-30000}
SECS=${SECS:-8}
WARMUP=${WARMUP:-2}
NODES=${NODES:-1}
MASTERS=${MASTERS:-3}
REPLICAS=${REPLICAS:-0}
PUBLISH=${PUBLISH:-stream}
TRANSPORT=${TRANSPORT:-ws,sse}
MODES=${MODES:-single cluster}
OUT=${OUT:-target/bench/cluster-throughput}
mkdir -p "$OUT"

summarize() {
  python3 - "$OUT" <<'PY'
import json, statistics as st, sys, pathlib
out = pathlib.Path(sys.argv[1])
runs = [l.split("\t") for l in (out / "runs.tsv").read_text().splitlines()[1:] if l.strip()]
rows = {}
for mode, r, ngw, nredis, la0, la1, *busy in runs:
    j = json.loads((out / f"{mode}-{r}.json").read_text())
    procs = j["server"]["processes"]
    gw, rd = procs[: int(ngw)], procs[int(ngw):]
    win = j["server"]["measured_window_secs"] or 1
    msgs = j["publish"]["measured"] or 1
    us = lambda ps: sum(p["cpu_secs_measured"] for p in ps) * 1e6 / msgs
    rows.setdefault(mode, []).append({
        "acked/s": j["throughput"]["published_per_sec"],
        "delivered/s": j["throughput"]["delivered_per_sec"],
        "gateway µs/publish": us(gw),
        "gateway cores": sum(p["cpu_secs_measured"] for p in gw) / win,
        "redis µs/publish (sum)": us(rd),
        "redis cores (sum)": sum(p["cpu_secs_measured"] for p in rd) / win,
        "busiest redis cores": max(p["cpu_secs_measured"] for p in rd) / win,
        "redis µs/publish each": " / ".join(f'{p["cpu_secs_measured"] * 1e6 / msgs:.1f}' for p in rd),
        "loadgen µs/publish": j["loadgen"]["cpu_secs"] * 1e6 / max(j["publish"]["ok"], 1),
        "gateway waited for CPU s": sum(p["runq_wait_secs_measured"] for p in gw),
        "latency p50 ms": j["latency_ms"]["p50"],
        "latency p99 ms": j["latency_ms"]["p99"],
        "missing": j["delivery"]["missing"],
        "duplicates": j["delivery"]["duplicates"],
        "reordered": j["delivery"]["reordered"],
        "publishes failed": j["publish"]["failed"],
        "machine busy cores (every process, whole loadgen run)": float(busy[0]) if busy else float("nan"),
        "ours: gateway + redis + loadgen cores": sum(p["cpu_secs_measured"] for p in procs) / win
            + j["loadgen"]["cpu_secs"] / max(j["publish"]["duration_secs"], 1e-9),
        "load avg before → after": f"{la0} → {la1}",
    })
modes = [m for m in ("single", "cluster") if m in rows]
keys = list(rows[modes[0]][0].keys())
def med(vals):
    if isinstance(vals[0], str):
        return "; ".join(vals)
    m = st.median(vals)
    return f"{m:.0f}" if abs(m) >= 100 else f"{m:.2f}"
lines = [f"| medians of {len(rows[modes[0]])} runs | " + " | ".join(modes) + " | cluster / single |",
         "|---|" + "---:|" * (len(modes) + 1)]
for k in keys:
    cells = [med([x[k] for x in rows[m]]) for m in modes]
    ratio = ""
    if len(modes) == 2 and not isinstance(rows["single"][0][k], str):
        a, b = st.median([x[k] for x in rows["single"]]), st.median([x[k] for x in rows["cluster"]])
        ratio = f"{b / a:.2f}" if a else "-"
    lines.append(f"| {k} | " + " | ".join(cells) + f" | {ratio} |")
lines.append("")
lines.append("per run (acked/s): " + "; ".join(
    f"{m} " + ", ".join(f'{x["acked/s"]:.0f}' for x in rows[m]) for m in modes))
text = "\n".join(lines)
print(text)
(out / "table.md").write_text(text + "\n")
PY
}

if [ -n "${TABLE_ONLY:-}" ]; then summarize; exit 0; fi

. loadtest/common.sh
trap cleanup EXIT
trap 'exit 130' INT TERM
raise_fd_limit $(( SUBS / NODES + 2 * STREAMS + 500 ))
cargo build --release -q -p gateway -p loadgen
# Copies, so a rebuild of target/release during the run cannot change what is measured.
BIN=$(mktemp -d /tmp/fanout-bin.XXXXXX)
tmpdirs+=("$BIN")
cp "${CARGO_TARGET_DIR:-target}"/release/{gateway,loadgen} "$BIN/"
GW=$BIN/gateway
LG=$BIN/loadgen

start_redis
start_cluster "$MASTERS" "$REPLICAS"
{
  echo "commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- gateway loadtest/loadgen || echo ' (uncommitted changes)')"
  echo "$(redis-server --version | cut -d' ' -f1-3); one redis-server on :$REDIS_PORT (pid $REDIS_PID);" \
    "cluster: masters ${MASTER_PORTS[*]} (pids ${MASTER_PIDS[*]}), replicas ${REPLICA_PORTS[*]:-none}"
  echo "load: $STREAMS streams, $SUBS watchers ($TRANSPORT), $RATE msg/s asked, ${WARMUP}+${SECS} s, publish $PUBLISH, $NODES gateway(s)"
} | tee "$OUT/setup.txt"
printf 'mode\trun\tgateways\tredis\tload_before\tload_after\tmachine_busy_cores\n' >"$OUT/runs.tsv"

one_run() { # mode run
  local mode=$1 r=$2 url redis_pids=() gw_pids=() urls=() n la0 la1
  if [ "$mode" = single ]; then
    url=redis://127.0.0.1:$REDIS_PORT
    redis_pids=("$REDIS_PID")
    redis-cli -p "$REDIS_PORT" FLUSHALL >/dev/null
  else
    url=$CLUSTER_URL
    redis_pids=("${MASTER_PIDS[@]}" "${REPLICA_PIDS[@]}")
    for p in "${MASTER_PORTS[@]}"; do redis-cli -p "$p" FLUSHALL >/dev/null; done
  fi
  for n in $(seq 1 "$NODES"); do
    start_gateway "$url" "$OUT/$mode-$r.gateway$n.log"
    gw_pids+=("$GW_PID"); urls+=("$GW_URL")
  done
  local args=()
  for p in "${gw_pids[@]}" "${redis_pids[@]}"; do args+=(--server-pid "$p"); done
  sleep 1
  la0=$(loadavg)
  local cpu0 cpu1
  cpu0=$(cpu_jiffies)
  echo "== $mode run $r (load average $la0)" | tee "$OUT/$mode-$r.txt"
  [ "$mode" = cluster ] && echo "channels per master (port:count): $(channels_per_master "tp$r$mode" "$STREAMS")" \
    | tee -a "$OUT/$mode-$r.txt"
  "$LG" run --url "$(IFS=,; echo "${urls[*]}")" --publish "$PUBLISH" --transport "$TRANSPORT" \
    --channels "$STREAMS" --subscribers "$SUBS" --rate "$RATE" --duration "$SECS" --warmup "$WARMUP" \
    --connect-concurrency 200 --channel-prefix "tp$r$mode" "${args[@]}" --json "$OUT/$mode-$r.json" \
    | tee -a "$OUT/$mode-$r.txt"
  cpu1=$(cpu_jiffies)
  la1=$(loadavg)
  echo "load average after: $la1" | tee -a "$OUT/$mode-$r.txt"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$mode" "$r" "${#gw_pids[@]}" "${#redis_pids[@]}" "$la0" "$la1" \
    "$(busy_cores "$cpu0" "$cpu1")" >>"$OUT/runs.tsv"
  stop "${gw_pids[@]}"
}

for r in $(seq 1 "$RUNS"); do
  # Alternate which mode goes first.
  if [ $((r % 2)) = 1 ]; then order=$MODES; else order=$(echo "$MODES" | tr ' ' '\n' | tac | tr '\n' ' '); fi
  for mode in $order; do one_run "$mode" "$r"; done
done
summarize
