#!/usr/bin/env python3
"""Memory per (subscriber, channel) pair.

Starts a fresh release gateway (with its own redis-server unless --no-redis), reads
its RSS from /proc, opens N WebSocket subscribers with C distinct channels each (every
channel of every subscriber distinct: N*C channels), waits until every one is
confirmed (`subscribed`), lets it settle, reads RSS and the gateway's channel and
subscription gauges, then stops everything. With --compare (the default) the same
N subscribers are also run with one channel each on another fresh node, so the cost
of the extra pairs is (growth with C - growth with 1) / (N * (C - 1)); the order of
the two alternates between repetitions.

    loadtest/pairs.py                                    # 3000 x 32, with Redis, 1 repetition
    loadtest/pairs.py --no-redis --repeat 3
    loadtest/pairs.py --gateway /tmp/gateway-before --json before.json
    MALLOC_ARENA_MAX=2 loadtest/pairs.py                 # the environment reaches the gateway

Standard library only; loopback only. Bounded: connect phase 120 s, whole run ~2 min
per node at the defaults.
"""

import argparse
import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "py"))
import gwclient as gw  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def open_all(port, n, per_conn, prefix, sources, concurrency, via):
    """Opens n subscribers with per_conn channels each; returns the clients."""
    sem = asyncio.Semaphore(concurrency)
    clients = [None] * n

    async def one(i):
        chans = ["%s-%d-%d" % (prefix, i, k) for k in range(per_conn)]
        async with sem:
            c = gw.WsClient()
            if via == "url":
                await c.open("127.0.0.1", port, chans, source=sources[i % len(sources)])
            else:
                await c.open("127.0.0.1", port, (), source=sources[i % len(sources)])
                await c.send_json({"op": "subscribe", "channels": chans})
            await c.until("subscribed", timeout=30)
            clients[i] = c

    async with asyncio.timeout(120):
        await asyncio.gather(*(one(i) for i in range(n)))
    return clients


def run_node(args, per_conn, label):
    procs = gw.Processes(os.path.join(args.out, "logs"))
    try:
        rport = None
        redis_pid = None
        if args.attach:
            # A gateway started elsewhere (e.g. under a heap profiler): PORT,ADMIN_PORT,PID.
            port, admin, pid = (int(x) for x in args.attach.split(","))
            gp = type("P", (), {"pid": pid})
        else:
            if not args.no_redis:
                rp, rport = procs.start_redis("redis-" + label)
                redis_pid = rp.pid
            gp, port, admin = procs.start_gateway(args.gateway, rport, args.gateway_arg,
                                                  name="gateway-" + label)
        time.sleep(0.5)
        before = gw.rss_kib(gp.pid)
        t0 = time.time()
        prefix = "pr%x" % (int(time.time() * 1000) & 0xFFFFFF)
        loop = asyncio.new_event_loop()
        clients = loop.run_until_complete(
            open_all(port, args.connections, per_conn, prefix, gw.parse_ips(args.source_ips),
                     args.concurrency, args.via))
        connect_s = time.time() - t0
        time.sleep(args.settle)
        idle = gw.rss_kib(gp.pid)
        m = gw.metrics(admin)
        status = {k: gw.proc_field(gp.pid, k) for k in ("VmHWM", "RssAnon", "RssFile")}
        redis_rss = gw.rss_kib(redis_pid) if redis_pid else None
        if args.attach and args.hold:
            print("  holding the connections %.0f s (e.g. to snapshot a heap profiler)" % args.hold, flush=True)
            time.sleep(args.hold)
        for c in clients:
            c.abort()
        loop.close()
        pairs = args.connections * per_conn
        r = {
            "label": label,
            "per_conn": per_conn,
            "connections": args.connections,
            "pairs": pairs,
            "redis": not args.no_redis,
            "rss_before_kib": before,
            "rss_idle_kib": idle,
            "growth_kib": idle - before,
            "hwm_kib": status["VmHWM"],
            "rss_anon_kib": status["RssAnon"],
            "redis_rss_kib": redis_rss,
            "channels": gw.metric_sum(m, "gateway_channels"),
            "subscriptions": gw.metric_sum(m, "gateway_subscriptions"),
            "connect_secs": round(connect_s, 2),
            "bytes_per_pair": round((idle - before) * 1024 / pairs),
        }
        print("  %-14s %5d x %2d: rss %7.1f -> %7.1f MiB (+%.1f MiB, hwm %.1f MiB), %6.0f B/pair, "
              "channels %d, subscriptions %d, connected in %.1f s" % (
                  label, args.connections, per_conn, before / 1024, idle / 1024, (idle - before) / 1024,
                  status["VmHWM"] / 1024, r["bytes_per_pair"], r["channels"], r["subscriptions"], connect_s),
              flush=True)
        if r["subscriptions"] != pairs:
            print("  warning: expected %d subscriptions" % pairs, flush=True)
        return r
    finally:
        procs.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gateway", default=os.path.join(ROOT, "target/release/gateway"))
    ap.add_argument("--no-redis", action="store_true", help="in-process broker instead of redis-server")
    ap.add_argument("--connections", type=int, default=3000)
    ap.add_argument("--channels-per-conn", type=int, default=32)
    ap.add_argument("--via", choices=("url", "op"), default="url",
                    help="channels in the upgrade URL (?channel=...) or in one subscribe op")
    ap.add_argument("--no-compare", action="store_true", help="skip the one-channel-per-subscriber node")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--concurrency", type=int, default=100)
    ap.add_argument("--source-ips", default="127.0.0.2-127.0.0.20")
    ap.add_argument("--gateway-arg", action="append", default=[], help="extra gateway flag (repeatable)")
    ap.add_argument("--out", default=os.path.join(ROOT, "target/pairs"))
    ap.add_argument("--json", help="write every node's figures here")
    ap.add_argument("--attach", help="measure a running gateway instead: PORT,ADMIN_PORT,PID (implies "
                    "--no-compare; the gateway is left running)")
    ap.add_argument("--hold", type=float, default=0, help="with --attach: keep the connections this long "
                    "after the sample")
    args = ap.parse_args()
    if args.connections > 19000:
        sys.exit("at most 19000 connections per process here")
    os.makedirs(args.out, exist_ok=True)
    if args.attach:
        args.no_compare, args.repeat = True, 1
    print("pairs: gateway %s, %s, %d WebSockets x %d channels (via %s), MALLOC_ARENA_MAX=%s" % (
        args.gateway, "in-process broker" if args.no_redis else "Redis", args.connections,
        args.channels_per_conn, args.via, os.environ.get("MALLOC_ARENA_MAX", "unset")), flush=True)
    results = []
    for rep in range(args.repeat):
        order = [args.channels_per_conn] if args.no_compare else [args.channels_per_conn, 1]
        if rep % 2 == 1:
            order.reverse()
        runs = {}
        for c in order:
            runs[c] = run_node(args, c, "rep%d-%dch" % (rep + 1, c))
            results.append(runs[c])
        if not args.no_compare and args.channels_per_conn > 1:
            many, one = runs[args.channels_per_conn], runs[1]
            extra = (many["growth_kib"] - one["growth_kib"]) * 1024 / (args.connections * (args.channels_per_conn - 1))
            per_conn = one["growth_kib"] * 1024 / args.connections
            print("  => rep %d: %.0f B per extra pair, %.0f B per one-channel connection" % (
                rep + 1, extra, per_conn), flush=True)
            results.append({"label": "rep%d" % (rep + 1), "bytes_per_extra_pair": round(extra),
                            "bytes_per_connection_1ch": round(per_conn)})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX"),
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
