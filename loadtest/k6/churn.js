// Connection churn: VUS virtual users each loop over WebSocket cycles (connect,
// subscribe, wait for `subscribed`, optionally hold, close) as fast as the gateway
// answers, for DURATION. Exercises the accept path, the upgrade, hub subscribe /
// unsubscribe and the per-node Redis SUBSCRIBE/UNSUBSCRIBE (with its linger).
//
//   k6 run -e BASE_URL=http://127.0.0.1:8080 -e VUS=50 -e DURATION=30s loadtest/k6/churn.js
//
// Env: BASE_URL, CHANNEL (channel name prefix, default: a fresh one per run), CHANNELS
// (cycles spread over this many channels, 10), VUS (10), DURATION (10s), HOLD (time
// each connection stays subscribed before closing, 0ms), CYCLE_TIMEOUT (longest wait
// for `subscribed`, 5s), PAUSE (sleep between cycles, 0ms), SUBSCRIBE_P99_MS
// (threshold on connect -> subscribed p99, 200), MAX_FAILED_RATE (0).
//
// Many short connections leave the client side's sockets in TIME_WAIT (60 s on
// Linux): about 28k cycles per minute per source address is the ceiling.

import { WebSocket } from 'k6/experimental/websockets';
import { check } from 'k6';
import exec from 'k6/execution';
import { Counter, Rate, Trend } from 'k6/metrics';
import { envDurationMs, envInt, envNumber, ms, runChannel, wsUrl } from './lib/common.js';

const VUS = envInt('VUS', 10);
const DURATION_MS = envDurationMs('DURATION', '10s');
const CHANNELS = envInt('CHANNELS', 10);
const HOLD_MS = envDurationMs('HOLD', '0ms');
const CYCLE_TIMEOUT_MS = envDurationMs('CYCLE_TIMEOUT', '5s');
const PAUSE_MS = envDurationMs('PAUSE', '0ms');
const SUBSCRIBE_P99_MS = envNumber('SUBSCRIBE_P99_MS', 200);
const MAX_FAILED_RATE = envNumber('MAX_FAILED_RATE', 0);

const cycleFailed = new Rate('churn_cycle_failed');
const cycles = new Counter('churn_cycles');
const subscribeTime = new Trend('churn_subscribe_time', true);

export const options = {
  scenarios: {
    churn: {
      executor: 'constant-vus',
      exec: 'cycle',
      vus: VUS,
      duration: ms(DURATION_MS),
      gracefulStop: ms(CYCLE_TIMEOUT_MS + HOLD_MS + 5000),
    },
  },
  thresholds: {
    churn_cycle_failed: [`rate<=${MAX_FAILED_RATE}`],
    churn_subscribe_time: [`p(99)<${SUBSCRIBE_P99_MS}`],
    churn_cycles: ['count>0'],
    checks: [`rate>=${1 - MAX_FAILED_RATE}`],
  },
  summaryTrendStats: ['avg', 'min', 'med', 'max', 'p(90)', 'p(95)', 'p(99)'],
};

export function setup() {
  return { prefix: runChannel('k6-churn') };
}

export function cycle(data) {
  const channel = `${data.prefix}-${(exec.vu.idInTest + exec.vu.iterationInScenario) % CHANNELS}`;
  const started = Date.now();
  let outcome = null; // null while the cycle runs, then 'ok' or why it failed
  let timer = null;

  const ws = new WebSocket(wsUrl('/ws'));
  const finish = (result) => {
    if (outcome !== null) return;
    outcome = result;
    if (timer !== null) clearTimeout(timer);
    const ok = result === 'ok';
    if (!ok) console.warn(`VU ${exec.vu.idInTest}: churn cycle failed: ${result}`);
    cycles.add(1);
    cycleFailed.add(!ok);
    check(null, { 'churn: connect, subscribe, close': () => ok });
    ws.close();
    // Keeps the iteration (and so this VU) idle before its next cycle.
    if (PAUSE_MS > 0) setTimeout(() => {}, PAUSE_MS);
  };
  timer = setTimeout(() => finish(`no "subscribed" within ${CYCLE_TIMEOUT_MS} ms`), CYCLE_TIMEOUT_MS);

  ws.addEventListener('open', () => {
    ws.send(JSON.stringify({ op: 'subscribe', channels: [channel] }));
  });
  ws.addEventListener('message', (e) => {
    let frame = null;
    try {
      frame = JSON.parse(e.data);
    } catch (_) {
      frame = null;
    }
    if (frame !== null && frame.type === 'subscribed') {
      const ok = Array.isArray(frame.channels) && frame.channels.length === 1 && frame.channels[0] === channel;
      if (!ok) return finish(`unexpected subscribed frame ${e.data}`);
      subscribeTime.add(Date.now() - started);
      clearTimeout(timer);
      if (HOLD_MS > 0) timer = setTimeout(() => finish('ok'), HOLD_MS);
      else finish('ok');
    } else if (frame === null || frame.type === 'error') {
      finish(`server said ${e.data}`);
    }
  });
  ws.addEventListener('close', () => finish('closed by the server before the cycle completed'));
  ws.addEventListener('error', (e) => finish(`WebSocket error: ${e.error}`));
}
