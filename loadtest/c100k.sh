#!/usr/bin/env bash
# C100K on one machine (issue 16): SUBS concurrent subscribers (100,000) on NODES gateway
# processes (6: each holds ~16,700 connections, under the 20,000 descriptors a process
# may have here), WebSocket and SSE mixed, held by WORKERS loadgen worker processes
# (6, ~16,700 sockets each) from source addresses spread over SOURCE_IPS, on a Redis
# Cluster of MASTERS masters with REPLICAS replicas each. Every subscriber gets one
# message a second for SECS seconds: CHANNELS channels (25: coprime with 6, so every node
# holds every channel; their slots spread over the masters), RATE = CHANNELS msg/s
# published through the first gateway's HTTP API (history publishes).
#
# Reports: connected subscribers, deliveries expected / received / missing / duplicate
# / reordered, latency p50 / p99 (and per transport), per gateway node RSS per connection
# (idle and at the end) and CPU per delivery, each redis-server's CPU, loadgen's CPU, the
# machine's CPU use (vmstat) and the load average before and after.
# FLOOR=1 then runs the same traffic with no server at all: NODES `loadgen floor fanout`
# processes side by side, each with SUBS/NODES connections at 1 msg/s per connection.
# FLOOR=only runs just that, and adds it to the summary of the last run in OUT (so the
# two heavy runs can take the machine one after the other, not as one long run).
#
# Usage: loadtest/c100k.sh   (env: SUBS=100000 NODES=6 WORKERS=6 CHANNELS=25 SECS=60
#          WARMUP=2 MASTERS=3 REPLICAS=1 TRANSPORT=ws,sse SOURCE_IPS=127.0.0.2-127.0.0.61
#          CONNECT_CONCURRENCY=300 FLOOR=0 OUT=target/bench/c100k; TABLE_ONLY=1 reprints)
# Starts its own redis-servers (no persistence) and release gateways on free loopback
# ports and stops all of it on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
SUBS=${SUBS:-100000}
NODES=${NODES:-6}
WORKERS=${WORKERS:-6}
CHANNELS=${CHANNELS:-25}
RATE=${RATE:-$CHANNELS}
SECS=${SECS:-60}
WARMUP=${WARMUP:-2}
MASTERS=${MASTERS:-3}
REPLICAS=${REPLICAS:-1}
TRANSPORT=${TRANSPORT:-ws,sse}
SOURCE_IPS=${SOURCE_IPS:-127.0.0.2-127.0.0.61}
CONNECT_CONCURRENCY=${CONNECT_CONCURRENCY:-300}
FLOOR=${FLOOR:-0}
OUT=${OUT:-target/bench/c100k}
mkdir -p "$OUT"

