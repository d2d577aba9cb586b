#!/usr/bin/env bash
# The docker-compose.yml topology without Docker, from Debian packages:
# Redis (AOF on), three gateway nodes, nginx in front of them with
# deploy/nginx/nginx.conf and Prometheus with deploy/prometheus/prometheus.yml.
# Both files are the ones compose mounts; they are rendered (node addresses,
# loopback listen address, writable temp/pid paths), never forked.
#
#   deploy/local-cluster.sh up        start everything (refused if already up)
#   deploy/local-cluster.sh status    what runs, and whether it answers
#   deploy/local-cluster.sh down      stop everything (`down -v` also deletes data)
#   deploy/local-cluster.sh topology  services, host ports and node settings
#
# Host ports are the ones compose publishes: the balancer on 127.0.0.1:8080,
# Prometheus on 127.0.0.1:9090. Redis, which compose keeps on its own network,
# listens on 127.0.0.1:6379 so that a plain `redis-cli PUBLISH news hello`
# reaches the cluster. Grafana has no Debian package: it is the one compose
# service not started here.
#
# Settings (environment):
#   GATEWAY_BIN               gateway binary (default: target/release/gateway,
#                             built with `cargo build --release -p gateway`)
#   LOCAL_CLUSTER_DIR         state: pid files, logs, data (default: .local-cluster)
#   LOCAL_CLUSTER_REDIS_PORT  Redis port (default 6379)
#
# Also used by gateway/tests/nginx_cluster.rs, with every address in the
# environment (see render_nginx / render_prometheus):
#   deploy/local-cluster.sh render-nginx        the nginx config, on stdout
#   deploy/local-cluster.sh render-prometheus   the Prometheus config, on stdout
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Debian puts nginx in /usr/sbin, which is not on a non-root user's PATH.
PATH="$PATH:/usr/sbin:/usr/local/sbin"
NGINX_CONF="deploy/nginx/nginx.conf"
PROMETHEUS_CONF="deploy/prometheus/prometheus.yml"
STATE="${LOCAL_CLUSTER_DIR:-$ROOT/.local-cluster}"
HOST=127.0.0.1

# The compose services, in start order. docker-compose.yml is the reference;
# gateway/tests/nginx_cluster.rs checks that `topology` matches it.
NODES=(gateway-1 gateway-2 gateway-3)
REDIS_PORT="${LOCAL_CLUSTER_REDIS_PORT:-6379}"
LB_PORT=8080         # compose: lb "8080:8080"
PROMETHEUS_PORT=9090 # compose: prometheus "9090:9090"
GRAFANA_PORT=3000    # compose: grafana "3000:3000" (not started here)
# Compose's redis command: ["redis-server", "--appendonly", "yes", "--appendfsync", "everysec"]
REDIS_ARGS=(--appendonly yes --appendfsync everysec)
# Compose's prometheus command, less the paths (config, storage) set below.
PROMETHEUS_ARGS=(--storage.tsdb.retention.time=7d --web.enable-lifecycle)
# Compose's ulimits for the nodes.
NOFILE=65536

node_public() { echo "$HOST:$((8080 + $1))"; } # gateway-1 -> 8081, ...
node_admin() { echo "$HOST:$((9090 + $1))"; }  # gateway-1 -> 9091, ...

# The environment of every node: compose's x-gateway environment, with the
# Redis address on loopback, plus each node's own listen addresses.
node_env() {
  echo "GATEWAY_REDIS_URL=redis://$HOST:$REDIS_PORT"
  echo "GATEWAY_SHUTDOWN_GRACE_SECS=30"
  echo "GATEWAY_LOG_FORMAT=json"
  echo "RUST_LOG=info"
}

die() {
  echo "local-cluster: $*" >&2
  exit 1
}

# --------------------------------------------------------------------------
# Rendering. Each substitution must match exactly as often as expected, so a
# change to the config that the rendering no longer fits fails loudly instead
# of leaving a compose hostname (or a root-only path) in the local config.
# --------------------------------------------------------------------------

