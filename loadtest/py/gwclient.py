"""Minimal asyncio clients for the fan-out gateway, standard library only.

Used by `loadtest/pairs.py` and `loadtest/soak.py`: a WebSocket subscriber (its own
frame codec, masked client frames, answers pings), an SSE reader (chunked transfer
decoding + event parsing), a keep-alive HTTP/1.1 connection for long-polls and
publishes, a RESP connection for raw `PUBLISH`, plus helpers to start redis-server
and a gateway on free loopback ports and to read a process's RSS, fds and metrics.
Loopback only: every helper connects to 127.0.0.0/8.
"""

import asyncio
import base64
import json
import os
import signal
import socket
import struct
import subprocess
import time
import urllib.parse
import urllib.request


class ProtocolError(Exception):
    pass


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def parse_ips(spec):
    """`127.0.0.2-127.0.0.20` or `127.0.0.2,127.0.0.3` -> list of addresses."""
    if not spec:
        return [None]
    out = []
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-")
            pa, pb = a.split("."), b.split(".")
            if pa[:3] != pb[:3]:
                raise ValueError("a source range must stay within one /24: " + part)
            out += [".".join(pa[:3] + [str(i)]) for i in range(int(pa[3]), int(pb[3]) + 1)]
        else:
            out.append(part)
    for ip in out:
        if not ip.startswith("127."):
            raise ValueError("loopback source addresses only: " + ip)
    return out


async def connect(host, port, source=None):
    if not host.startswith("127."):
        raise ValueError("loopback only: " + host)
    return await asyncio.open_connection(host, port, local_addr=(source, 0) if source else None,
                                         limit=1 << 20)


async def read_head(reader):
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise ProtocolError("bad status line: %r" % lines[0])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return int(parts[1]), headers


async def read_chunk(reader):
    """One chunk of a chunked body; b"" at the end."""
    size_line = await reader.readuntil(b"\r\n")
    size = int(size_line.split(b";")[0].strip(), 16)
    if size == 0:
        await reader.readuntil(b"\r\n")
        return b""
    data = await reader.readexactly(size + 2)
    return data[:-2]


async def read_body(reader, headers):
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    if "chunked" in headers.get("transfer-encoding", ""):
        out = bytearray()
        while True:
            c = await read_chunk(reader)
            if not c:
                return bytes(out)
            out += c
    return await reader.read()


class HttpConn:
    """A keep-alive HTTP/1.1 connection; reconnects when the server closed it."""

    def __init__(self, host, port, source=None):
        self.host, self.port, self.source = host, port, source
        self.reader = self.writer = None

    async def request(self, method, path, body=b"", headers=None):
        for attempt in (0, 1):
            if self.writer is None:
                self.reader, self.writer = await connect(self.host, self.port, self.source)
                fresh = True
            else:
                fresh = False
            h = "%s %s HTTP/1.1\r\nhost: %s:%d\r\n" % (method, path, self.host, self.port)
            for k, v in (headers or {}).items():
                h += "%s: %s\r\n" % (k, v)
            if body or method == "POST":
                h += "content-length: %d\r\n" % len(body)
            try:
                self.writer.write(h.encode() + b"\r\n" + body)
                await self.writer.drain()
                status, rh = await read_head(self.reader)
                data = await read_body(self.reader, rh)
            except (ConnectionError, asyncio.IncompleteReadError, OSError):
                self.close()
                if fresh or attempt:
                    raise
                continue  # a kept-alive connection the server had closed: once more
            if rh.get("connection", "").lower() == "close":
                self.close()
            return status, rh, data
        raise ConnectionError("unreachable")

    def close(self):
        if self.writer is not None:
            self.writer.transport.abort()
        self.reader = self.writer = None


def query(channels, **params):
    q = [("channel", c) for c in channels]
    q += [(k, str(v)) for k, v in params.items() if v is not None]
    return urllib.parse.urlencode(q)


