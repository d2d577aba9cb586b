# Helpers sourced by loadtest/cluster-throughput.sh and loadtest/c100k.sh: free ports,
# a plain redis-server, a Redis Cluster of real processes, release gateways, readiness.
# The caller keeps `pids` (every process it started) and `tmpdirs`, and calls
# `cleanup` from its EXIT trap, so everything stops even when a step fails.

pids=()
tmpdirs=()

cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  for p in "${tmpdirs[@]}"; do rm -rf "$p"; done
}

# raise_fd_limit NEED: raises this shell's soft open-file limit to the hard limit (every
# redis-server it starts inherits it; gateways and loadgen raise their own as well) and
# fails with one clear line when the hard limit is below NEED.
raise_fd_limit() {
  local hard
  hard=$(ulimit -Hn)
  if [ "$hard" != unlimited ] && [ "$hard" -lt "$1" ]; then
    echo "a process here needs $1 file descriptors but the hard limit is $hard: use more NODES/WORKERS" >&2
    return 1
  fi
  ulimit -Sn "$hard"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# cpu_jiffies: "busy total" jiffies of the whole machine (every process on it).
cpu_jiffies() { awk '$1 == "cpu" { printf "%.0f %.0f", $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat; }

# busy_cores "BUSY0 TOTAL0" "BUSY1 TOTAL1": cores the machine kept busy between two samples.
busy_cores() {
  python3 -c 'import os, sys; a, b = sys.argv[1].split(), sys.argv[2].split(); print(f"{(int(b[0]) - int(a[0])) / max(int(b[1]) - int(a[1]), 1) * os.cpu_count():.2f}")' "$1" "$2"
}

# wait_redis PORT: until it answers PING (at most 10 s).
wait_redis() {
  local i
  for i in $(seq 1 200); do
    [ "$(redis-cli -p "$1" PING 2>/dev/null)" = PONG ] && return 0
    sleep 0.05
  done
  echo "redis-server on port $1 did not start" >&2
  return 1
}

# start_redis: one plain redis-server (no persistence). Sets REDIS_PORT, REDIS_PID.
start_redis() {
  REDIS_PORT=$(free_port)
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no >/dev/null 2>&1 &
  REDIS_PID=$!
  pids+=("$REDIS_PID")
  wait_redis "$REDIS_PORT"
}

# start_cluster MASTERS REPLICAS: a Redis Cluster of MASTERS x (1 + REPLICAS) redis-server
# processes (no persistence, cluster-node-timeout 5 s), made by `redis-cli --cluster
# create`; returns once every node says cluster_state:ok. Sets CLUSTER_URL (the
# masters as seeds), MASTER_PORTS / MASTER_PIDS and REPLICA_PORTS / REPLICA_PIDS.
start_cluster() {
  local masters=$1 replicas=$2 n dir i port bus addrs=() ports=() cpids=()
  n=$((masters * (1 + replicas)))
  dir=$(mktemp -d /tmp/fanout-cluster.XXXXXX)
  tmpdirs+=("$dir")
  for i in $(seq 1 "$n"); do
    port=$(free_port); bus=$(free_port)
    mkdir -p "$dir/n$i"
    redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes --cluster-port "$bus" \
      --cluster-config-file nodes.conf --cluster-node-timeout 5000 --save '' --appendonly no \
      --dir "$dir/n$i" >/dev/null 2>&1 &
    pids+=($!)
    cpids+=($!)
    ports+=("$port")
    addrs+=("127.0.0.1:$port")
  done
  for port in "${ports[@]}"; do wait_redis "$port"; done
  redis-cli --cluster create "${addrs[@]}" --cluster-replicas "$replicas" --cluster-yes \
    >"$dir/create.log" 2>&1 || { cat "$dir/create.log" >&2; return 1; }
  for i in $(seq 1 300); do
    local ok=1
    for port in "${ports[@]}"; do
      redis-cli -p "$port" CLUSTER INFO 2>/dev/null | grep -q 'cluster_state:ok' || ok=0
    done
    [ $ok = 1 ] && break
    [ "$i" = 300 ] && { echo "the cluster did not become ok" >&2; return 1; }
    sleep 0.1
  done
  MASTER_PORTS=(); MASTER_PIDS=(); REPLICA_PORTS=(); REPLICA_PIDS=()
  for i in "${!ports[@]}"; do
    if redis-cli -p "${ports[$i]}" ROLE | head -1 | grep -q master; then
      MASTER_PORTS+=("${ports[$i]}"); MASTER_PIDS+=("${cpids[$i]}")
    else
      REPLICA_PORTS+=("${ports[$i]}"); REPLICA_PIDS+=("${cpids[$i]}")
    fi
  done
  CLUSTER_URL="redis+cluster://$(printf '127.0.0.1:%s,' "${MASTER_PORTS[@]}" | sed 's/,$//')"
}

# start_gateway REDIS_URL LOG [extra flags...]: a release gateway on free ports; returns
# once /readyz answers 200 (at most 30 s). Sets GW_PID and GW_URL.
start_gateway() {
  local url=$1 log=$2 pport aport i
  shift 2
  pport=$(free_port); aport=$(free_port)
  "$GW" --listen 127.0.0.1:"$pport" --admin-listen 127.0.0.1:"$aport" --redis-url "$url" "$@" 2>"$log" &
  GW_PID=$!
  pids+=("$GW_PID")
  GW_URL="http://127.0.0.1:$pport"
  for i in $(seq 1 300); do
    curl -fs -o /dev/null "http://127.0.0.1:$aport/readyz" && return 0
    kill -0 "$GW_PID" 2>/dev/null || { echo "gateway exited, see $log" >&2; return 1; }
    sleep 0.1
  done
  echo "gateway on $GW_URL not ready after 30 s, see $log" >&2
  return 1
}

# stop PID...: stops processes this script started (and forgets them).
stop() {
  local p q keep=()
  for p in "$@"; do kill "$p" 2>/dev/null || true; done
  for p in "$@"; do wait "$p" 2>/dev/null || true; done
  for q in "${pids[@]}"; do
    for p in "$@"; do [ "$q" = "$p" ] && continue 2; done
    keep+=("$q")
  done
  pids=("${keep[@]}")
}

# wait_quiet MAX_LOAD MAX_SECS: waits (bounded) until the 1-minute load average is at
# most MAX_LOAD; prints what it found.
wait_quiet() {
  local i
  for i in $(seq 1 "$2"); do
    awk -v m="$1" '{ exit !($1 <= m) }' /proc/loadavg && break
    sleep 1
  done
  echo "load average $(loadavg)"
}

# channels_per_master PREFIX COUNT: how the channels PREFIX-0 .. PREFIX-(COUNT-1) spread
# over the cluster's masters (by CRC16 slot, as Redis Cluster hashes a sharded channel).
channels_per_master() {
  redis-cli -p "${MASTER_PORTS[0]}" CLUSTER NODES | python3 -c '
import sys
def crc16(b):
    c = 0
    for x in b:
        c ^= x << 8
        for _ in range(8):
            c = ((c << 1) ^ 0x1021) if c & 0x8000 else c << 1
            c &= 0xFFFF
    return c
ranges = []
for line in sys.stdin:
    f = line.split()
    if "master" in f[2]:
        for s in f[8:]:
            if not s.startswith("["):
                a, _, b = s.partition("-")
                ranges.append((int(a), int(b or a), f[1].split("@")[0].rsplit(":", 1)[1]))
counts = {}
for k in range(int(sys.argv[2])):
    slot = crc16(f"{sys.argv[1]}-{k}".encode()) % 16384
    port = next(p for a, b, p in ranges if a <= slot <= b)
    counts[port] = counts.get(port, 0) + 1
print(" ".join(f"{p}:{n}" for p, n in sorted(counts.items())))
' "$1" "$2"
}
