#!/usr/bin/env python3
"""Check the Grafana dashboard against real gateways and a real Prometheus.

Starts a redis-server, two gateway nodes on it and Debian's `prometheus` (all on
free loopback ports, in a temporary directory), drives traffic through the nodes
(SSE, WebSocket and long-poll subscribers, HTTP publishes, bad requests, history
resumes, a Redis restart), waits for Prometheus to scrape both nodes twice, then:

  * runs every `expr` in deploy/grafana/dashboards/gateway.json (and the
    `label_values` query of each template variable) through /api/v1/query and
    fails on any query that errors or returns no data;
  * fails on any gateway_* metric name the dashboard uses that the nodes do not
    export (so `... or vector(0)` cannot hide a typo);
  * runs `promtool check metrics` on each node's /metrics and fails on any
    complaint, and `promtool check config` on both Prometheus configs.

Exit status: 0 all good, 1 a check failed, 2 the setup failed (missing tool,
build error, a process that would not start). Every process it starts is
stopped on the way out.

Usage (from anywhere; needs redis-server, prometheus and promtool on PATH —
`apt-get install -y redis-server prometheus` on Debian):

    python3 deploy/check_dashboard.py            # builds target/debug/gateway first
    python3 deploy/check_dashboard.py --no-build --gateway target/release/gateway
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy/grafana/dashboards/gateway.json"
PROM_TEMPLATE = ROOT / "deploy/prometheus/prometheus.local.yml"
PROM_COMPOSE = ROOT / "deploy/prometheus/prometheus.yml"
SCRAPE_INTERVAL = 1  # seconds
HOST = "127.0.0.1"

# Grafana variables and what they become here. `$instance` = all nodes.
GRAFANA_VARS = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "5m",
    "instance": ".*",
    "datasource": "prometheus",
}


class SetupError(Exception):
    """The environment, not the dashboard, is at fault (exit 2)."""


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all held at once while choosing)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Processes:
    """Every process this script starts, stopped in reverse order."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        logfile = open(self.logdir / f"{name}.log", "ab")
        p = subprocess.Popen(argv, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        logfile.close()
        self.procs.append((name, p))
        return p

    def stop(self, p: subprocess.Popen, timeout: float = 10.0) -> None:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def stop_all(self) -> None:
        for _, p in reversed(self.procs):
            try:
                self.stop(p)
            except Exception as e:  # keep stopping the others
                log(f"warning: could not stop pid {p.pid}: {e}")

    def tail(self, name: str, lines: int = 20) -> str:
        path = self.logdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_until(what: str, cond, timeout: float = 15.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    last_err = None
    while time.monotonic() < deadline:
        try:
            v = cond()
            if v:
                return v
        except Exception as e:  # not up yet
            last_err = e
        time.sleep(interval)
    raise SetupError(f"timed out waiting for {what}" + (f" (last error: {last_err})" if last_err else ""))


# --------------------------------------------------------------------------
# HTTP helpers
# --------------------------------------------------------------------------


def request(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 5.0):
    """(status, body bytes); HTTP errors are answers, not exceptions."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def status_of(url: str) -> int:
    try:
        return request("GET", url, timeout=2)[0]
    except OSError:
        return 0


class Node:
    def __init__(self, name: str, public: int, admin: int):
        self.name, self.public, self.admin = name, public, admin
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.public}"

    @property
    def admin_url(self) -> str:
        return f"http://{HOST}:{self.admin}"

    @property
    def target(self) -> str:
        return f"{HOST}:{self.admin}"


# --------------------------------------------------------------------------
# Subscribers (each runs in a thread until closed)
# --------------------------------------------------------------------------


class SseClient(threading.Thread):
    """GET /sse, counting `data:` lines and remembering ids and events."""

    def __init__(self, node: Node, channel: str, query: str = ""):
        super().__init__(daemon=True)
        self.node, self.channel, self.query = node, channel, query
        self.data: list[str] = []  # payloads of messages (events other than reset/disconnect)
        self.ids: list[str] = []
        self.events: list[str] = []  # named events, in order
        self._event = ""
        self._lines: list[str] = []
        self.ready = threading.Event()
        self.conn: http.client.HTTPConnection | None = None
        self.closed = False

    def run(self) -> None:
        try:
            self.conn = http.client.HTTPConnection(HOST, self.node.public, timeout=30)
            path = f"/sse?channel={urllib.parse.quote(self.channel)}{self.query}"
            self.conn.request("GET", path, headers={"Accept": "text/event-stream"})
            resp = self.conn.getresponse()
            if resp.status != 200:
                return
            while not self.closed:
                line = resp.readline()
                if not line:
                    return
                text = line.decode("utf-8", "replace").rstrip("\r\n")
                if text.startswith(":"):
                    self.ready.set()  # the first comment follows the subscription
                elif text.startswith("data:"):
                    self._lines.append(text[5:].removeprefix(" "))
                elif text.startswith("id:"):
                    self.ids.append(text[3:].strip())
                elif text.startswith("event:"):
                    self._event = text[6:].strip()
                    self.events.append(self._event)
                elif text == "":  # end of one event
                    if self._lines and self._event not in ("reset", "disconnect"):
                        self.data.append("\n".join(self._lines))
                    self._event, self._lines = "", []
        except Exception:  # the connection was closed under us, or ended
            pass
        finally:
            self.ready.set()

    def close(self) -> None:
        self.closed = True
        if self.conn is not None and self.conn.sock is not None:
            try:
                self.conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.conn.close()


class WsClient(threading.Thread):
    """A minimal RFC 6455 client: subscribe, then count `message` frames."""

    def __init__(self, node: Node, channel: str):
        super().__init__(daemon=True)
        self.node, self.channel = node, channel
        self.messages: list[dict] = []
        self.ready = threading.Event()
        self.sock: socket.socket | None = None
        self.closed = False
        self.buf = b""

    def _send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        header = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 65536:
            header += bytes([0x80 | 126]) + n.to_bytes(2, "big")
        else:
            header += bytes([0x80 | 127]) + n.to_bytes(8, "big")
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        assert self.sock is not None
        self.sock.sendall(header + mask + masked)

    def _read(self, n: int) -> bytes:
        assert self.sock is not None
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _frame(self) -> tuple[int, bytes]:
        b0, b1 = self._read(2)
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(self._read(2), "big")
        elif n == 127:
            n = int.from_bytes(self._read(8), "big")
        mask = self._read(4) if b1 & 0x80 else None
        payload = self._read(n)
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return b0 & 0x0F, payload

    def run(self) -> None:
        try:
            self.sock = socket.create_connection((HOST, self.node.public), timeout=30)
            key = base64.b64encode(os.urandom(16)).decode()
            self.sock.sendall(
                (
                    f"GET /ws HTTP/1.1\r\nHost: {HOST}:{self.node.public}\r\nUpgrade: websocket\r\n"
                    f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                ).encode()
            )
            while b"\r\n\r\n" not in self.buf:
                chunk = self.sock.recv(4096)
                if not chunk:
                    return
                self.buf += chunk
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            if b" 101 " not in head.split(b"\r\n", 1)[0]:
                return
            self._send(0x1, json.dumps({"op": "subscribe", "channels": [self.channel]}).encode())
            while not self.closed:
                opcode, payload = self._frame()
                if opcode == 0x9:  # ping -> pong
                    self._send(0xA, payload)
                elif opcode == 0x8:
                    return
                elif opcode == 0x1:
                    frame = json.loads(payload)
                    if frame.get("type") == "subscribed":
                        self.ready.set()
                    elif frame.get("type") == "message":
                        self.messages.append(frame)
        except Exception:  # closed under us, or ended
            pass
        finally:
            self.ready.set()

    def close(self) -> None:
        self.closed = True
        if self.sock is not None:
            try:
                self._send(0x8, (1000).to_bytes(2, "big"))
            except OSError:
                pass
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()


class PollClient(threading.Thread):
    """Long-polls in a loop, passing the cursor on."""

    def __init__(self, node: Node, channel: str):
        super().__init__(daemon=True)
        self.node, self.channel = node, channel
        self.messages: list[dict] = []
        self.closed = False

    def run(self) -> None:
        cursor = ""
        while not self.closed:
            q = {"channel": self.channel, "timeout": "2"}
            if cursor:
                q["cursor"] = cursor
            try:
                status, body = request("GET", f"{self.node.url}/poll?{urllib.parse.urlencode(q)}", timeout=10)
            except (OSError, http.client.HTTPException):
                time.sleep(0.2)
                continue
            if status != 200:
                time.sleep(0.2)
                continue
            doc = json.loads(body)
            self.messages.extend(doc.get("messages", []))
            cursor = doc.get("cursor", cursor)

    def close(self) -> None:
        self.closed = True


def sse_once(node: Node, channel: str, last_event_id: str, seconds: float = 2.0) -> SseClient:
    """A short SSE connection that resumes from last_event_id."""
    c = SseClient(node, channel, f"&last_event_id={urllib.parse.quote(last_event_id)}")
    c.start()
    c.ready.wait(5)
    time.sleep(seconds)
    c.close()
    c.join(5)
    return c


def redis_publish(port: int, channel: str, payload: str) -> None:
    """A raw PUBLISH over RESP (no redis-cli needed)."""
    args = [b"PUBLISH", channel.encode(), payload.encode()]
    cmd = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.sendall(cmd)
        s.recv(64)


# --------------------------------------------------------------------------
# Prometheus helpers
# --------------------------------------------------------------------------


def prom_get(port: int, path: str, params: dict | None = None) -> dict:
    url = f"http://{HOST}:{port}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    status, body = request("GET", url, timeout=10)
    try:
        doc = json.loads(body)
    except ValueError:
        doc = {"status": "error", "error": f"HTTP {status}: {body[:200]!r}"}
    return doc


def parse_ts(s: str) -> float:
    """RFC 3339 with up to nanoseconds -> epoch seconds."""
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", s)
    if not m:
        return 0.0
    from datetime import datetime

    base = datetime.fromisoformat(m.group(1) + (m.group(3).replace("Z", "+00:00")))
    frac = float("0." + m.group(2)) if m.group(2) else 0.0
    return base.timestamp() + frac


def wait_for_scrapes(prom_port: int, after: float, count: int = 2, timeout: float = 30.0) -> None:
    """Until every gateway target has been scraped `count` times since `after`."""
    seen: dict[str, set[str]] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = prom_get(prom_port, "/api/v1/targets", {"state": "active"})
        targets = [t for t in doc.get("data", {}).get("activeTargets", []) if t["labels"].get("job") == "gateway"]
        for t in targets:
            if t.get("health") == "up" and parse_ts(t.get("lastScrape", "")) > after:
                seen.setdefault(t["scrapeUrl"], set()).add(t["lastScrape"])
        if targets and all(len(seen.get(t["scrapeUrl"], ())) >= count for t in targets):
            return
        time.sleep(SCRAPE_INTERVAL / 4)
    raise SetupError(f"Prometheus did not scrape the gateways {count} times within {timeout:.0f}s: {seen}")


def substitute(expr: str) -> str:
    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in GRAFANA_VARS:
            raise ValueError(f"unknown Grafana variable ${name}")
        return GRAFANA_VARS[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", repl, expr)


def dashboard_queries(dash: dict) -> list[tuple[str, str]]:
    """(where, expr) for every panel target (rows' nested panels too) and every
    template variable's label_values() query, rewritten as PromQL."""
    out: list[tuple[str, str]] = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((f'panel "{p.get("title")}" ({t.get("refId")})', t["expr"]))
            walk(p.get("panels", []))

    walk(dash.get("panels", []))
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\s*\)\s*", q or "")
        if m:
            out.append((f"variable ${v['name']}", f"count by ({m.group(2)}) ({m.group(1)})"))
        elif q:
            out.append((f"variable ${v['name']}", q))
    for a in dash.get("annotations", {}).get("list", []):
        if a.get("expr"):
            out.append((f'annotation "{a.get("name")}"', a["expr"]))
    return out


# --------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------


def require_tools() -> None:
    missing = [t for t in ("redis-server", "prometheus", "promtool") if shutil.which(t) is None]
    if missing:
        raise SetupError(
            f"missing on PATH: {', '.join(missing)} "
            "(Debian: apt-get install -y redis-server prometheus; promtool comes with prometheus)"
        )


def build_gateway(args) -> Path:
    gw = Path(args.gateway)
    if not gw.is_absolute():
        gw = ROOT / gw
    if not args.no_build:
        log("building: cargo build -p gateway")
        r = subprocess.run(["cargo", "build", "-q", "-p", "gateway"], cwd=ROOT)
        if r.returncode != 0:
            raise SetupError("cargo build -p gateway failed")
    if not gw.exists():
        raise SetupError(f"{gw} not found (build it, or pass --gateway)")
    return gw


def start_redis(procs: Processes, port: int) -> subprocess.Popen:
    p = procs.start(
        f"redis-{port}",
        ["redis-server", "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"],
    )

    def pong():
        with socket.create_connection((HOST, port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    wait_until(f"redis-server on port {port}", pong)
    return p


def start_gateway(procs: Processes, gw: Path, node: Node, redis_port: int) -> None:
    node.proc = procs.start(
        node.name,
        [
            str(gw),
            "serve",
            "--listen", f"{HOST}:{node.public}",
            "--admin-listen", f"{HOST}:{node.admin}",
            "--redis-url", f"redis://{HOST}:{redis_port}",
            "--shutdown-grace-secs", "2", "--drain-window-secs", "1",
            "--sse-heartbeat-secs", "1",
        ],
    )
    try:
        wait_until(f"{node.name} /readyz", lambda: status_of(node.admin_url + "/readyz") == 200)
    except SetupError:
        log(procs.tail(node.name))
        raise


def start_prometheus(procs: Processes, tmp: Path, port: int, nodes: list[Node]) -> Path:
    template = PROM_TEMPLATE.read_text()
    targets = "[" + ", ".join(f'"{n.target}"' for n in nodes) + "]"
    config = template.replace("@SCRAPE_INTERVAL@", f"{SCRAPE_INTERVAL}s").replace("@GATEWAY_TARGETS@", targets)
    path = tmp / "prometheus.yml"
    path.write_text(config)
    procs.start(
        "prometheus",
        [
            "prometheus",
            f"--config.file={path}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address={HOST}:{port}",
            "--log.level=warn",
        ],
    )
    try:
        wait_until("prometheus /-/ready", lambda: status_of(f"http://{HOST}:{port}/-/ready") == 200, timeout=30)
    except SetupError:
        log(procs.tail("prometheus"))
        raise
    return path


def drive_traffic(procs: Processes, nodes: list[Node], redis_port: int, channel: str) -> dict:
    """Subscribers on both nodes, publishes of every kind, bad requests, resumes
    and a Redis restart. Returns the open clients (closed by the caller)."""
    a, b = nodes
    clients = {
        "sse@a": SseClient(a, channel),
        "sse-json@b": SseClient(b, channel, "&format=json"),
        "ws@b": WsClient(b, channel),
        "poll@a": PollClient(a, channel),
    }
    for c in clients.values():
        c.start()
    for name, c in clients.items():
        if hasattr(c, "ready") and not c.ready.wait(5):
            raise SetupError(f"{name} did not subscribe")
    time.sleep(0.3)  # let the poll client's first request reach its node

    sent: list[str] = []  # payloads that should reach every subscriber
    for i in range(10):
        node = nodes[i % 2]
        if i % 2 == 0:
            s, body = request("POST", f"{node.url}/publish/{channel}?event=tick", f"raw {i}".encode())
        else:
            doc = {"channel": channel, "data": f"json {i}"}
            s, body = request("POST", f"{node.url}/api/publish", json.dumps(doc).encode(), {"content-type": "application/json"})
        if s != 200:
            raise SetupError(f"publish {i} to {node.name}: HTTP {s} {body[:200]!r}")
        sent.append(f"raw {i}" if i % 2 == 0 else f"json {i}")
    # Idempotent publish twice -> ok + duplicate.
    for _ in range(2):
        request("POST", f"{a.url}/publish/{channel}", b"once", {"Idempotency-Key": f"k-{channel}"})
    sent.append("once")
    # A raw PUBLISH straight into Redis (no id, live only).
    redis_publish(redis_port, channel, "raw from redis")
    sent.append("raw from redis")
    # Bad input -> rejected requests (several reasons).
    request("POST", f"{a.url}/publish/bad%20channel", b"x")
    request("POST", f"{b.url}/api/publish", b"{not json", {"content-type": "application/json"})
    request("GET", f"{a.url}/no-such-page")
    request("POST", f"{b.url}/publish/{channel}", b"x" * 70000)
    time.sleep(0.5)

    # History resumes: from a known id (replayed) and from one long gone (reset).
    ids = clients["sse@a"].ids
    if not ids:
        raise SetupError("the SSE subscriber received no ids: history publishing is not working")
    replay = sse_once(a, channel, ids[0], 1.0)
    reset = sse_once(b, channel, "1-0", 1.0)
    log(f"  resume from {ids[0]}: {len(replay.data)} messages replayed; resume from 1-0: events {reset.events}")

    # Redis outage: both nodes notice, fail readiness, publishes fail (503),
    # then reconnect when Redis is back.
    redis_proc = next(p for n, p in procs.procs if n == f"redis-{redis_port}")
    procs.stop(redis_proc)
    for n in nodes:
        wait_until(f"{n.name} /readyz 503 after Redis stopped", lambda n=n: status_of(n.admin_url + "/readyz") == 503)
    s, _ = request("POST", f"{a.url}/publish/{channel}", b"during outage")
    log(f"  publish during the Redis outage: HTTP {s}")
    time.sleep(1.5)  # so the outage lasts over a second (the counter adds whole seconds)
    start_redis(procs, redis_port)
    for n in nodes:
        wait_until(f"{n.name} /readyz 200 after Redis restart", lambda n=n: status_of(n.admin_url + "/readyz") == 200, timeout=30)

    # A few more after the recovery, so every rate() window sees fresh traffic.
    for i in range(4):
        s, _ = request("POST", f"{nodes[i % 2].url}/publish/{channel}", f"after {i}".encode())
        if s == 200:
            sent.append(f"after {i}")
    time.sleep(0.5)
    log(
        "  received: "
        + ", ".join(
            f"{k} {len(getattr(c, 'data', None) or getattr(c, 'messages', []))}" for k, c in clients.items()
        )
        + f" (of {len(sent)} published)"
    )
    for k, c in clients.items():
        got = [m.get("data") for m in c.messages] if hasattr(c, "messages") else c.data
        if k.startswith("sse-json"):
            got = [json.loads(d).get("data") for d in got]
        if not got:
            raise SetupError(f"subscriber {k} received nothing")
        dups = sorted({d for d in got if got.count(d) > 1})
        if dups:
            log(f"  note: {k} received some payloads more than once: {dups}")
        missing = [d for d in sent if d not in got]
        extra = [d for d in got if d not in sent]
        if missing or extra:
            if hasattr(c, "messages"):  # show the whole objects
                extra = [m for m in c.messages if m.get("data") not in sent]
            log(f"  note: {k} missed {missing}, got unexpected {extra}")
    return clients


def run_queries(prom_port: int, dash: dict) -> tuple[list[str], set[str]]:
    failures: list[str] = []
    used: set[str] = set()
    for where, expr in dashboard_queries(dash):
        used.update(re.findall(r"\b(gateway_[a-z0-9_]+)\b", expr))
        try:
            promql = substitute(expr)
        except ValueError as e:
            failures.append(f"{where}: {e}\n      {expr}")
            log(f"  FAIL  {where}: {e}")
            continue
        doc = prom_get(prom_port, "/api/v1/query", {"query": promql})
        if doc.get("status") != "success":
            failures.append(f"{where}: error {doc.get('errorType')}: {doc.get('error')}\n      {promql}")
            log(f"  FAIL  {where}: {doc.get('error')}")
            continue
        result = doc["data"]["result"]
        if doc["data"]["resultType"] == "scalar":
            result = [{"metric": {}, "value": result}]
        if not result:
            failures.append(f"{where}: no data\n      {promql}")
            log(f"  FAIL  {where}: no data")
            continue
        values = ", ".join(
            f"{fmt_labels(r['metric'])}{float(r['value'][1]):.4g}" for r in result[:4]
        ) + (f", ... ({len(result)} series)" if len(result) > 4 else "")
        warn = f"  [warnings: {doc['warnings']}]" if doc.get("warnings") else ""
        if all(r["value"][1] in ("0", "NaN") for r in result):
            warn += "  [all zero]"
        log(f"  ok    {where}: {values}{warn}")
    return failures, used


def fmt_labels(m: dict) -> str:
    return ("{" + ",".join(f"{k}={v}" for k, v in sorted(m.items())) + "} ") if m else ""


def promtool_check_metrics(nodes: list[Node]) -> list[str]:
    failures = []
    for n in nodes:
        status, text = request("GET", n.admin_url + "/metrics")
        r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True)
        out = (r.stdout + r.stderr).decode(errors="replace").strip()
        if status != 200 or r.returncode != 0 or out:
            failures.append(f"{n.name} (/metrics HTTP {status}, promtool exit {r.returncode}):\n{out}")
            log(f"  FAIL  {n.name}: promtool exit {r.returncode}")
            for line in out.splitlines():
                log(f"        {line}")
        else:
            log(f"  ok    {n.name}: {len(text.splitlines())} lines, no complaints")
    return failures


def promtool_check_configs(generated: Path) -> list[str]:
    failures = []
    for path in (generated, PROM_COMPOSE):
        r = subprocess.run(["promtool", "check", "config", "--syntax-only", str(path)], capture_output=True)
        out = (r.stdout + r.stderr).decode(errors="replace").strip()
        name = path.name if path == generated else str(path.relative_to(ROOT))
        if r.returncode != 0:
            failures.append(f"promtool check config {name}:\n{out}")
            log(f"  FAIL  {name}:\n{out}")
        else:
            log(f"  ok    {name}")
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gateway", default="target/debug/gateway", help="gateway binary (default: %(default)s)")
    ap.add_argument("--no-build", action="store_true", help="do not run `cargo build -p gateway` first")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, config, TSDB)")
    args = ap.parse_args()
    # A SIGTERM to this script still runs the cleanup below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    dash = json.loads(DASHBOARD.read_text())
    tmp = Path(tempfile.mkdtemp(prefix="check-dashboard-"))
    procs = Processes(tmp)
    clients: dict = {}
    failures: list[str] = []
    try:
        require_tools()
        gw = build_gateway(args)
        redis_port, pa, aa, pb, ab, prom_port = free_ports(6)
        nodes = [Node("gateway-a", pa, aa), Node("gateway-b", pb, ab)]
        log(f"starting redis :{redis_port}, gateways {[n.target for n in nodes]}, prometheus :{prom_port} in {tmp}")
        start_redis(procs, redis_port)
        for n in nodes:
            start_gateway(procs, gw, n, redis_port)
        config = start_prometheus(procs, tmp, prom_port, nodes)

        # Prometheus applies new targets a few seconds after it starts: wait for
        # a first scrape so the counters' starting values are recorded.
        wait_for_scrapes(prom_port, time.time(), count=1)
        log("traffic:")
        channel = f"check-{os.getpid()}"
        clients = drive_traffic(procs, nodes, redis_port, channel)
        traffic_end = time.time()
        wait_for_scrapes(prom_port, traffic_end, count=2)
        log("prometheus scraped both nodes twice since the traffic")

        log(f"dashboard queries ({DASHBOARD.relative_to(ROOT)}):")
        query_failures, used = run_queries(prom_port, dash)
        failures += query_failures

        names = set(prom_get(prom_port, "/api/v1/label/__name__/values").get("data", []))
        exported = {n for n in names if n.startswith("gateway_")}
        for m in sorted(used - exported):
            failures.append(f"metric {m} is used by the dashboard but not exported by the gateway")
            log(f"  FAIL  unknown metric {m}")
        unused = sorted(exported - used)
        log(f"metric names: {len(used)} used by the dashboard, all exported" if not used - exported else "metric names: see failures")
        if unused:
            log(f"  exported but not on the dashboard: {', '.join(unused)}")

        log("promtool check metrics:")
        failures += promtool_check_metrics(nodes)
        log("promtool check config:")
        failures += promtool_check_configs(config)
    except SetupError as e:
        log(f"setup failed: {e}")
        return 2
    finally:
        for c in clients.values():
            c.close()
        procs.stop_all()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    if failures:
        log(f"\nFAILED: {len(failures)} problem(s):")
        for f in failures:
            log(f"  - {f}")
        return 1
    log("\nOK: every dashboard query returned data; promtool found no problems")
    return 0


if __name__ == "__main__":
    sys.exit(main())
