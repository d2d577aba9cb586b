// WebSocket fan-out latency: VUS subscribers hold one WebSocket each on one channel
// while a publisher scenario publishes RATE timed messages per second with
// `POST /publish/{channel}`; every subscriber measures publish -> receive latency.
//
//   k6 run -e BASE_URL=http://127.0.0.1:8080 -e VUS=200 -e RATE=20 -e DURATION=10s \
//       loadtest/k6/ws_latency.js
//
// Env: BASE_URL, CHANNEL (default: a fresh name per run), VUS (subscribers, 10),
// DURATION (publishing time, 10s), RATE (messages/s, 10), API_KEY, SETTLE (time for
// subscribers to connect before publishing starts, 2s), DRAIN (time subscribers stay
// after the last publish, 2s), PAYLOAD_BYTES (100), LATENCY_P99_MS (threshold, 50),
// PUBLISH_VUS (pre-allocated publisher VUs, 5).
//
// Every subscriber should get every message: expect
// ws_messages_received == ws_published x VUS and ws_duplicates == 0.

import { WebSocket } from 'k6/experimental/websockets';
import { check } from 'k6';
import exec from 'k6/execution';
import { Counter, Rate, Trend } from 'k6/metrics';
import {
  envDurationMs,
  envInt,
  envNumber,
  ms,
  padding,
  parseTimed,
  publishTimed,
  runChannel,
  wsUrl,
} from './lib/common.js';

const VUS = envInt('VUS', 10);
const RATE = envInt('RATE', 10);
const DURATION_MS = envDurationMs('DURATION', '10s');
const SETTLE_MS = envDurationMs('SETTLE', '2s');
const DRAIN_MS = envDurationMs('DRAIN', '2s');
const PAYLOAD_BYTES = envNumber('PAYLOAD_BYTES', 100);
const LATENCY_P99_MS = envNumber('LATENCY_P99_MS', 50);
const PUBLISH_VUS = envInt('PUBLISH_VUS', 5);
/** How long each subscriber holds its socket, from the start of the test. */
const HOLD_MS = SETTLE_MS + DURATION_MS + DRAIN_MS;

const latency = new Trend('ws_delivery_latency', true);
const subscribeTime = new Trend('ws_subscribe_time', true);
const received = new Counter('ws_messages_received');
const published = new Counter('ws_published');
const duplicates = new Counter('ws_duplicates');
const subscribed = new Counter('ws_subscribed');
const wsErrors = new Counter('ws_errors');
const unexpectedFrames = new Counter('ws_unexpected_frames');
const subscribeOk = new Rate('ws_subscribe_ok');

export const options = {
  scenarios: {
    subscribers: {
      executor: 'per-vu-iterations',
      exec: 'subscriber',
      vus: VUS,
      iterations: 1,
      maxDuration: ms(HOLD_MS + 30000),
      gracefulStop: '10s',
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
    ws_delivery_latency: [`p(99)<${LATENCY_P99_MS}`],
    ws_subscribe_ok: ['rate==1'],
    ws_errors: ['count==0'],
    ws_duplicates: ['count==0'],
    ws_messages_received: ['count>0'],
    checks: ['rate==1'],
  },
  summaryTrendStats: ['avg', 'min', 'med', 'max', 'p(90)', 'p(95)', 'p(99)'],
};

export function setup() {
  return { channel: runChannel('k6-ws') };
}

export function subscriber(data) {
  const channel = data.channel;
  const deadline = exec.scenario.startTime + HOLD_MS;
  const seen = new Set();
  const opened = Date.now();
  let gotSubscribed = false;
  let closing = false;

  const ws = new WebSocket(wsUrl('/ws'));

  ws.addEventListener('open', () => {
    ws.send(JSON.stringify({ op: 'subscribe', channels: [channel] }));
    ws.addEventListener('message', (e) => {
      const now = Date.now();
      let frame;
      try {
        frame = JSON.parse(e.data);
      } catch (_) {
        unexpectedFrames.add(1);
        return;
      }
      if (frame.type === 'message') {
        if (frame.channel !== channel) return;
        const p = parseTimed(frame.data);
        if (p === null) return;
        if (seen.has(p.seq)) {
          duplicates.add(1);
          return;
        }
        seen.add(p.seq);
        received.add(1);
        latency.add(now - p.t);
      } else if (frame.type === 'subscribed') {
        gotSubscribed = true;
        subscribed.add(1);
        subscribeTime.add(now - opened);
      } else if (frame.type === 'error' || frame.type === 'reset') {
        console.warn(`VU ${exec.vu.idInTest}: ${e.data}`);
        unexpectedFrames.add(1);
        wsErrors.add(1);
      }
    });
    ws.addEventListener('close', () => {
      if (!closing) {
        console.warn(`VU ${exec.vu.idInTest}: server closed the WebSocket early`);
        wsErrors.add(1);
      }
    });
    // Hold the socket until everything was published and delivered.
    setTimeout(() => {
      closing = true;
      subscribeOk.add(gotSubscribed);
      check(null, { 'ws: subscribed': () => gotSubscribed });
      ws.close();
    }, Math.max(0, deadline - Date.now()));
  });

  ws.addEventListener('error', (e) => {
    console.warn(`VU ${exec.vu.idInTest}: WebSocket error: ${e.error}`);
    wsErrors.add(1);
    if (!gotSubscribed && !closing) {
      closing = true;
      subscribeOk.add(false);
    }
  });
}

export function publisher(data) {
  publishTimed(data.channel, padding(PAYLOAD_BYTES), published);
}