# deploy/nginx/nginx.conf with:
#   NGINX_UPSTREAMS  space-separated node addresses: the Nth for `server gateway-N:8080`
#   NGINX_LISTEN     replaces `listen 8080;` (the `[::]` listener is dropped)
#   NGINX_DIR        pid file, error log and temp paths (Debian's defaults are
#                    under /var and /run, root's)
#   NGINX_READ_TIMEOUT  optional: replaces proxy_read_timeout (tests: seconds)
render_nginx() {
  : "${NGINX_UPSTREAMS:?}" "${NGINX_LISTEN:?}" "${NGINX_DIR:?}"
  local user=""
  if [ "$(id -u)" = 0 ]; then
    # As root, nginx would switch its workers to `nobody`; keep the caller's user.
    user="user $(id -un) $(id -gn);"
  fi
  {
    echo "# Rendered by deploy/local-cluster.sh from $NGINX_CONF; edit that file."
    echo "pid $NGINX_DIR/nginx.pid;"
    echo "error_log $NGINX_DIR/nginx-error.log warn;"
    [ -n "$user" ] && echo "$user"
    awk -v upstreams="$NGINX_UPSTREAMS" -v listen="$NGINX_LISTEN" -v dir="$NGINX_DIR" \
      -v timeout="${NGINX_READ_TIMEOUT:-}" '
      BEGIN { n = split(upstreams, up, " ") }
      /^[[:space:]]*server[[:space:]]+gateway-[0-9]+:8080[[:space:];]/ {
        match($0, /gateway-[0-9]+:8080/)
        node = substr($0, RSTART + 8, RLENGTH - 13) + 0
        if (node < 1 || node > n) { print "render-nginx: gateway-" node " has no address" > "/dev/stderr"; exit 1 }
        seen[node]++
        sub(/gateway-[0-9]+:8080/, up[node])
      }
      /^[[:space:]]*listen[[:space:]]+8080;/ { sub(/listen[[:space:]]+8080;/, "listen " listen ";"); v4++ }
      /^[[:space:]]*listen[[:space:]]+\[::\]:8080;/ {
        sub(/listen.*/, "# listen [::]:8080; (local cluster: loopback only)"); v6++
      }
      /^[[:space:]]*proxy_read_timeout[[:space:]]/ && timeout != "" {
        sub(/proxy_read_timeout[[:space:]]+[^;]+;/, "proxy_read_timeout " timeout ";"); rt++
      }
      { print }
      /^http[[:space:]]*\{/ {
        http++
        print "    # Local cluster: writable temp paths."
        print "    client_body_temp_path " dir "/client_body;"
        print "    proxy_temp_path " dir "/proxy;"
        print "    fastcgi_temp_path " dir "/fastcgi;"
        print "    uwsgi_temp_path " dir "/uwsgi;"
        print "    scgi_temp_path " dir "/scgi;"
      }
      END {
        bad = ""
        for (i = 1; i <= n; i++) if (!seen[i]) bad = bad " gateway-" i " is not an upstream server;"
        if (v4 != 1) bad = bad " `listen 8080;` lines: " v4 + 0 ";"
        if (v6 != 1) bad = bad " `listen [::]:8080;` lines: " v6 + 0 ";"
        if (http != 1) bad = bad " `http {` lines: " http + 0 ";"
        if (timeout != "" && rt != 1) bad = bad " proxy_read_timeout lines: " rt + 0 ";"
        if (bad != "") { print "render-nginx: the config no longer fits:" bad > "/dev/stderr"; exit 1 }
      }' "$ROOT/$NGINX_CONF"
  }
}

# deploy/prometheus/prometheus.yml with:
#   PROMETHEUS_TARGETS  space-separated admin addresses: the Nth for `gateway-N:9091`
render_prometheus() {
  : "${PROMETHEUS_TARGETS:?}"
  echo "# Rendered by deploy/local-cluster.sh from $PROMETHEUS_CONF; edit that file."
  awk -v targets="$PROMETHEUS_TARGETS" '
    BEGIN { n = split(targets, t, " ") }
    /^[[:space:]]*#/ { print; next }
    /gateway-[0-9]+:9091/ {
      match($0, /gateway-[0-9]+:9091/)
      node = substr($0, RSTART + 8, RLENGTH - 13) + 0
      if (node < 1 || node > n) { print "render-prometheus: gateway-" node " has no address" > "/dev/stderr"; exit 1 }
      seen[node]++
      sub(/gateway-[0-9]+:9091/, t[node])
    }
    { print }
    END {
      for (i = 1; i <= n; i++) if (!seen[i]) bad = bad " gateway-" i ":9091 is not scraped;"
      if (bad != "") { print "render-prometheus: the config no longer fits:" bad > "/dev/stderr"; exit 1 }
    }' "$ROOT/$PROMETHEUS_CONF"
}

# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------

pidfile() { echo "$STATE/$1.pid"; }

# Is process $1 alive? A zombie is not: the services outlive `up`, so once
# stopped they wait for the system's reaper, not for us.
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  local stat
  stat="$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null || echo '?')"
  [ "${stat%% *}" != Z ]
}

