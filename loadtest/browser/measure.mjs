// Measures the browser client (clients/js) in real Chromium against two running gateway
// nodes on one Redis (started by loadtest/browser.sh, which passes everything below):
//
//  1. publish → DOM latency per transport (sse, ws, poll): MESSAGES messages, published
//     one at a time with `POST /publish/{channel}` (history) through node B at RATE msg/s,
//     each carrying the publisher's clock; the page (served by node A, subscribed with
//     both nodes' URLs, on node A) appends an <li> per message and then reads its clock.
//  2. node kill → receiving again, per transport: a numbered stream every INTERVAL ms
//     through the node the page is *not* on; SIGKILL of the node the page is on; the time
//     until the first message from the new connection is in the DOM; the killed node is
//     restarted on the same port before the next round. The page must end with every
//     number exactly once, in order.
//
// Clocks: both sides read `performance.timeOrigin + performance.now()` (wall clock at
// process/page start + a monotonic clock): sub-millisecond in Node, 0.1 ms in Chromium
// (which coarsens performance.now() to 100 µs on pages that are not cross-origin
// isolated). Same machine, so one wall clock; each side's offset to Date.now() is
// measured at the start and the end of a run (to ~0.1 ms, see clockOffset) and the
// latencies are corrected by the difference, which is a fraction of a millisecond.
//
// Every wait is bounded in time and every loop in count; nothing here asserts on timing.
// Output: a text summary on stdout and everything (per message, per kill) in --json.
import { createRequire } from 'node:module';
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync, readFileSync, openSync } from 'node:fs';
import { tmpdir, loadavg } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

const here = dirname(fileURLToPath(import.meta.url));
const require = createRequire(join(here, '../../clients/js/package.json'));
const { chromium } = require('playwright-core');

const { values: a } = parseArgs({
  options: {
    gateway: { type: 'string' }, // the release binary, to restart killed nodes
    'redis-url': { type: 'string' },
    node: { type: 'string', multiple: true }, // PUBLIC_ADDR,ADMIN_ADDR (exactly two)
    'pid-dir': { type: 'string' }, // nodeN.pid: the running node's pid (kept up to date)
    'log-dir': { type: 'string' },
    messages: { type: 'string', default: '1000' },
    warmup: { type: 'string', default: '20' },
    rate: { type: 'string', default: '50' },
    kills: { type: 'string', default: '10' },
    interval: { type: 'string', default: '20' }, // ms between numbered messages (kill test)
    transports: { type: 'string', default: 'sse,ws,poll' },
    phases: { type: 'string', default: 'latency,kill' },
    json: { type: 'string' },
  },
});
const MESSAGES = +a.messages, WARMUP = +a.warmup, RATE = +a.rate, KILLS = +a.kills, INTERVAL = +a.interval;
const TRANSPORTS = a.transports.split(',');
const PHASES = a.phases.split(',');
if (!a.gateway || !a['redis-url'] || !a.node || a.node.length !== 2 || !a['pid-dir'] || !a['log-dir']) {
  console.error('usage: measure.mjs --gateway BIN --redis-url URL --node PUB,ADMIN --node PUB,ADMIN --pid-dir D --log-dir D [--json F]');
  process.exit(2);
}
for (const [k, v] of Object.entries({ MESSAGES, WARMUP, RATE, KILLS, INTERVAL })) {
  if (!Number.isFinite(v) || v < 0 || v > 100000) throw new Error(`bad ${k}: ${v}`);
}

const now = () => performance.timeOrigin + performance.now();
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const log = (...x) => console.error(new Date().toISOString().slice(11, 23), ...x);
const load = () => loadavg().map((x) => x.toFixed(2)).join(' ');

const nodes = a.node.map((spec, i) => {
  const [pub, admin] = spec.split(',');
  return { i, name: 'AB'[i], pub, admin, url: `http://${pub}`, pidFile: join(a['pid-dir'], `node${i}.pid`) };
});
const pidOf = (n) => +readFileSync(n.pidFile, 'utf8').trim();
const restarted = new Set(); // children of this process, ended on exit