class WsClient:
    """A WebSocket subscriber speaking the gateway's JSON protocol."""

    def __init__(self):
        self.reader = self.writer = None
        # Bytes read and not yet parsed: a read cancelled by a timeout loses nothing, so
        # the next frame is read from where the last one ended.
        self.buf = bytearray()

    async def open(self, host, port, channels=(), source=None, extra_query=None):
        self.reader, self.writer = await connect(host, port, source)
        key = base64.b64encode(os.urandom(16)).decode()
        q = query(channels, **(extra_query or {}))
        req = ("GET /ws%s HTTP/1.1\r\nhost: %s:%d\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
               "sec-websocket-key: %s\r\nsec-websocket-version: 13\r\n\r\n") % (
                   "?" + q if q else "", host, port, key)
        self.writer.write(req.encode())
        status, _ = await read_head(self.reader)
        if status != 101:
            raise ProtocolError("websocket upgrade answered %d" % status)

    def send_frame(self, opcode, payload):
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
        self.writer.write(head + mask + masked)

    async def send_json(self, obj):
        self.send_frame(1, json.dumps(obj).encode())
        await self.writer.drain()

    async def _fill(self, n):
        while len(self.buf) < n:
            data = await self.reader.read(65536)
            if not data:
                raise asyncio.IncompleteReadError(bytes(self.buf), n)
            self.buf += data

    async def recv_frame(self):
        """The next frame (opcode, payload). Cancellation-safe: nothing is consumed until
        a whole frame is buffered."""
        await self._fill(2)
        n, off = self.buf[1] & 0x7F, 2
        if n == 126:
            await self._fill(4)
            n, off = struct.unpack_from("!H", self.buf, 2)[0], 4
        elif n == 127:
            await self._fill(10)
            n, off = struct.unpack_from("!Q", self.buf, 2)[0], 10
        await self._fill(off + n)
        op, payload = self.buf[0] & 0x0F, bytes(self.buf[off:off + n])
        del self.buf[:off + n]
        return op, payload

    async def recv(self):
        """The next JSON frame; answers pings; ("close", code) on a close frame."""
        while True:
            op, payload = await self.recv_frame()
            if op == 1:
                return json.loads(payload)
            if op == 9:
                self.send_frame(10, payload)
                await self.writer.drain()
            elif op == 8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                return {"type": "close", "code": code}

    async def until(self, kind, timeout=10.0):
        """Frames up to and including the first of type `kind` (others are returned too)."""
        seen = []
        async with asyncio.timeout(timeout):
            while True:
                f = await self.recv()
                seen.append(f)
                if f.get("type") == kind:
                    return seen
                if f.get("type") == "close":
                    raise ProtocolError("closed while waiting for %s: %r" % (kind, f))

    async def close(self, timeout=2.0):
        """A clean close: close frame, wait for the server's, then EOF."""
        try:
            self.send_frame(8, struct.pack("!H", 1000))
            await self.writer.drain()
            async with asyncio.timeout(timeout):
                while True:
                    op, _ = await self.recv_frame()
                    if op == 8:
                        break
        except (Exception, asyncio.CancelledError):
            pass
        self.abort()

    def abort(self):
        if self.writer is not None:
            self.writer.transport.abort()


class SseClient:
    """An SSE reader: yields (id, event, data) for each event; comments are skipped.
    A read cancelled half-way leaves the stream mid-chunk: drop the client after it."""

    def __init__(self):
        self.reader = self.writer = None
        self.buf = b""
        self.events = []

    async def open(self, host, port, channels, source=None, **params):
        self.reader, self.writer = await connect(host, port, source)
        req = "GET /sse?%s HTTP/1.1\r\nhost: %s:%d\r\naccept: text/event-stream\r\n\r\n" % (
            query(channels, **params), host, port)
        self.writer.write(req.encode())
        status, headers = await read_head(self.reader)
        if status != 200:
            body = await read_body(self.reader, headers)
            raise ProtocolError("sse answered %d: %r" % (status, body[:200]))
        # The stream opens with `retry:` and `: ok` once every channel is subscribed.
        while b": ok\n" not in self.buf:
            chunk = await read_chunk(self.reader)
            if not chunk:
                raise ProtocolError("sse stream ended before it was confirmed")
            self.buf += chunk
        self._parse()

    def _parse(self):
        while b"\n\n" in self.buf:
            block, self.buf = self.buf.split(b"\n\n", 1)
            ev = {"id": None, "event": None, "data": []}
            for line in block.decode("utf-8", "replace").split("\n"):
                if line.startswith(":") or not line:
                    continue
                k, _, v = line.partition(":")
                v = v[1:] if v.startswith(" ") else v
                if k == "data":
                    ev["data"].append(v)
                elif k in ("id", "event"):
                    ev[k] = v
            if ev["data"] or ev["event"]:
                self.events.append((ev["id"], ev["event"], "\n".join(ev["data"])))

    async def next(self):
        while not self.events:
            chunk = await read_chunk(self.reader)
            if not chunk:
                raise ConnectionError("sse stream ended")
            self.buf += chunk
            self._parse()
        return self.events.pop(0)

    def abort(self):
        if self.writer is not None:
            self.writer.transport.abort()