summarize() {
  python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
meta = dict(l.split("=", 1) for l in (out / "meta.txt").read_text().splitlines() if "=" in l)
j = json.loads((out / "c100k.json").read_text())
nodes, nredis = int(meta["nodes"]), int(meta["redis"])
procs = j["server"]["processes"]
gw, rd = procs[:nodes], procs[nodes:nodes + nredis]
win = j["server"]["measured_window_secs"] or 1
ok = j["connect"]["ok"]
d = j["delivery"]
recv = d["received"] or 1
msgs = j["publish"]["measured"] or 1
L = []
p = L.append
p(f"load average before {meta['load_before']}, after {meta['load_after']}; "
  f"memory used {meta['mem_before']} → {meta['mem_after']} MiB (free -m)")
p(f"connected {ok} of {j['connect']['attempted']} in {j['connect']['duration_secs']:.1f} s "
  f"({j['connect']['rate_per_sec']:.0f}/s), failed {j['connect']['failed']}, connected at end {d['connected_at_end']}")
p(f"published {j['publish']['ok']} ok / {j['publish']['scheduled']} scheduled, failed {j['publish']['failed']}, "
  f"{msgs} in the {win:.1f} s window")
p(f"deliveries expected {d['expected']}, received {d['received']}, missing {d['missing']}, "
  f"duplicates {d['duplicates']}, reordered {d['reordered']}, disconnects {sum(d['disconnects'].values())}")
lat = j["latency_ms"]
p(f"latency ms p50 {lat['p50']:.1f}  p90 {lat['p90']:.1f}  p99 {lat['p99']:.1f}  max {lat['max']:.1f}"
  + "".join(f"; {t} p50 {v['p50']:.1f} p99 {v['p99']:.1f}" for t, v in j.get("latency_ms_by_transport", {}).items()))
p(f"delivered {j['throughput']['delivered_per_sec']:.0f}/s")
p("")
p("| gateway node | RSS before → idle → end MiB | KiB/conn idle | KiB/conn end | CPU s in window | cores | µs/delivery | waited for CPU s |")
p("|---|---|---:|---:|---:|---:|---:|---:|")
share = ok / nodes
for i, g in enumerate(gw):
    b, idle, e = g["before"]["rss_kib"], g["idle"]["rss_kib"], g["end"]["rss_kib"]
    p(f"| {i + 1} (pid {g['pid']}) | {b / 1024:.1f} → {idle / 1024:.1f} → {e / 1024:.1f} | {(idle - b) / share:.2f} | "
      f"{(e - b) / share:.2f} | {g['cpu_secs_measured']:.2f} | {g['cpu_secs_measured'] / win:.3f} | "
      f"{g['cpu_secs_measured'] * 1e6 / (recv / nodes):.2f} | {g['runq_wait_secs_measured']:.1f} |")
gcpu = sum(g["cpu_secs_measured"] for g in gw)
grss = sum(g["end"]["rss_kib"] for g in gw) / 1024
p(f"| all {nodes} | RSS at end {grss:.0f} MiB | {(sum(g['idle']['rss_kib'] - g['before']['rss_kib'] for g in gw)) / ok:.2f} | "
  f"{(sum(g['end']['rss_kib'] - g['before']['rss_kib'] for g in gw)) / ok:.2f} | {gcpu:.2f} | {gcpu / win:.3f} | "
  f"{gcpu * 1e6 / recv:.2f} | {sum(g['runq_wait_secs_measured'] for g in gw):.1f} |")
p("")
p("| redis-server | role | CPU s in window | cores | µs per publish | RSS MiB |")
p("|---|---|---:|---:|---:|---:|")
roles = meta["redis_roles"].split()
for r, role in zip(rd, roles):
    p(f"| pid {r['pid']} | {role} | {r['cpu_secs_measured']:.2f} | {r['cpu_secs_measured'] / win:.4f} | "
      f"{r['cpu_secs_measured'] * 1e6 / msgs:.0f} | {r['end']['rss_kib'] / 1024:.1f} |")
rcpu = sum(r["cpu_secs_measured"] for r in rd)
p(f"| all | | {rcpu:.2f} | {rcpu / win:.4f} | {rcpu * 1e6 / msgs:.0f} | |")
p("")
p(f"loadgen: {j['loadgen']['processes']} processes, CPU {j['loadgen']['cpu_secs']:.1f} s (whole run), "
  f"RSS {j['loadgen']['rss_kib'] / 1024:.0f} MiB, waited for CPU {j['loadgen']['runq_wait_secs']:.1f} s")
p(f"result: {'CLEAN' if j['clean'] else 'NOT CLEAN'}")
vm = out / "vmstat.txt"
if vm.exists():
    rows = [l.split() for l in vm.read_text().splitlines() if l.strip() and l.split()[0].isdigit()]
    if rows:
        idle = [int(r[14]) for r in rows[1:]]  # the first line is since boot
        p(f"machine CPU idle % per 5 s (vmstat): {' '.join(map(str, idle))}")
kt = out / "kernel.txt"
if kt.exists():
    rows = [l.split() for l in kt.read_text().splitlines() if "inuse" in l]
    if rows:
        get = lambda r, k: int(r[r.index(k) + 1])
        top = max(rows, key=lambda r: get(r, "inuse"))
        p(f"kernel (5 s samples): TCP sockets in use {get(rows[0], 'inuse')} → peak {get(top, 'inuse')}; "
          f"TCP buffer pages at that peak {get(top, 'mem')} ({get(top, 'mem') * 4 / 1024:.0f} MiB); "
          f"slab {get(rows[0], 'slab_kib') / 1024:.0f} → {get(top, 'slab_kib') / 1024:.0f} MiB "
          f"({(get(top, 'slab_kib') - get(rows[0], 'slab_kib')) / max(get(top, 'inuse') - get(rows[0], 'inuse'), 1):.2f} KiB per socket)")
        # The plateau: every connection up. What the whole machine (every process on it,
        # not only this run's) kept busy, and the loopback bytes per delivery then.
        plat = [r for r in rows if get(r, "inuse") >= 0.99 * get(top, "inuse")]
        if len(plat) >= 2 and "cpu_busy" in plat[0]:
            a, b = plat[0], plat[-1]
            secs = int(b[0]) - int(a[0])
            busy = (get(b, "cpu_busy") - get(a, "cpu_busy")) / max(get(b, "cpu_all") - get(a, "cpu_all"), 1)
            ncpu = __import__("os").cpu_count()
            p(f"machine over {secs} s with every connection up: {busy * ncpu:.2f} of {ncpu} cores busy "
              f"(all processes on it); loopback {(get(b, 'lo_bytes') - get(a, 'lo_bytes')) / secs / 1e6:.1f} MB/s "
              f"(both directions, every process), {(get(b, 'lo_bytes') - get(a, 'lo_bytes')) / 2 / secs / (recv / win):.0f} bytes "
              f"per delivery each way")
fl = out / "floor.txt"
if fl.exists():
    import re
    text = fl.read_text()
    w = [float(x) for x in re.findall(r"writer ([0-9.]+)s", text)]
    rdr = [float(x) for x in re.findall(r"reader ([0-9.]+)s", text)]
    got = [int(x) for x in re.findall(r"received (\d+)", text)]
    p99 = [float(x) for x in re.findall(r"p99 ([0-9.]+)", text)]
    p("")
    if w and got:
        n = sum(got)
        p(f"floor (no server; {len(w)} writer processes side by side, same connections and rate): "
          f"{n} deliveries, writer {sum(w) * 1e6 / n:.2f} µs/delivery, reader {sum(rdr) * 1e6 / n:.2f} µs/delivery, "
          f"p99 {min(p99):.1f}–{max(p99):.1f} ms; gateway / floor writer CPU per delivery "
          f"{gcpu * 1e6 / recv / (sum(w) * 1e6 / n):.2f}")
    p(text.rstrip())
text = "\n".join(L)
print(text)
(out / "summary.md").write_text(text + "\n")
PY
}

