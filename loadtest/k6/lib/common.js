// Shared helpers for the k6 scripts in loadtest/k6: environment parsing, URLs, the
// timed publisher and payload decoding. Imported by each script; not a test itself.

import http from 'k6/http';
import { check } from 'k6';
import exec from 'k6/execution';

/** Gateway base URL without a trailing slash, e.g. http://127.0.0.1:8080. */
export const BASE_URL = (__ENV.BASE_URL || 'http://127.0.0.1:8080').replace(/\/+$/, '');

/** The WebSocket URL for a path on the gateway (http -> ws, https -> wss). */
export function wsUrl(path) {
  return BASE_URL.replace(/^http/, 'ws') + path;
}

/** A non-negative number from the environment, or `def`. Fails the script on junk. */
export function envNumber(name, def) {
  const raw = __ENV[name];
  if (raw === undefined || raw === '') return def;
  const n = Number(raw);
  if (!Number.isFinite(n) || n < 0) {
    throw new Error(`${name} must be a non-negative number, got ${JSON.stringify(raw)}`);
  }
  return n;
}

/** A positive integer from the environment, or `def`. */
export function envInt(name, def) {
  const n = envNumber(name, def);
  if (!Number.isInteger(n) || n < 1) {
    throw new Error(`${name} must be a positive integer, got ${JSON.stringify(__ENV[name])}`);
  }
  return n;
}

/**
 * A duration from the environment in milliseconds: k6 style (`10s`, `500ms`, `1m30s`)
 * or a bare number of seconds.
 */
export function envDurationMs(name, def) {
  const raw = __ENV[name] === undefined || __ENV[name] === '' ? def : __ENV[name];
  if (/^\d+(\.\d+)?$/.test(raw)) return Math.round(Number(raw) * 1000);
  const re = /(\d+(?:\.\d+)?)(ms|s|m|h)/g;
  const unit = { ms: 1, s: 1000, m: 60000, h: 3600000 };
  let total = 0;
  let consumed = 0;
  let m;
  while ((m = re.exec(raw)) !== null) {
    total += Number(m[1]) * unit[m[2]];
    consumed += m[0].length;
  }
  if (consumed === 0 || consumed !== raw.length) {
    throw new Error(`${name} must be a duration like 10s, 500ms or 1m30s, got ${JSON.stringify(raw)}`);
  }
  return Math.round(total);
}

/** Milliseconds as a k6 duration string. */
export function ms(n) {
  return `${Math.max(0, Math.round(n))}ms`;
}

/** Headers carrying the API key, when API_KEY is set. */
export function authHeaders(extra) {
  const h = Object.assign({}, extra || {});
  if (__ENV.API_KEY) h['X-API-Key'] = __ENV.API_KEY;
  return h;
}

/** The channel for this run: CHANNEL, or a fresh name so runs don't see each other. */
export function runChannel(prefix) {
  return __ENV.CHANNEL || `${prefix}-${Date.now().toString(36)}-${Math.floor(Math.random() * 1e6)}`;
}

/** Padding so payloads reach PAYLOAD_BYTES (the timing fields alone take ~30 bytes). */
export function padding(payloadBytes) {
  return payloadBytes > 40 ? 'x'.repeat(payloadBytes - 40) : '';
}

/** The response body as JSON, or null when it is not JSON. */
export function jsonOrNull(res) {
  try {
    return res.json();
  } catch (_) {
    return null;
  }
}

/**
 * Publishes one timed message with `POST /publish/{channel}`: the raw body is
 * `{"t":<ms since the epoch>,"seq":<n>,"pad":"..."}`. Returns whether it succeeded.
 * `okCounter` counts successful publishes.
 */
export function publishTimed(channel, pad, okCounter) {
  const seq = exec.scenario.iterationInTest;
  const body = JSON.stringify({ t: Date.now(), seq: seq, pad: pad });
  const res = http.post(`${BASE_URL}/publish/${encodeURIComponent(channel)}`, body, {
    headers: authHeaders({ 'Content-Type': 'text/plain' }),
    tags: { name: 'POST /publish/{channel}' },
  });
  const json = jsonOrNull(res);
  const ok = check(res, {
    'publish: status 200': (r) => r.status === 200,
    'publish: answer names the channel and an id': () =>
      json !== null && json.channel === channel && typeof json.id === 'string',
    'publish: someone was subscribed': () => json !== null && json.subscribed === true,
  });
  if (res.status === 200 && okCounter) okCounter.add(1);
  return ok;
}

/**
 * The `{t, seq}` of a payload published by `publishTimed`, or null for anything else
 * (e.g. a message somebody else published to the channel).
 */
export function parseTimed(data) {
  if (typeof data !== 'string' || data.charAt(0) !== '{') return null;
  try {
    const p = JSON.parse(data);
    return typeof p.t === 'number' && typeof p.seq === 'number' ? p : null;
  } catch (_) {
    return null;
  }
}