async function ready(n, timeoutMs) {
  const until = Date.now() + timeoutMs;
  while (Date.now() < until) {
    try {
      const r = await fetch(`http://${n.admin}/readyz`, { signal: AbortSignal.timeout(1000) });
      if (r.status === 200) return true;
    } catch (e) { /* not up yet */ }
    await sleep(25);
  }
  return false;
}

// Same flags as loadtest/browser.sh starts the nodes with.
function startNode(n) {
  const err = openSync(join(a['log-dir'], `node${n.i}.log`), 'a');
  const child = spawn(a.gateway, ['--listen', n.pub, '--admin-listen', n.admin, '--redis-url', a['redis-url']], {
    stdio: ['ignore', 'ignore', err],
  });
  restarted.add(child);
  child.on('exit', () => restarted.delete(child));
  writeFileSync(n.pidFile, `${child.pid}\n`);
  return child;
}
process.on('exit', () => {
  for (const c of restarted) try { c.kill('SIGKILL'); } catch (e) { /* gone */ }
});

// ---- the browser --------------------------------------------------------------------

const profile = mkdtempSync(join(tmpdir(), 'fanout-bench-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
});
const browserVersion = context.browser() ? context.browser().version() : execFileSync(process.env.CHROMIUM || '/usr/bin/chromium', ['--version']).toString().trim();

/** Runs in the page: a list that every message is appended to, and the records. */
function install({ urls, channel, opts }) {
  const now = () => performance.timeOrigin + performance.now();
  const b = (window.__bench = { recs: [], states: [], resets: [], errors: [], gen: 0 });
  const ul = document.createElement('ul');
  ul.id = 'bench-log';
  document.body.replaceChildren(ul);
  let pending = [];
  const frame = () => {
    const t = now();
    for (const r of pending) r[4] = t;
    pending = [];
  };
  b.sub = window.fanout.subscribe(urls, [channel], Object.assign({}, opts, {
    onMessage: (m) => {
      const li = document.createElement('li');
      li.textContent = m.data;
      ul.appendChild(li);
      const r = [m.data, m.id, now(), b.gen, null]; // data, id, in the DOM, connection, next frame
      b.recs.push(r);
      if (!pending.length) requestAnimationFrame(frame);
      pending.push(r);
    },
    onState: (s, info) => {
      if (s === 'connecting') b.gen++; // messages after this come from this connection
      const e = info.error;
      b.states.push({ s, url: info.url, delay: info.delay, attempt: info.attempt, error: e && (e.code || e.message), t: now(), gen: b.gen });
    },
    onReset: (ch) => b.resets.push({ ch, t: now() }),
    onError: (e) => b.errors.push(String((e && e.code) || e)),
  }));
}

async function openPage(transport, channel) {
  const page = await context.newPage();
  page.on('pageerror', (e) => log('pageerror', String(e)));
  // The node's own page (a page made up here would be "public" to Chromium, which then
  // blocks its connections to loopback); its content is replaced by the list.
  await page.goto(nodes[0].url + '/', { timeout: 15000 });
  await page.waitForFunction(() => window.fanout && document.body.dataset.broker, null, { timeout: 15000 });
  await page.evaluate(install, { urls: nodes.map((n) => n.url), channel, opts: { transport } });
  await page.waitForFunction(() => window.__bench.states.some((s) => s.s === 'open'), null, { timeout: 15000, polling: 20 });
  return page;
}

const pull = (page) => page.evaluate(() => {
  const b = window.__bench;
  return { recs: b.recs, states: b.states, resets: b.resets, errors: b.errors };
});

/**
 * The offset of each side's hi-res clock to Date.now(), in ms. Date.now() is whole
 * milliseconds: for a hi-res reading taken between two equal Date.now() readings,
 * hi-res − Date.now() lies in [offset, offset + 1) even if the process was descheduled
 * in between, so the minimum over samples spread across 20 ms is the
 * offset (to ~0.1 ms; pages read performance.now() in 0.1 ms steps).
 */
function clockOffset() {
  const t0 = Date.now();
  let min = Infinity;
  for (let i = 0; i < 1e7 && Date.now() - t0 < 20; i++) {
    const before = Date.now();
    const hi = performance.timeOrigin + performance.now();
    if (Date.now() === before) min = Math.min(min, hi - before);
  }
  return min;
}
async function clockCheck(page) {
  const node = clockOffset();
  const inPage = await page.evaluate(clockOffset);
  return { node: +node.toFixed(3), page: +inPage.toFixed(3) };
}

