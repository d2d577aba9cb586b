#!/usr/bin/env python3
"""Churn soak: does a node come back to where it started after minutes of churn?

Starts its own redis-server and a release gateway on free loopback ports, then:

1. opens steady subscribers on every transport (WebSocket, SSE with format=json,
   long-poll), each on a few of the steady channels, and warms the node up (a burst of
   concurrent publishes, which usually grows the Redis pool to its size);
2. samples the baseline: open fds (split into client sockets, Redis sockets, other),
   `gateway_channels`, `gateway_subscriptions`, `gateway_connections` per transport, RSS;
3. for `--duration` seconds, churn workers on every transport connect, subscribe
   (steady channels, a pool of shared churn channels, fresh one-off channels; sometimes
   resuming with `since`/`Last-Event-ID` 0), unsubscribe and resubscribe (WebSocket ops),
   read for a while and go away — cleanly or by dropping the socket, some in the middle
   of a held long-poll or right after sending the request — while publishers send to the
   steady and churn channels alternately through `POST /publish/{ch}` (history) and raw
   Redis `PUBLISH`; RSS and the gauges are sampled every `--sample-every` seconds;
4. stops churning and publishing, lets the steady subscribers drain, and checks:
   every steady subscriber got every message of its channels exactly once (0 lost,
   0 duplicates, no reset), and within `--settle-timeout` seconds (the channels of
   departed long-polls stay buffered for the 30 s keep-alive) the gauges, the client
   sockets and the other fds are back to the baseline exactly, the Redis sockets at most
   the pub/sub link + the publishing pool's size (the pool opens connections on demand
   and keeps them), and RSS within `--rss-tolerance-mib` of the baseline.

Prints the numbers and PASS or FAIL (exit status 0 / 1; 2 for a setup error), writes
`soak.json` and the processes' logs under `--out`, and stops everything on any exit
(children also die with the script, even on SIGKILL).

    cargo build --release -p gateway
    loadtest/soak.py                       # 10 minutes
    loadtest/soak.py --duration 60         # a quick one

Standard library only; loopback only (sources spread over 127.0.0.2-127.0.0.20).
"""

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
import urllib.parse

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "py"))
import gwclient as gw  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "127.0.0.1"
TRANSPORTS = ("ws", "sse", "poll")


class Stats:
    def __init__(self):
        self.cycles = {t: 0 for t in TRANSPORTS}
        self.cycle_errors = {t: 0 for t in TRANSPORTS}
        self.errors = {}
        self.published = {"http": 0, "raw": 0}
        self.publish_failed = 0

    def error(self, what, e):
        key = "%s: %s" % (what, type(e).__name__ if not str(e) else str(e)[:80])
        self.errors[key] = self.errors.get(key, 0) + 1


class Published:
    """What each channel was sent, by sequence number (only publishes that succeeded)."""

    def __init__(self):
        self.ok = {}
        self.seq = {}

    def next(self, ch):
        n = self.seq.get(ch, 0) + 1
        self.seq[ch] = n
        return n


def payload(ch, n, pad):
    return json.dumps({"s": "soak", "ch": ch, "n": n, "p": "x" * pad}).encode()


