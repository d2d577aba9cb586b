// Long-poll delivery: VUS subscribers loop `GET /poll?channel=&cursor=&timeout=`,
// passing back the returned cursor, while a publisher scenario publishes RATE timed
// messages per second with `POST /publish/{channel}`; each subscriber measures
// publish -> receive latency and checks that no answer says `reset`.
//
//   k6 run -e BASE_URL=http://127.0.0.1:8080 -e VUS=100 -e RATE=20 -e DURATION=10s \
//       loadtest/k6/long_poll.js
//
// Env: BASE_URL, CHANNEL (default: a fresh name per run), VUS (subscribers, 10),
// DURATION (publishing time, 10s), RATE (messages/s, 10), API_KEY, POLL_TIMEOUT
// (seconds a poll may be held, 5), SETTLE (2s), DRAIN (2s), PAYLOAD_BYTES (100),
// LATENCY_P99_MS (threshold, 100), PUBLISH_VUS (5).
//
// Every subscriber should get every message: expect
// poll_messages_received == poll_published x VUS, poll_duplicates == 0, poll_resets == 0.

import http from 'k6/http';
import { check } from 'k6';
import exec from 'k6/execution';
import { Counter, Trend } from 'k6/metrics';
import {
  BASE_URL,
  envDurationMs,
  envInt,
  envNumber,
  ms,
  padding,
  parseTimed,
  publishTimed,
  runChannel,
  jsonOrNull,
} from './lib/common.js';

const VUS = envInt('VUS', 10);
const RATE = envInt('RATE', 10);
const DURATION_MS = envDurationMs('DURATION', '10s');
const SETTLE_MS = envDurationMs('SETTLE', '2s');
const DRAIN_MS = envDurationMs('DRAIN', '2s');
const POLL_TIMEOUT_S = envNumber('POLL_TIMEOUT', 5);
const PAYLOAD_BYTES = envNumber('PAYLOAD_BYTES', 100);
const LATENCY_P99_MS = envNumber('LATENCY_P99_MS', 100);
const PUBLISH_VUS = envInt('PUBLISH_VUS', 5);
/** Subscribers poll until this long after the start of the test. */
const HOLD_MS = SETTLE_MS + DURATION_MS + DRAIN_MS;

const latency = new Trend('poll_delivery_latency', true);
const received = new Counter('poll_messages_received');
const published = new Counter('poll_published');
const duplicates = new Counter('poll_duplicates');
const resets = new Counter('poll_resets');
const polls = new Counter('poll_requests');

export const options = {
  scenarios: {
    subscribers: {
      executor: 'per-vu-iterations',
      exec: 'subscriber',
      vus: VUS,
      iterations: 1,
      maxDuration: ms(HOLD_MS + POLL_TIMEOUT_S * 1000 + 30000),
      gracefulStop: ms(POLL_TIMEOUT_S * 1000 + 10000),
    },
    publisher: {
      executor: 'constant-arrival-rate',
      exec: 'publisher',
      rate: RATE,
      timeUnit: '1s',
      duration: ms(DURATION_MS),
      startTime: ms(SETTLE_MS),
      preAllocatedVUs: PUBLISH_VUS,
      maxVUs: PUBLISH_VUS * 4,
    },
  },
  thresholds: {
    poll_delivery_latency: [`p(99)<${LATENCY_P99_MS}`],
    poll_messages_received: ['count>0'],
    poll_resets: ['count==0'],
    poll_duplicates: ['count==0'],
    'http_req_failed{name:GET /poll}': ['rate==0'],
    checks: ['rate==1'],
  },
  summaryTrendStats: ['avg', 'min', 'med', 'max', 'p(90)', 'p(95)', 'p(99)'],
};

export function setup() {
  return { channel: runChannel('k6-poll') };
}

/** One poll; returns the parsed body, or null when the request failed. */
function poll(channel, cursor, timeoutS) {
  let url = `${BASE_URL}/poll?channel=${encodeURIComponent(channel)}&timeout=${timeoutS}`;
  if (cursor) url += `&cursor=${encodeURIComponent(cursor)}`;
  const res = http.get(url, {
    timeout: `${Math.ceil(timeoutS) + 10}s`,
    // Cursors differ on every poll; one name keeps the metrics' tag sets small.
    tags: { name: 'GET /poll' },
  });
  polls.add(1);
  const body = jsonOrNull(res);
  const ok = check(res, {
    'poll: status 200': (r) => r.status === 200,
    'poll: JSON with messages and cursor': () =>
      body !== null && Array.isArray(body.messages) && typeof body.cursor === 'string',
    'poll: no reset': () => body !== null && !body.reset,
  });
  if (body !== null && body.reset) {
    resets.add(1);
    console.warn(`VU ${exec.vu.idInTest}: reset on ${JSON.stringify(body.reset_channels)}`);
  }
  return ok ? body : null;
}

export function subscriber(data) {
  const channel = data.channel;
  const deadline = exec.scenario.startTime + HOLD_MS;
  const seen = new Set();
  // The first poll answers at once and registers the channel on the node, which
  // buffers its messages between this subscriber's polls from then on.
  let body = poll(channel, null, 0);
  let cursor = body ? body.cursor : null;
  for (;;) {
    const left = deadline - Date.now();
    if (left <= 0) break;
    const timeoutS = Math.min(POLL_TIMEOUT_S, Math.max(0.1, left / 1000));
    body = poll(channel, cursor, Number(timeoutS.toFixed(3)));
    const now = Date.now();
    if (body === null) continue; // keep the old cursor and retry
    cursor = body.cursor;
    for (const m of body.messages) {
      if (m.channel !== channel) continue;
      const p = parseTimed(m.data);
      if (p === null) continue;
      if (seen.has(p.seq)) {
        duplicates.add(1);
        continue;
      }
      seen.add(p.seq);
      received.add(1);
      latency.add(now - p.t);
    }
  }
}

export function publisher(data) {
  publishTimed(data.channel, padding(PAYLOAD_BYTES), published);
}