// ---- publishing ---------------------------------------------------------------------

/** One message with history through node `n`; the payload carries the send time. */
async function publishOne(n, channel, seq) {
  const t = now();
  const body = JSON.stringify({ seq, t });
  try {
    const r = await fetch(`${n.url}/publish/${channel}`, { method: 'POST', body, signal: AbortSignal.timeout(5000) });
    const j = await r.json().catch(() => null);
    return { seq, t, ok: r.status === 200 && j && typeof j.id === 'string', id: j && j.id, status: r.status, rtt: now() - t };
  } catch (e) {
    return { seq, t, ok: false, status: 0, error: String(e), rtt: now() - t };
  }
}

/**
 * Publishes seq 1..count on a fixed schedule (seq k due at t0 + (k−1)·period), one at a
 * time, through `target()`; stops early when `stop()`. A late publish is sent at once and
 * does not move the schedule; its lateness is recorded.
 */
async function publishStream({ channel, count, periodMs, target, stop, deadline }) {
  const out = [];
  const t0 = now() + 50;
  for (let k = 1; k <= count && !(stop && stop()) && Date.now() < deadline; k++) {
    const due = t0 + (k - 1) * periodMs;
    const wait = due - now();
    if (wait > 0) await sleep(wait);
    const n = target();
    const r = await publishOne(n, channel, k);
    r.node = n.name;
    r.late = Math.max(0, r.t - due);
    out.push(r);
  }
  return out;
}

// ---- statistics ---------------------------------------------------------------------

/** Nearest-rank percentile of sorted `xs`. */
const pct = (xs, p) => (xs.length ? xs[Math.min(xs.length - 1, Math.max(0, Math.ceil((p / 100) * xs.length) - 1))] : null);
const summary = (xs) => {
  const s = xs.slice().sort((x, y) => x - y);
  const mean = s.reduce((x, y) => x + y, 0) / (s.length || 1);
  return { n: s.length, min: s[0], p50: pct(s, 50), p90: pct(s, 90), p99: pct(s, 99), max: s[s.length - 1], mean };
};
const f = (x, d = 1) => (x == null ? '—' : x.toFixed(d));

/** Seqs in DOM order → exactly-once / in-order check against the expected list. */
function exactness(domSeqs, expected) {
  const want = new Set(expected);
  const seen = new Map();
  let outOfOrder = 0, unexpected = 0, prev = -Infinity;
  for (const s of domSeqs) {
    seen.set(s, (seen.get(s) || 0) + 1);
    if (!want.has(s)) unexpected++;
    if (s <= prev) outOfOrder++;
    prev = Math.max(prev, s);
  }
  let missing = 0, duplicates = 0;
  for (const s of expected) {
    const c = seen.get(s) || 0;
    if (c === 0) missing++;
    if (c > 1) duplicates += c - 1;
  }
  const exact = missing === 0 && duplicates === 0 && outOfOrder === 0 && unexpected === 0 && domSeqs.length === expected.length;
  return { expected: expected.length, rendered: domSeqs.length, missing, duplicates, outOfOrder, unexpected, exact };
}

const parse = (r) => {
  try { return JSON.parse(r[0]); } catch (e) { return {}; }
};

async function waitAll(page, count, timeoutMs) {
  await page
    .waitForFunction((n) => window.__bench.recs.length >= n, count, { timeout: timeoutMs, polling: 50 })
    .catch(() => log(`timed out waiting for ${count} messages`));
  await sleep(500); // late duplicates would show here
}

// ---- 1. publish → DOM ---------------------------------------------------------------