class Steady:
    """A steady subscriber: subscribed before the baseline, must miss nothing."""

    def __init__(self, kind, idx, channels):
        self.kind, self.idx, self.channels = kind, idx, channels
        self.got = {c: {} for c in channels}
        self.resets = 0
        self.failed = None
        self.ready = asyncio.Event()
        self.unexpected = 0

    def record(self, channel, data):
        try:
            m = json.loads(data)
        except ValueError:
            self.unexpected += 1
            return
        if m.get("s") != "soak" or m.get("ch") != channel or channel not in self.got:
            self.unexpected += 1
            return
        seen = self.got[channel]
        seen[m["n"]] = seen.get(m["n"], 0) + 1

    async def run(self, port, source, stop):
        try:
            if self.kind == "ws":
                await self.run_ws(port, source, stop)
            elif self.kind == "sse":
                await self.run_sse(port, source, stop)
            else:
                await self.run_poll(port, source, stop)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - reported
            self.failed = "%s: %s" % (type(e).__name__, e)
            self.ready.set()

    async def run_ws(self, port, source, stop):
        c = gw.WsClient()
        await c.open(HOST, port, self.channels, source=source)
        await c.until("subscribed")
        self.ready.set()
        try:
            while not stop.is_set():
                f = await c.recv()
                t = f.get("type")
                if t == "message":
                    self.record(f["channel"], f["data"])
                elif t == "reset":
                    self.resets += 1
                elif t == "close":
                    raise ConnectionError("closed by the server: %r" % f)
        finally:
            c.abort()

    async def run_sse(self, port, source, stop):
        c = gw.SseClient()
        await c.open(HOST, port, self.channels, source=source, format="json")
        self.ready.set()
        try:
            while not stop.is_set():
                _, event, data = await c.next()
                if event == "reset":
                    self.resets += 1
                elif event == "disconnect":
                    raise ConnectionError("disconnected by the server: %s" % data)
                else:
                    env = json.loads(data)
                    self.record(env["channel"], env["data"])
        finally:
            c.abort()

    async def run_poll(self, port, source, stop):
        conn = gw.HttpConn(HOST, port, source)
        cursor = None
        first = True
        try:
            while not stop.is_set():
                q = gw.query(self.channels, cursor=cursor, timeout=0 if first else 20)
                status, _, body = await conn.request("GET", "/poll?" + q)
                if status != 200:
                    raise gw.ProtocolError("poll answered %d: %r" % (status, body[:200]))
                a = json.loads(body)
                if a.get("reset"):
                    self.resets += 1
                for m in a["messages"]:
                    self.record(m["channel"], m["data"])
                cursor = a["cursor"]
                if first:
                    first = False
                    self.ready.set()
        finally:
            conn.close()