# The pid of a running service, or nothing.
running_pid() {
  local f pid
  f="$(pidfile "$1")"
  [ -s "$f" ] || return 0
  pid="$(cat "$f")"
  if alive "$pid"; then echo "$pid"; fi
}

# Is something accepting connections on HOST:port?
port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# HTTP status of a URL, 000 when nothing answers.
http_status() { curl -s -o /dev/null -m 2 -w '%{http_code}' "$1" || true; }

# Waits up to $2 seconds for `$3...` to succeed, while service $1 runs.
wait_for() {
  local name="$1" secs="$2"
  shift 2
  local deadline=$((SECONDS + secs))
  until "$@"; do
    # (nginx writes its pid file itself, a moment after it daemonizes.)
    if [ -s "$(pidfile "$name")" ] && [ -z "$(running_pid "$name")" ]; then
      echo "local-cluster: $name exited; the end of $STATE/$name.log:" >&2
      tail -n 15 "$STATE/$name.log" >&2 || true
      return 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "local-cluster: $name not ready after ${secs}s (log: $STATE/$name.log)" >&2
      return 1
    fi
    sleep 0.2
  done
}

# Starts `$2...` in its own session, logging to STATE/$1.log; records its pid.
spawn() {
  local name="$1"
  shift
  echo "--- $(date -u +%FT%TZ) local-cluster.sh starts: $*" >>"$STATE/$name.log"
  setsid "$@" </dev/null >>"$STATE/$name.log" 2>&1 &
  echo $! >"$(pidfile "$name")"
}

# Stops one service: SIGTERM, then SIGKILL after $2 seconds.
stop() {
  local name="$1" grace="$2" pid
  pid="$(running_pid "$name")"
  rm -f "$(pidfile "$name")"
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + grace))
  while alive "$pid"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "  $name (pid $pid) did not stop within ${grace}s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1
  done
  echo "  stopped $name (pid $pid)"
}

SERVICES=(redis "${NODES[@]}" lb prometheus)

check_tools() {
  local missing=() packages=() tool
  for tool in redis-server redis-cli nginx prometheus curl; do
    command -v "$tool" >/dev/null 2>&1 && continue
    missing+=("$tool")
    case "$tool" in
      redis-server) packages+=(redis-server) ;;
      redis-cli) packages+=(redis-tools) ;;
      *) packages+=("$tool") ;;
    esac
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo "
    # Sorted and unique: redis-server brings redis-tools along.
    local apt
    apt="$(printf '%s\n' "${packages[@]}" | sort -u | tr '\n' ' ')"
    echo "local-cluster: missing on PATH: ${missing[*]}" >&2
    echo "  Debian packages: ${apt% }" >&2
    echo "  install them with: ${sudo}apt-get install -y ${apt% }" >&2
    echo "  (nothing is installed by this script)" >&2
    exit 1
  fi
}

gateway_bin() {
  if [ -n "${GATEWAY_BIN:-}" ]; then
    [ -x "$GATEWAY_BIN" ] || die "GATEWAY_BIN=$GATEWAY_BIN is not an executable file"
    echo "$GATEWAY_BIN"
    return
  fi
  local bin="$ROOT/target/release/gateway"
  if [ ! -x "$bin" ]; then
    echo "building $bin (cargo build --release -p gateway) ..." >&2
    (cd "$ROOT" && cargo build --release -p gateway >&2)
  fi
  echo "$bin"
}

