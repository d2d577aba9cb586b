// HTTP publish throughput: publishes at a constant arrival rate (open loop: k6 starts
// RATE requests per second whatever the response times) with `POST /api/publish`,
// checks every answer and holds thresholds on failures and p99 response time.
//
//   k6 run -e BASE_URL=http://127.0.0.1:8080 -e RATE=500 -e DURATION=30s \
//       loadtest/k6/http_publish.js
//
// Env: BASE_URL, CHANNEL (channel name prefix, default: a fresh one per run),
// CHANNELS (publish round-robin over this many channels, 10), FANOUT (channels per
// request, via "channels":[...], 1), RATE (requests/s, 100), DURATION (10s), VUS
// (pre-allocated VUs, 10), MAX_VUS (VUS x 4), API_KEY, PAYLOAD_BYTES (100),
// P99_MS (threshold on http_req_duration p99, 100), MAX_FAILED_RATE (0.01).
//
// Nobody subscribes here: this measures the publish path (HTTP -> history -> Redis).
// `dropped_iterations` above 0 means k6 ran out of VUs to keep the rate (raise VUS).

import http from 'k6/http';
import { check } from 'k6';
import exec from 'k6/execution';
import { Counter } from 'k6/metrics';
import {
  BASE_URL,
  authHeaders,
  envDurationMs,
  envInt,
  envNumber,
  jsonOrNull,
  ms,
  padding,
  runChannel,
} from './lib/common.js';

const RATE = envInt('RATE', 100);
const DURATION_MS = envDurationMs('DURATION', '10s');
const VUS = envInt('VUS', 10);
const MAX_VUS = envInt('MAX_VUS', VUS * 4);
const CHANNELS = envInt('CHANNELS', 10);
const FANOUT = Math.min(envInt('FANOUT', 1), CHANNELS);
const PAYLOAD_BYTES = envNumber('PAYLOAD_BYTES', 100);
const P99_MS = envNumber('P99_MS', 100);
const MAX_FAILED_RATE = envNumber('MAX_FAILED_RATE', 0.01);

const publishedMessages = new Counter('publish_messages');

export const options = {
  scenarios: {
    publish: {
      executor: 'constant-arrival-rate',
      exec: 'publish',
      rate: RATE,
      timeUnit: '1s',
      duration: ms(DURATION_MS),
      preAllocatedVUs: VUS,
      maxVUs: MAX_VUS,
    },
  },
  thresholds: {
    http_req_failed: [`rate<=${MAX_FAILED_RATE}`],
    http_req_duration: [`p(99)<${P99_MS}`],
    checks: ['rate>0.99'],
  },
  summaryTrendStats: ['avg', 'min', 'med', 'max', 'p(90)', 'p(95)', 'p(99)'],
};

export function setup() {
  return { prefix: runChannel('k6-pub') };
}

export function publish(data) {
  const n = exec.scenario.iterationInTest;
  const channels = [];
  for (let i = 0; i < FANOUT; i++) channels.push(`${data.prefix}-${(n + i) % CHANNELS}`);
  const payload = JSON.stringify({ t: Date.now(), seq: n, pad: padding(PAYLOAD_BYTES) });
  const body = FANOUT === 1 ? { channel: channels[0], data: payload } : { channels: channels, data: payload };
  const res = http.post(`${BASE_URL}/api/publish`, JSON.stringify(body), {
    headers: authHeaders({ 'Content-Type': 'application/json' }),
    tags: { name: 'POST /api/publish' },
  });
  const json = jsonOrNull(res);
  const ok = check(res, {
    'api/publish: status 200': (r) => r.status === 200,
    'api/publish: JSON results, one per channel': () =>
      json !== null && Array.isArray(json.results) && json.results.length === channels.length,
    'api/publish: every result has its channel and an id': () =>
      json !== null &&
      Array.isArray(json.results) &&
      json.results.every((r, i) => r.channel === channels[i] && typeof r.id === 'string' && r.id !== ''),
  });
  if (ok) publishedMessages.add(channels.length);
}