class Soak:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.stats = Stats()
        self.published = Published()
        self.prefix = "soak%d" % os.getpid()
        self.steady_channels = ["%s-steady-%d" % (self.prefix, i) for i in range(args.steady_channels)]
        self.churn_channels = ["%s-churn-%d" % (self.prefix, i) for i in range(args.churn_channels)]
        self.fresh = 0
        self.sources = gw.parse_ips(args.source_ips)
        self.samples = []
        self.pool_size = 16  # the gateway's default --redis-pool-size
        for i, a in enumerate(args.gateway_arg):
            if a.startswith("--redis-pool-size"):
                self.pool_size = int(a.split("=", 1)[1] if "=" in a else args.gateway_arg[i + 1])

    # --- sampling ---------------------------------------------------------------------

    def sample(self, label):
        if self.gw_proc.poll() is not None:
            raise RuntimeError("the gateway exited (status %s) during the run; see %s" % (
                self.gw_proc.returncode, os.path.join(self.args.out, "logs", "gateway.log")))
        m = gw.metrics(self.admin)
        fds, socks = gw.fd_census(self.gw_pid, [self.port, self.redis_port])
        s = {
            "label": label,
            "t": round(time.time() - self.t0, 1),
            "rss_kib": gw.rss_kib(self.gw_pid),
            "rss_anon_kib": gw.proc_field(self.gw_pid, "RssAnon"),
            "rss_file_kib": gw.proc_field(self.gw_pid, "RssFile"),
            "fds": fds,
            "client_sockets": socks[self.port],
            "redis_sockets": socks[self.redis_port],
            "other_fds": fds - socks[self.port] - socks[self.redis_port],
            "channels": gw.metric_sum(m, "gateway_channels"),
            "subscriptions": gw.metric_sum(m, "gateway_subscriptions"),
            "connections": {t: m.get('gateway_connections{transport="%s"}' % t, 0.0) for t in TRANSPORTS},
            "connections_total": {t: m.get('gateway_connections_total{transport="%s"}' % t, 0.0)
                                  for t in TRANSPORTS},
            "slow_consumer": gw.metric_sum(m, "gateway_slow_consumer_disconnects_total"),
            "broker_reconnects": gw.metric_sum(m, "gateway_broker_reconnects_total"),
        }
        return s

    @staticmethod
    def comparable(s):
        # Redis sockets apart: the publishing pool opens connections on demand, up to its
        # size, and keeps them (checked against that bound in `judge`).
        return (s["channels"], s["subscriptions"], tuple(s["connections"][t] for t in TRANSPORTS),
                s["client_sockets"], s["other_fds"])

    # --- publishing -------------------------------------------------------------------

    async def publish_one(self, http, redis, ch, kind):
        n = self.published.next(ch)
        body = payload(ch, n, self.args.payload_pad)
        try:
            if kind == "http":
                status, _, resp = await http.request("POST", "/publish/" + urllib.parse.quote(ch, safe=""), body)
                if status != 200:
                    raise gw.ProtocolError("publish answered %d: %r" % (status, resp[:200]))
            else:
                await redis.command("PUBLISH", ch, body)
        except Exception as e:  # noqa: BLE001 - counted; the message is not expected then
            self.stats.publish_failed += 1
            self.stats.error("publish " + kind, e)
            http.close()
            redis.close()
            return
        self.published.ok.setdefault(ch, set()).add(n)
        self.stats.published[kind] += 1

    async def publisher(self, stop, channels, rate, offset):
        """Open loop at `rate`/s over `channels`, alternating HTTP (history) and raw."""
        http = gw.HttpConn(HOST, self.port)
        redis = gw.RedisConn(self.redis_port)
        k = 0
        start = time.monotonic() + offset
        try:
            while not stop.is_set():
                due = start + k / rate
                delay = due - time.monotonic()
                if delay > 0:
                    try:
                        async with asyncio.timeout(delay):
                            await stop.wait()
                        break
                    except TimeoutError:
                        pass
                ch = channels[k % len(channels)] if channels is self.steady_channels else self.rng.choice(channels)
                await self.publish_one(http, redis, ch, "http" if k % 2 == 0 else "raw")
                k += 1
        finally:
            http.close()
            redis.close()

    async def warm_pool(self):
        """Concurrent publishes, so the gateway's Redis pool has most of its connections
        before the baseline (it only grows on demand and keeps what it opened; how far a
        burst grows it depends on timing, hence the bound in `judge`)."""
        conns = [gw.HttpConn(HOST, self.port) for _ in range(self.args.warm_concurrency)]
        redis = gw.RedisConn(self.redis_port)
        try:
            for _ in range(3):
                await asyncio.gather(*(self.publish_one(c, redis, self.steady_channels[i % len(self.steady_channels)],
                                                        "http") for i, c in enumerate(conns)))
        finally:
            for c in conns:
                c.close()
            redis.close()

    # --- churn ------------------------------------------------------------------------

    def pick_channels(self, lo, hi):
        out = []
        for _ in range(self.rng.randint(lo, hi)):
            r = self.rng.random()
            if r < 0.25:
                out.append(self.rng.choice(self.steady_channels))
            elif r < 0.7:
                out.append(self.rng.choice(self.churn_channels))
            else:
                self.fresh += 1
                out.append("%s-fresh-%d" % (self.prefix, self.fresh))
        return list(dict.fromkeys(out))

    def source(self):
        return self.rng.choice(self.sources)

    async def read_for(self, coro_fn, secs):
        """Calls coro_fn() until `secs` pass (a timeout there is the normal end)."""
        try:
            async with asyncio.timeout(secs):
                while True:
                    if await coro_fn() is False:
                        return
        except TimeoutError:
            pass

    async def churn_ws(self):
        c = gw.WsClient()
        try:
            first = self.pick_channels(0, 2)
            await c.open(HOST, self.port, first, source=self.source())
            if first:
                await c.until("subscribed")
            for _ in range(self.rng.randint(1, 3)):
                chans = self.pick_channels(1, 4)
                op = {"op": "subscribe", "channels": chans}
                if self.rng.random() < 0.1:
                    op["since"] = "0"
                await c.send_json(op)
                await c.until("subscribed")

                async def recv():
                    f = await c.recv()
                    return f.get("type") != "close"
                await self.read_for(recv, self.rng.uniform(0, self.args.hold))
                if self.rng.random() < 0.5:
                    await c.send_json({"op": "unsubscribe", "channels": chans[:1]})
                    await c.until("unsubscribed")
            if self.rng.random() < 0.05:
                await c.send_json({"op": "subscribe", "channels": ["__not allowed"]})
                await c.until("error")
        finally:
            if self.rng.random() < 0.5:
                await c.close()
            else:
                c.abort()

    async def churn_sse(self):
        c = gw.SseClient()
        chans = self.pick_channels(1, 3)
        if self.rng.random() < 0.1:
            # Asks and goes away before the answer.
            r, w = await gw.connect(HOST, self.port, self.source())
            w.write(("GET /sse?%s HTTP/1.1\r\nhost: x\r\n\r\n" % gw.query(chans)).encode())
            await w.drain()
            w.transport.abort()
            return
        params = {"format": "json"} if self.rng.random() < 0.5 else {}
        if self.rng.random() < 0.1:
            params["last_event_id"] = "0"
        try:
            await c.open(HOST, self.port, chans, source=self.source(), **params)
            await self.read_for(c.next, self.rng.uniform(0, self.args.hold))
        finally:
            c.abort()

    async def churn_poll(self):
        conn = gw.HttpConn(HOST, self.port, self.source())
        chans = self.pick_channels(1, 3)
        cursor = None
        try:
            for i in range(self.rng.randint(1, 4)):
                timeout = 0 if i == 0 else self.rng.choice((0, 1, 2))
                q = gw.query(chans, cursor=cursor, timeout=timeout,
                             since="0" if i == 0 and self.rng.random() < 0.1 else None)
                if i > 0 and self.rng.random() < 0.15:
                    # Goes away in the middle of a held poll.
                    r, w = conn.reader, conn.writer
                    if w is None:
                        break
                    w.write(("GET /poll?%s HTTP/1.1\r\nhost: x\r\n\r\n" %
                             gw.query(chans, cursor=cursor, timeout=10)).encode())
                    await w.drain()
                    await asyncio.sleep(self.rng.uniform(0, 0.5))
                    break
                status, _, body = await conn.request("GET", "/poll?" + q)
                if status != 200:
                    raise gw.ProtocolError("poll answered %d" % status)
                cursor = json.loads(body)["cursor"]
        finally:
            conn.close()

    async def churner(self, kind, stop):
        fn = {"ws": self.churn_ws, "sse": self.churn_sse, "poll": self.churn_poll}[kind]
        while not stop.is_set():
            try:
                async with asyncio.timeout(30):
                    await fn()
                self.stats.cycles[kind] += 1
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - counted and reported
                self.stats.cycle_errors[kind] += 1
                self.stats.error("churn " + kind, e)
                await asyncio.sleep(0.1)

    # --- the run ----------------------------------------------------------------------

    async def run(self):
        a = self.args
        self.t0 = time.time()
        stop_publish, stop_churn, stop_steady = asyncio.Event(), asyncio.Event(), asyncio.Event()
        steady = []
        for kind in TRANSPORTS:
            for i in range(a.steady):
                chans = self.rng.sample(self.steady_channels, min(a.steady_per_sub, len(self.steady_channels)))
                steady.append(Steady(kind, i, chans))
        steady_tasks = [asyncio.create_task(s.run(self.port, self.sources[i % len(self.sources)], stop_steady))
                        for i, s in enumerate(steady)]
        async with asyncio.timeout(30):
            await asyncio.gather(*(s.ready.wait() for s in steady))
        bad = [s for s in steady if s.failed]
        if bad:
            raise RuntimeError("steady subscribers failed to start: %s" % bad[0].failed)
        await self.warm_pool()
        await asyncio.sleep(3)  # the warm-up's messages reach everyone; pollers are held again
        base = await self.stable_sample("baseline", None, 10)
        self.samples.append(base)
        print("baseline   %s" % self.line(base), flush=True)

        tasks = [asyncio.create_task(self.publisher(stop_publish, self.steady_channels, a.rate, 0)),
                 asyncio.create_task(self.publisher(stop_publish, self.churn_channels, a.churn_rate, 0.01))]
        for kind in TRANSPORTS:
            tasks += [asyncio.create_task(self.churner(kind, stop_churn)) for _ in range(a.churn)]
        end = time.monotonic() + a.duration
        while time.monotonic() < end:
            await asyncio.sleep(min(a.sample_every, max(0.0, end - time.monotonic())))
            s = self.sample("churn")
            self.samples.append(s)
            print("t=%5.0fs   %s | cycles %s, published %d, errors %d" % (
                s["t"], self.line(s), "/".join(str(self.stats.cycles[t]) for t in TRANSPORTS),
                sum(self.stats.published.values()), sum(self.stats.cycle_errors.values())), flush=True)
            dead = [st for st in steady if st.failed]
            if dead:
                print("steady subscriber failed: %s %d: %s" % (dead[0].kind, dead[0].idx, dead[0].failed))
                break
        stop_churn.set()
        stop_publish.set()
        await asyncio.sleep(0.5)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # The steady subscribers drain what is still on its way.
        deadline = time.monotonic() + a.drain
        while time.monotonic() < deadline and self.missing(steady):
            await asyncio.sleep(0.2)
        end_sample = await self.stable_sample("end", base, a.settle_timeout)
        self.samples.append(end_sample)
        stop_steady.set()
        for t in steady_tasks:
            t.cancel()
        await asyncio.gather(*steady_tasks, return_exceptions=True)
        return self.judge(steady, base, end_sample)

    async def stable_sample(self, label, target, timeout):
        """Samples every second until the gauges and fds equal `target` (or, without
        one, are the same twice in a row), at most `timeout` s; the last sample."""
        deadline = time.monotonic() + timeout
        prev = None
        while True:
            s = self.sample(label)
            key = self.comparable(s)
            if target is not None and key == self.comparable(target):
                return s
            if target is None and prev is not None and key == prev:
                return s
            if time.monotonic() >= deadline:
                return s
            prev = key
            await asyncio.sleep(1)

    def missing(self, steady):
        return sum(len(self.published.ok.get(c, ())) - len(s.got[c]) for s in steady for c in s.channels)

    @staticmethod
    def line(s):
        return ("rss %5.1f MiB (anon %5.1f), fds %d (clients %d, redis %d, other %d), channels %d, "
                "subscriptions %d, connections %s" % (
                    s["rss_kib"] / 1024, s["rss_anon_kib"] / 1024, s["fds"], s["client_sockets"], s["redis_sockets"],
                                    s["other_fds"], s["channels"], s["subscriptions"],
                                    "/".join("%d" % s["connections"][t] for t in TRANSPORTS)))

    def judge(self, steady, base, end):
        a = self.args
        lost = dup = 0
        per_kind = {t: {"expected": 0, "received": 0, "lost": 0, "duplicates": 0} for t in TRANSPORTS}
        for s in steady:
            k = per_kind[s.kind]
            for c in s.channels:
                want = self.published.ok.get(c, set())
                got = s.got[c]
                missing = len(want - got.keys())
                extra_dups = sum(n - 1 for n in got.values() if n > 1)
                k["expected"] += len(want)
                k["received"] += len(got)
                k["lost"] += missing
                k["duplicates"] += extra_dups
                lost += missing
                dup += extra_dups
        resets = sum(s.resets for s in steady)
        failed = [("%s %d" % (s.kind, s.idx), s.failed) for s in steady if s.failed]
        unexpected = sum(s.unexpected for s in steady)
        rss_growth = (end["rss_kib"] - base["rss_kib"]) / 1024
        churn = [s for s in self.samples if s["label"] == "churn"]
        third = max(1, len(churn) // 3)
        def peak(samples):
            return "%.1f MiB" % (max(s["rss_kib"] for s in samples) / 1024) if samples else "-"
        rss_mid, rss_last = peak(churn[:2 * third]), peak(churn[2 * third:])
        checks = [
            ("steady subscribers: 0 lost", lost == 0, "%d lost" % lost),
            ("steady subscribers: 0 duplicates", dup == 0, "%d duplicates" % dup),
            ("steady subscribers: no reset, none disconnected", resets == 0 and not failed and unexpected == 0,
             "%d resets, %d failed %s, %d unexpected" % (resets, len(failed), failed[:2], unexpected)),
            ("gateway_channels back to baseline", end["channels"] == base["channels"],
             "%d -> %d" % (base["channels"], end["channels"])),
            ("gateway_subscriptions back to baseline", end["subscriptions"] == base["subscriptions"],
             "%d -> %d" % (base["subscriptions"], end["subscriptions"])),
            ("gateway_connections back to baseline", end["connections"] == base["connections"],
             "%s -> %s" % (base["connections"], end["connections"])),
            ("open fds back to baseline (Redis pool: at most its size)",
             end["client_sockets"] == base["client_sockets"] and end["other_fds"] == base["other_fds"]
             and base["redis_sockets"] <= end["redis_sockets"] <= 1 + self.pool_size,
             "%d -> %d: client sockets %d -> %d, other %d -> %d, redis %d -> %d (pub/sub + pool of %d)" % (
                 base["fds"], end["fds"], base["client_sockets"], end["client_sockets"],
                 base["other_fds"], end["other_fds"], base["redis_sockets"], end["redis_sockets"],
                 self.pool_size)),
            ("RSS within %.0f MiB of baseline" % a.rss_tolerance_mib, rss_growth <= a.rss_tolerance_mib,
             "%.1f -> %.1f MiB (%+.1f MiB); churn peak %s in the first two thirds, %s in the "
             "last third" % (base["rss_kib"] / 1024, end["rss_kib"] / 1024, rss_growth, rss_mid, rss_last)),
            ("churn ran on every transport", all(self.stats.cycles[t] > 0 for t in TRANSPORTS),
             "cycles %s" % self.stats.cycles),
        ]
        ok = all(c[1] for c in checks)
        conns = {t: int(end["connections_total"][t] - base["connections_total"][t]) for t in TRANSPORTS}
        print()
        print("soak: %.0f s of churn, seed %d" % (a.duration, a.seed))
        print("  churn cycles     %s (failed %s); connections opened during the run %s" % (
            self.stats.cycles, self.stats.cycle_errors, conns))
        print("  published        %d via HTTP (history), %d via raw PUBLISH, %d failed" % (
            self.stats.published["http"], self.stats.published["raw"], self.stats.publish_failed))
        for t in TRANSPORTS:
            k = per_kind[t]
            print("  steady %-4s      %d subscribers: expected %d, received %d, lost %d, duplicates %d" % (
                t, a.steady, k["expected"], k["received"], k["lost"], k["duplicates"]))
        print("  slow-consumer disconnects %d, broker reconnects %d" % (
            end["slow_consumer"] - base["slow_consumer"], end["broker_reconnects"] - base["broker_reconnects"]))
        if self.stats.errors:
            top = sorted(self.stats.errors.items(), key=lambda kv: -kv[1])[:6]
            print("  client-side errors (churn; not failures by themselves): %s" % top)
        print("  baseline  %s" % self.line(base))
        print("  end       %s (t=%.0fs)" % (self.line(end), end["t"]))
        for name, good, detail in checks:
            print("  %-4s %-56s %s" % ("ok" if good else "FAIL", name, detail))
        print("result %s" % ("PASS" if ok else "FAIL"))
        return ok, {"checks": [{"check": n, "ok": g, "detail": d} for n, g, d in checks],
                    "steady": per_kind, "cycles": self.stats.cycles, "cycle_errors": self.stats.cycle_errors,
                    "errors": self.stats.errors, "published": self.stats.published,
                    "publish_failed": self.stats.publish_failed, "connections_opened": conns,
                    "baseline": base, "end": end, "samples": self.samples, "pass": ok}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600, help="seconds of churn (default 600)")
    ap.add_argument("--gateway", default=os.path.join(ROOT, "target/release/gateway"))
    ap.add_argument("--gateway-arg", action="append", default=[], help="extra gateway flag (repeatable)")
    ap.add_argument("--gateway-env", action="append", default=[], metavar="NAME=VALUE",
                    help="environment of the gateway only, e.g. MALLOC_ARENA_MAX=2 (repeatable)")
    ap.add_argument("--steady", type=int, default=20, help="steady subscribers per transport")
    ap.add_argument("--steady-channels", type=int, default=8)
    ap.add_argument("--steady-per-sub", type=int, default=3, help="channels per steady subscriber")
    ap.add_argument("--churn", type=int, default=20, help="churn workers per transport")
    ap.add_argument("--churn-channels", type=int, default=200, help="shared churn channels")
    ap.add_argument("--hold", type=float, default=1.5, help="longest read per churn step, seconds")
    ap.add_argument("--rate", type=float, default=20, help="publishes/s to the steady channels")
    ap.add_argument("--churn-rate", type=float, default=20, help="publishes/s to the churn channels")
    ap.add_argument("--payload-pad", type=int, default=100)
    ap.add_argument("--warm-concurrency", type=int, default=48)
    ap.add_argument("--sample-every", type=float, default=15)
    ap.add_argument("--drain", type=float, default=10, help="longest wait for the steady subscribers' last messages")
    ap.add_argument("--settle-timeout", type=float, default=60,
                    help="longest wait for the node to return to its baseline")
    ap.add_argument("--rss-tolerance-mib", type=float, default=24)
    ap.add_argument("--source-ips", default="127.0.0.2-127.0.0.20")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(ROOT, "target/soak"))
    args = ap.parse_args()
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    if not os.path.exists(args.gateway):
        print("no gateway at %s: cargo build --release -p gateway" % args.gateway, file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    procs = gw.Processes(os.path.join(args.out, "logs"))
    # Hard bound on the whole run, whatever hangs.
    limit = int(args.duration + args.drain + args.settle_timeout + 180)
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("soak exceeded %d s" % limit)))
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    signal.alarm(limit)
    try:
        _, redis_port = procs.start_redis()
        env = dict(kv.split("=", 1) for kv in args.gateway_env)
        gp, port, admin = procs.start_gateway(args.gateway, redis_port, args.gateway_arg, env=env)
        soak = Soak(args)
        soak.port, soak.admin, soak.redis_port, soak.gw_pid, soak.gw_proc = port, admin, redis_port, gp.pid, gp
        print("soak: gateway %s (pid %d) on :%d, admin :%d, redis :%d; %d s of churn, %d steady + %d churn "
              "workers per transport, %g + %g msg/s, seed %d" % (
                  args.gateway, gp.pid, port, admin, redis_port, args.duration, args.steady, args.churn,
                  args.rate, args.churn_rate, args.seed), flush=True)
        ok, report = asyncio.run(soak.run())
        if gp.poll() is not None:
            print("the gateway exited (status %s) during the run" % gp.returncode)
            ok = False
        report["args"] = vars(args)
        with open(os.path.join(args.out, "soak.json"), "w") as f:
            json.dump(report, f, indent=1, default=str)
        return 0 if ok else 1
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - any failure ends the run
        why = "interrupted" if isinstance(e, KeyboardInterrupt) else "%s: %s" % (type(e).__name__, e)
        print("soak: aborted: %s" % why, file=sys.stderr)
        print("result FAIL")
        return 2 if not isinstance(e, KeyboardInterrupt) else 1
    finally:
        signal.alarm(0)
        procs.stop()


if __name__ == "__main__":
    sys.exit(main())