async function latencyRun(transport) {
  const channel = `bench-lat-${process.pid}-${transport}-${Date.now()}`;
  const loadBefore = load();
  const page = await openPage(transport, channel);
  const clockStart = await clockCheck(page);
  const total = WARMUP + MESSAGES;
  const started = new Date().toISOString();
  const pubs = await publishStream({
    channel, count: total, periodMs: 1000 / RATE, target: () => nodes[1],
    deadline: Date.now() + (total / RATE) * 1000 + 60000,
  });
  await waitAll(page, pubs.filter((p) => p.ok).length, 15000);
  const clockEnd = await clockCheck(page);
  const { recs, states, resets, errors } = await pull(page);
  await page.close();
  const loadAfter = load();

  const sent = new Map(pubs.filter((p) => p.ok).map((p) => [p.seq, p]));
  const measured = [...sent.keys()].filter((s) => s > WARMUP);
  const domSeqs = recs.map((r) => parse(r).seq).filter((s) => s > WARMUP);
  // Both stamps on the wall clock: minus each side's hi-res offset (a fraction of a ms).
  const corr = (clockStart.page + clockEnd.page - clockStart.node - clockEnd.node) / 2;
  const first = new Map();
  for (const r of recs) {
    const m = parse(r);
    if (m.seq > WARMUP && !first.has(m.seq)) first.set(m.seq, { dom: r[2] - m.t - corr, frame: r[4] == null ? null : r[4] - m.t - corr });
  }
  const dom = [...first.values()].map((x) => x.dom);
  const frame = [...first.values()].filter((x) => x.frame != null).map((x) => x.frame);
  const res = {
    transport, channel, started, loadBefore, loadAfter, clockStart, clockEnd, clockCorrection: corr,
    publishFailed: pubs.filter((p) => !p.ok).length,
    publishRtt: summary(pubs.filter((p) => p.ok && p.seq > WARMUP).map((p) => p.rtt)),
    publishLate: summary(pubs.filter((p) => p.seq > WARMUP).map((p) => p.late)),
    dom: summary(dom), frame: summary(frame),
    exactness: exactness(domSeqs, measured),
    reconnects: states.filter((s) => s.s === 'reconnecting').length,
    resets: resets.length, errors,
  };
  log(`${transport}: publish→DOM p50 ${f(res.dom.p50, 2)} p99 ${f(res.dom.p99, 2)} max ${f(res.dom.max, 2)} ms;`,
    `missing ${res.exactness.missing} dup ${res.exactness.duplicates}; load ${loadBefore} → ${loadAfter}`);
  return res;
}

// ---- 2. node kill → receiving again -------------------------------------------------