up() {
  check_tools
  local running=() svc pid
  for svc in "${SERVICES[@]}"; do
    pid="$(running_pid "$svc")"
    [ -z "$pid" ] || running+=("$svc (pid $pid)")
  done
  if [ "${#running[@]}" -gt 0 ]; then
    die "already up: ${running[*]}; run \`deploy/local-cluster.sh down\` first"
  fi
  local ports=("$REDIS_PORT" "$LB_PORT" "$PROMETHEUS_PORT") i p
  for i in 1 2 3; do
    p="$(node_public "$i")"
    ports+=("${p##*:}")
    p="$(node_admin "$i")"
    ports+=("${p##*:}")
  done
  for p in "${ports[@]}"; do
    if port_open "$p"; then
      local hint=""
      case "$p" in
        "$REDIS_PORT") hint=" (a system redis-server? stop it, or set LOCAL_CLUSTER_REDIS_PORT and use redis-cli -p)" ;;
        "$PROMETHEUS_PORT") hint=" (a system prometheus? \`systemctl stop prometheus\`)" ;;
        "$LB_PORT") hint=" (\`docker compose up\` running?)" ;;
      esac
      die "$HOST:$p is already in use$hint"
    fi
  done
  local bin
  bin="$(gateway_bin)"
  mkdir -p "$STATE/redis" "$STATE/nginx" "$STATE/prometheus"
  rm -f "$STATE"/*.pid

  # From here on, a failure stops whatever was started.
  trap 'echo "local-cluster: up failed; stopping what was started (logs in $STATE)" >&2; down_all >&2' ERR

  NGINX_UPSTREAMS="$(for i in 1 2 3; do node_public "$i"; done | tr '\n' ' ')" \
    NGINX_LISTEN="$HOST:$LB_PORT" NGINX_DIR="$STATE/nginx" render_nginx >"$STATE/nginx/nginx.conf"
  PROMETHEUS_TARGETS="$(for i in 1 2 3; do node_admin "$i"; done | tr '\n' ' ')" \
    render_prometheus >"$STATE/prometheus/prometheus.yml"
  nginx -t -q -p "$STATE/nginx" -c "$STATE/nginx/nginx.conf" -e "$STATE/nginx/nginx-error.log"
  if command -v promtool >/dev/null 2>&1; then
    promtool check config "$STATE/prometheus/prometheus.yml" >/dev/null
  fi

  echo "redis      $HOST:$REDIS_PORT (AOF in $STATE/redis)"
  spawn redis redis-server --port "$REDIS_PORT" --bind "$HOST" --dir "$STATE/redis" "${REDIS_ARGS[@]}"
  wait_for redis 15 eval '[ "$(redis-cli -h $HOST -p $REDIS_PORT PING 2>/dev/null)" = PONG ]'

  local hard
  hard="$(ulimit -Hn)"
  if [ "$hard" = unlimited ] || [ "$hard" -ge "$NOFILE" ]; then ulimit -n "$NOFILE"; else ulimit -n "$hard"; fi
  # Like a compose container, a node sees only the settings above, none that
  # happen to be exported in this shell.
  local envs=() var
  for var in $(compgen -e); do
    case "$var" in GATEWAY_* | RUST_LOG) envs+=(-u "$var") ;; esac
  done
  mapfile -t -O "${#envs[@]}" envs < <(node_env)
  for i in 1 2 3; do
    echo "gateway-$i  $(node_public "$i") (admin $(node_admin "$i"))"
    spawn "gateway-$i" env "${envs[@]}" GATEWAY_LISTEN="$(node_public "$i")" \
      GATEWAY_ADMIN_LISTEN="$(node_admin "$i")" "$bin"
  done
  for i in 1 2 3; do
    wait_for "gateway-$i" 30 eval "[ \"\$(http_status http://$(node_admin "$i")/readyz)\" = 200 ]"
  done

  echo "lb (nginx) $HOST:$LB_PORT -> gateway-1..3"
  nginx -p "$STATE/nginx" -c "$STATE/nginx/nginx.conf" -e "$STATE/nginx/nginx-error.log"
  # nginx daemonizes and writes its master's pid itself.
  ln -sf nginx/nginx.pid "$(pidfile lb)"
  ln -sf nginx/nginx-error.log "$STATE/lb.log"
  wait_for lb 15 eval "[ \"\$(http_status http://$HOST:$LB_PORT/)\" = 200 ]"

  echo "prometheus $HOST:$PROMETHEUS_PORT"
  spawn prometheus prometheus --config.file="$STATE/prometheus/prometheus.yml" \
    --storage.tsdb.path="$STATE/prometheus/data" --web.listen-address="$HOST:$PROMETHEUS_PORT" \
    "${PROMETHEUS_ARGS[@]}"
  wait_for prometheus 30 \
    eval "[ \"\$(http_status http://$HOST:$PROMETHEUS_PORT/-/ready)\" = 200 ]"
  trap - ERR

  local lb="http://$HOST:$LB_PORT"
  echo
  echo "Up (state, logs and data in $STATE). Grafana is not started: no Debian package."
  echo
  printf '  %-58s # %s\n' \
    "curl -N '$lb/sse?channel=news'" "watch, through the balancer" \
    "redis-cli PUBLISH news hello" "raw publish, reaches every node" \
    "curl -X POST --data hi $lb/publish/news" "publish with history" \
    "xdg-open $lb/" "the demo page" \
    "xdg-open http://$HOST:$PROMETHEUS_PORT/targets" "Prometheus, scraping the nodes"
  echo
  echo "Stop with: make cluster-down (deploy/local-cluster.sh down)"
}

# Stops everything; the balancer first (it holds the clients), the nodes before Redis.
down_all() {
  stop lb 10
  stop prometheus 10
  local i
  for i in 3 2 1; do
    # A node drains its clients first (compose gives it 35 s).
    stop "gateway-$i" 35
  done
  stop redis 10
}

down() {
  local wipe="${1:-}"
  mkdir -p "$STATE"
  down_all
  if [ "$wipe" = "-v" ] || [ "$wipe" = "--volumes" ]; then
    rm -rf "$STATE"
    echo "removed $STATE"
  fi
}

status() {
  local svc pid up=0 detail
  for svc in "${SERVICES[@]}"; do
    pid="$(running_pid "$svc")"
    if [ -z "$pid" ]; then
      printf '%-11s stopped\n' "$svc"
      continue
    fi
    up=$((up + 1))
    case "$svc" in
      redis) detail="$HOST:$REDIS_PORT PING: $(redis-cli -h $HOST -p "$REDIS_PORT" PING 2>&1 || true)" ;;
      gateway-*)
        local i="${svc#gateway-}"
        detail="$(node_public "$i"), /readyz: $(http_status "http://$(node_admin "$i")/readyz")"
        ;;
      lb) detail="$HOST:$LB_PORT, GET /: $(http_status "http://$HOST:$LB_PORT/")" ;;
      prometheus)
        local targets
        targets="$(curl -s -m 2 "http://$HOST:$PROMETHEUS_PORT/api/v1/targets?state=active" || true)"
        detail="$HOST:$PROMETHEUS_PORT, targets up: $(grep -o '"health":"up"' <<<"$targets" | wc -l || true)"
        ;;
    esac
    printf '%-11s running (pid %s) %s\n' "$svc" "$pid" "$detail"
  done
  printf '%-11s not started (no Debian package; compose: :%s)\n' grafana "$GRAFANA_PORT"
  [ "$up" -eq "${#SERVICES[@]}" ] || return 3
}

# One line per fact; gateway/tests/nginx_cluster.rs compares it with docker-compose.yml.
topology() {
  local i
  echo "service redis $HOST:$REDIS_PORT"
  for i in 1 2 3; do echo "service gateway-$i $(node_public "$i") admin $(node_admin "$i")"; done
  echo "service lb $HOST:$LB_PORT config $NGINX_CONF"
  echo "service prometheus $HOST:$PROMETHEUS_PORT config $PROMETHEUS_CONF"
  echo "skipped grafana $GRAFANA_PORT no Debian package"
  echo "redis-args ${REDIS_ARGS[*]}"
  echo "nofile $NOFILE"
  node_env | sed 's/^/env /'
}

case "${1:-}" in
  up) up ;;
  down) down "${2:-}" ;;
  status) status ;;
  topology) topology ;;
  render-nginx) render_nginx ;;
  render-prometheus) render_prometheus ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