if [ -n "${TABLE_ONLY:-}" ]; then summarize; exit 0; fi

. loadtest/common.sh
trap cleanup EXIT
trap 'exit 130' INT TERM
# Each gateway holds its share of the subscribers plus its Redis and admin sockets; each
# loadgen worker its share (loadgen checks that itself, at most 19,000).
raise_fd_limit $(( (SUBS + NODES - 1) / NODES + 500 ))
cargo build --release -q -p gateway -p loadgen
BIN=$(mktemp -d /tmp/fanout-bin.XXXXXX)
tmpdirs+=("$BIN")
cp "${CARGO_TARGET_DIR:-target}"/release/{gateway,loadgen} "$BIN/"
GW=$BIN/gateway
LG=$BIN/loadgen

if [ "$FLOOR" != only ]; then
rm -f "$OUT"/floor*.txt  # a floor belongs to the run it follows
start_cluster "$MASTERS" "$REPLICAS"
gw_pids=(); urls=()
for n in $(seq 1 "$NODES"); do
  start_gateway "$CLUSTER_URL" "$OUT/c100k.gateway$n.log"
  gw_pids+=("$GW_PID"); urls+=("$GW_URL")
done
args=()
for p in "${gw_pids[@]}" "${MASTER_PIDS[@]}" "${REPLICA_PIDS[@]}"; do args+=(--server-pid "$p"); done
roles="$(printf 'master %.0s' "${MASTER_PIDS[@]}")$(printf 'replica %.0s' "${REPLICA_PIDS[@]}")"
mem() { free -m | awk '/^Mem:/ { print $3 }'; }
{
  echo "commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- gateway loadtest/loadgen || echo ' (uncommitted changes)')"
  echo "nodes=$NODES"
  echo "redis=$(( ${#MASTER_PIDS[@]} + ${#REPLICA_PIDS[@]} ))"
  echo "redis_roles=$roles"
  echo "channels_per_master=$(channels_per_master c100k "$CHANNELS")"
  echo "load_before=$(loadavg)"
  echo "mem_before=$(mem)"
} >"$OUT/meta.txt"
cat "$OUT/meta.txt"
echo "== c100k: $SUBS subscribers ($TRANSPORT) on $NODES nodes, $CHANNELS channels, $RATE msg/s for ${SECS}s, $WORKERS loadgen workers, cluster ${MASTERS}x(1+$REPLICAS)" \
  | tee "$OUT/c100k.txt"