class RedisConn:
    """A RESP2 connection for simple commands (PUBLISH, INFO, PUBSUB NUMSUB...)."""

    def __init__(self, port, host="127.0.0.1"):
        self.host, self.port = host, port
        self.reader = self.writer = None
        self.lock = asyncio.Lock()

    async def command(self, *args):
        async with self.lock:
            if self.writer is None:
                self.reader, self.writer = await connect(self.host, self.port)
            out = b"*%d\r\n" % len(args)
            for a in args:
                a = a if isinstance(a, bytes) else str(a).encode()
                out += b"$%d\r\n%s\r\n" % (len(a), a)
            self.writer.write(out)
            await self.writer.drain()
            return await self._reply()

    async def _reply(self):
        line = await self.reader.readuntil(b"\r\n")
        t, rest = line[:1], line[1:-2]
        if t == b"+":
            return rest.decode()
        if t == b"-":
            raise ProtocolError("redis: " + rest.decode())
        if t == b":":
            return int(rest)
        if t == b"$":
            n = int(rest)
            return None if n < 0 else (await self.reader.readexactly(n + 2))[:-2]
        if t == b"*":
            n = int(rest)
            return None if n < 0 else [await self._reply() for _ in range(n)]
        raise ProtocolError("bad RESP reply %r" % line)

    def close(self):
        if self.writer is not None:
            self.writer.transport.abort()
        self.reader = self.writer = None


# --- processes and /proc -------------------------------------------------------------

def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS for %d" % pid)


def proc_field(pid, name):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return None


def fd_census(pid, ports):
    """`pid`'s open fds from one listing: (total, {port: TCP sockets with that local or
    remote port}); listening sockets are not counted under a port."""
    inodes = set()
    total = 0
    for fd in os.listdir("/proc/%d/fd" % pid):
        total += 1
        try:
            t = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        if t.startswith("socket:["):
            inodes.add(int(t[8:-1]))
    counts = {p: 0 for p in ports}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if int(f[9]) not in inodes or f[3] == "0A":  # 0A: LISTEN
                continue
            inodes.discard(int(f[9]))  # a socket counts once
            local = int(f[1].rsplit(":", 1)[1], 16)
            remote = int(f[2].rsplit(":", 1)[1], 16)
            for p in ports:
                if local == p or remote == p:
                    counts[p] += 1
    return total, counts


def metrics(admin_port):
    """The gateway's /metrics as {name{labels}: value}."""
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % admin_port, timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        k, _, v = line.rpartition(" ")
        try:
            out[k] = float(v)
        except ValueError:
            pass
    return out


def metric_sum(m, name):
    """Sum of every series of `name` (all label sets)."""
    return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))


def _die_with_parent():
    """In the child before exec: SIGKILL it when the script dies, however it dies."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    os.setsid()


class Processes:
    """redis-server and gateway processes started here; `stop()` ends them all, and
    they are killed by the kernel if this script dies first."""

    def __init__(self, logdir):
        self.procs = []
        self.logdir = logdir
        os.makedirs(logdir, exist_ok=True)

    def start_redis(self, name="redis"):
        port = free_port()
        log = open(os.path.join(self.logdir, name + ".log"), "w")
        p = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--maxclients", "1000"],
                             stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        self.procs.append(p)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return p, port
            except OSError:
                if p.poll() is not None:
                    raise RuntimeError("redis-server exited; see " + log.name)
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def start_gateway(self, binary, redis_port=None, extra=(), env=None, name="gateway"):
        port, admin = free_port(), free_port()
        args = [binary, "--listen", "127.0.0.1:%d" % port, "--admin-listen", "127.0.0.1:%d" % admin]
        if redis_port:
            args += ["--redis-url", "redis://127.0.0.1:%d" % redis_port]
        args += list(extra)
        log = open(os.path.join(self.logdir, name + ".log"), "w")
        e = dict(os.environ)
        e.update(env or {})
        p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=e, preexec_fn=_die_with_parent)
        self.procs.append(p)
        deadline = time.time() + 20
        while time.time() < deadline:
            if p.poll() is not None:
                raise RuntimeError("gateway exited with %s; see %s" % (p.returncode, log.name))
            try:
                with urllib.request.urlopen("http://127.0.0.1:%d/readyz" % admin, timeout=1) as r:
                    if r.status == 200:
                        return p, port, admin
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("gateway not ready within 20 s; see " + log.name)

    def stop(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    p.kill()
                except OSError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()