async function killRun(transport) {
  const channel = `bench-kill-${process.pid}-${transport}-${Date.now()}`;
  const loadBefore = load();
  const page = await openPage(transport, channel);
  const clockStart = await clockCheck(page);
  const started = new Date().toISOString();
  const st = { target: nodes[1], stopped: false };
  const maxCount = Math.ceil(((KILLS * 8000) + 5000) / INTERVAL); // a bound; stopped long before
  const pubsP = publishStream({
    channel, count: maxCount, periodMs: INTERVAL, target: () => st.target, stop: () => st.stopped,
    deadline: Date.now() + KILLS * 30000 + 30000,
  });
  const rounds = [];
  const lastState = () => page.evaluate(() => {
    const s = window.__bench.states;
    return { open: [...s].reverse().find((x) => x.s === 'open'), n: window.__bench.recs.length, gen: window.__bench.gen };
  });
  try {
    for (let k = 1; k <= KILLS; k++) {
      await sleep(1000); // the stream flows steadily before each kill
      const before = await lastState();
      const on = nodes.find((n) => n.url === before.open.url);
      const other = nodes[1 - on.i];
      st.target = other; // publish through the survivor
      await sleep(100); // ≥ 1 publish period: the publisher has moved
      const pid = pidOf(on);
      const genAtKill = (await lastState()).gen;
      const tKill = now();
      process.kill(pid, 'SIGKILL');
      await page
        .waitForFunction((g) => {
          const r = window.__bench.recs;
          return r.length && r[r.length - 1][3] > g;
        }, genAtKill, { timeout: 20000, polling: 10 })
        .catch(() => log(`kill ${k}: no message from a new connection within 20 s`));
      // Restart the killed node on its port, so the next round again has two.
      startNode(on);
      const up = await ready(on, 15000);
      const tReady = now();
      const { recs, states } = await pull(page);
      const after = states.filter((s) => s.t >= tKill);
      const firstNew = recs.find((r) => r[3] > genAtKill);
      const detect = after.find((s) => s.s === 'reconnecting');
      const conn = firstNew ? [...after].reverse().find((s) => s.s === 'connecting' && s.gen === firstNew[3]) : null;
      const open = firstNew ? after.find((s) => s.s === 'open' && s.gen === firstNew[3]) : null;
      const m = firstNew ? parse(firstNew) : {};
      const burst = firstNew ? recs.filter((r) => r[3] === firstNew[3] && open && parse(r).t < open.t).length : 0;
      const round = {
        k, killed: on.name, to: open ? nodes.find((n) => n.url === open.url)?.name : null,
        total: firstNew ? firstNew[2] - tKill : null,
        detect: detect ? detect.t - tKill : null,
        backoff: detect ? detect.delay : null,
        waited: detect && conn ? conn.t - detect.t : null, // the backoff as the page's timer ran it
        connect: conn && open ? open.t - conn.t : null, // connecting → open (upgrade/subscribe or first chunk/poll)
        firstMsg: open && firstNew ? firstNew[2] - open.t : null,
        attempts: after.filter((s) => s.s === 'connecting').length,
        errors: [...new Set(after.filter((s) => s.s === 'reconnecting').map((s) => s.error))],
        firstSeq: m.seq, firstAge: firstNew ? firstNew[2] - m.t : null, caughtUp: burst,
        inFlightAfterKill: recs.filter((r) => r[3] === genAtKill && r[2] > tKill).length,
        restartReady: up ? tReady - tKill : null,
      };
      rounds.push(round);
      log(`${transport} kill ${k}: ${on.name} → ${round.to}: ${f(round.total)} ms (detect ${f(round.detect)}, backoff ${round.backoff},`,
        `connect ${f(round.connect)}, first msg ${f(round.firstMsg)}; caught up ${burst}), restarted ${up ? 'ok' : 'NOT READY'}`);
      if (!up) break;
    }
  } finally {
    st.stopped = true;
  }
  const pubs = await pubsP;
  const ok = pubs.filter((p) => p.ok);
  await waitAll(page, ok.length, 20000);
  const clockEnd = await clockCheck(page);
  const { recs, states, resets, errors } = await pull(page);
  await page.close();
  const loadAfter = load();
  const totals = rounds.map((r) => r.total).filter((x) => x != null);
  const res = {
    transport, channel, started, loadBefore, loadAfter, clockStart, clockEnd,
    published: ok.length, publishFailed: pubs.length - ok.length,
    publishFailures: pubs.filter((p) => !p.ok).slice(0, 10).map((p) => ({ seq: p.seq, node: p.node, status: p.status, error: p.error })),
    kills: rounds.length, total: summary(totals),
    detect: summary(rounds.map((r) => r.detect).filter((x) => x != null)),
    backoff: summary(rounds.map((r) => r.backoff).filter((x) => x != null)),
    connect: summary(rounds.map((r) => r.connect).filter((x) => x != null)),
    firstMsg: summary(rounds.map((r) => r.firstMsg).filter((x) => x != null)),
    exactness: exactness(recs.map((r) => parse(r).seq), ok.map((p) => p.seq)),
    resets: resets.length, errors, rounds,
    states: states.length,
  };
  log(`${transport}: kill → receiving median ${f(res.total.p50)} ms (min ${f(res.total.min)}, max ${f(res.total.max)}),`,
    `${res.exactness.exact ? 'every message exactly once, in order' : 'NOT EXACT ' + JSON.stringify(res.exactness)}; load ${loadBefore} → ${loadAfter}`);
  return res;
}

// ---- run ----------------------------------------------------------------------------

const report = {
  date: new Date().toISOString(), chromium: browserVersion, node: process.version,
  rate: RATE, messages: MESSAGES, warmup: WARMUP, kills: KILLS, intervalMs: INTERVAL,
  nodes: nodes.map((n) => ({ name: n.name, url: n.url })), latency: [], kill: [],
};
let failed = false;
try {
  for (const n of nodes) if (!(await ready(n, 15000))) throw new Error(`node ${n.name} (${n.url}) is not ready`);
  if (PHASES.includes('latency')) for (const t of TRANSPORTS) report.latency.push(await latencyRun(t));
  if (PHASES.includes('kill')) for (const t of TRANSPORTS) report.kill.push(await killRun(t));
} catch (e) {
  failed = true;
  log('failed:', (e && e.stack) || e);
} finally {
  await context.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
}
if (a.json) writeFileSync(a.json, JSON.stringify(report, null, 1) + '\n');