vmstat 5 $(( (SECS + 240) / 5 )) >"$OUT/vmstat.txt" &
vm_pid=$!
pids+=("$vm_pid")
# Kernel side every 5 s: TCP sockets and their buffer pages, slab memory, loopback bytes.
( for _ in $(seq 1 $(( (SECS + 240) / 5 ))); do
    echo "$(date +%s) $(grep '^TCP:' /proc/net/sockstat) slab_kib $(awk '/^Slab:/ { print $2 }' /proc/meminfo)" \
      "lo_bytes $(awk '$1 == "lo:" { printf "%.0f", $2 + $10 }' /proc/net/dev)" \
      "cpu_busy $(awk '$1 == "cpu" { printf "%.0f", $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat)" \
      "cpu_all $(awk '$1 == "cpu" { printf "%.0f", $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat)"
    sleep 5
  done ) >"$OUT/kernel.txt" &
kern_pid=$!
pids+=("$kern_pid")
"$LG" run --url "$(IFS=,; echo "${urls[*]}")" --publish http --transport "$TRANSPORT" \
  --subscribers "$SUBS" --channels "$CHANNELS" --rate "$RATE" --duration "$SECS" --warmup "$WARMUP" \
  --workers "$WORKERS" --source-ips "$SOURCE_IPS" --connect-concurrency "$CONNECT_CONCURRENCY" \
  --settle 3 --drain 10 --channel-prefix c100k "${args[@]}" --json "$OUT/c100k.json" | tee -a "$OUT/c100k.txt"
stop "$vm_pid" "$kern_pid"
{ echo "load_after=$(loadavg)"; echo "mem_after=$(mem)"; } >>"$OUT/meta.txt"
stop "${gw_pids[@]}"
fi

if [ "$FLOOR" = 1 ] || [ "$FLOOR" = only ]; then
  # The same connections and rate without any server: one floor process per node, each
  # with its share of the connections and its own range of source addresses.
  per=$((SUBS / NODES))
  fpids=()
  for n in $(seq 1 "$NODES"); do
    timeout $((SECS + 300)) "$LG" floor fanout --subscribers "$per" --channels "$CHANNELS" --rate "$CHANNELS" --duration "$SECS" \
      --source-ips "127.0.$n.2-127.0.$n.21" >"$OUT/floor$n.txt" 2>&1 &
    fpids+=($!); pids+=($!)
  done
  for p in "${fpids[@]}"; do wait "$p" || true; done
  for n in $(seq 1 "$NODES"); do sed "s/^/node $n: /" "$OUT/floor$n.txt"; done >"$OUT/floor.txt"
fi
summarize