// The tables, as they go into RESULTS.md.
const out = [];
if (report.latency.length) {
  out.push(`publish → DOM, ${MESSAGES} messages per transport (after ${WARMUP} warm-up), ${RATE} msg/s, one publish in flight:`, '');
  out.push('| transport | p50 ms | p90 ms | p99 ms | max ms | mean ms | → next frame p50 / p99 ms | lost | duplicated | out of order | publish RTT p50 / p99 ms | load 1-min before → after |');
  out.push('|---|---|---|---|---|---|---|---|---|---|---|---|');
  for (const r of report.latency) {
    const x = r.exactness;
    out.push(`| ${r.transport} | ${f(r.dom.p50, 2)} | ${f(r.dom.p90, 2)} | ${f(r.dom.p99, 2)} | ${f(r.dom.max, 2)} | ${f(r.dom.mean, 2)} | ${f(r.frame.p50, 1)} / ${f(r.frame.p99, 1)} | ${x.missing} | ${x.duplicates} | ${x.outOfOrder} | ${f(r.publishRtt.p50, 2)} / ${f(r.publishRtt.p99, 2)} | ${r.loadBefore.split(' ')[0]} → ${r.loadAfter.split(' ')[0]} |`);
  }
  out.push('');
  for (const r of report.latency) {
    out.push(`${r.transport}: ${r.exactness.rendered} rendered of ${r.exactness.expected}; publish failures ${r.publishFailed}; publisher late p99 ${f(r.publishLate.p99, 2)} ms, max ${f(r.publishLate.max, 2)} ms; reconnects ${r.reconnects}; clock offset (hi-res − Date.now) node ${r.clockStart.node}→${r.clockEnd.node} ms, page ${r.clockStart.page}→${r.clockEnd.page} ms, latencies corrected by ${f(-r.clockCorrection, 2)} ms`);
  }
  out.push('');
}
if (report.kill.length) {
  out.push(`SIGKILL of the page's node → first message from the new connection in the DOM, ${KILLS} kills per transport, a message every ${INTERVAL} ms:`, '');
  out.push('| transport | median ms | min ms | max ms | detect (kill → reconnecting) median | backoff drawn median (min–max) | connecting → open median | open → first message median | every message once, in order |');
  out.push('|---|---|---|---|---|---|---|---|---|');
  for (const r of report.kill) {
    const x = r.exactness;
    const exact = x.exact ? `yes (${x.rendered} of ${x.expected})` : `NO: ${x.rendered}/${x.expected}, missing ${x.missing}, dup ${x.duplicates}, out of order ${x.outOfOrder}`;
    out.push(`| ${r.transport} | ${f(r.total.p50)} | ${f(r.total.min)} | ${f(r.total.max)} | ${f(r.detect.p50)} | ${f(r.backoff.p50, 0)} (${f(r.backoff.min, 0)}–${f(r.backoff.max, 0)}) | ${f(r.connect.p50)} | ${f(r.firstMsg.p50)} | ${exact} |`);
  }
  out.push('');
  for (const r of report.kill) {
    out.push(`${r.transport} (${r.kills} kills; load ${r.loadBefore} → ${r.loadAfter}; publish failures ${r.publishFailed}; resets ${r.resets}):`);
    for (const k of r.rounds) {
      out.push(`  ${k.k}: ${k.killed}→${k.to} total ${f(k.total)} = detect ${f(k.detect)} + waited ${f(k.waited)} (drawn ${k.backoff}) + connect ${f(k.connect)} + first ${f(k.firstMsg)}; attempts ${k.attempts}; ${k.errors.join(',')}; first #${k.firstSeq} (${f(k.firstAge)} ms after its publish), ${k.caughtUp} caught up; restart ready ${f(k.restartReady)} ms`);
    }
  }
}
console.log(out.join('\n'));
process.exit(failed ? 1 : 0);
