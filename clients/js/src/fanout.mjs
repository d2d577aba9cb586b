// @fanout/client: a dependency-free browser client for the fanout gateway.
//
// One source file. `build.mjs` turns it into dist/fanout.mjs (this module) and
// dist/fanout.js (a plain script defining the global `fanout`). Everything below the
// two entry points, subscribe() and publish(), is exported so it can be tested in Node
// without a browser; the browser APIs the client uses (fetch, WebSocket, timers,
// storage, the `online` event) come from `env`, which tests replace.

/** Transports in the order `auto` tries them. */
export const TRANSPORTS = ['ws', 'sse', 'poll'];

const STORE_KEY = 'fanout.transport';
const FATAL_CODES = ['bad_request', 'invalid_channel', 'invalid_event', 'too_many_channels', 'forbidden', 'not_found', 'unknown_op'];

// ---- history ids ------------------------------------------------------------------

/** `"<ms>-<seq>"` (or `"0"`, the start of history) as `[ms, seq]`; null otherwise. */
export function parseId(id) {
  const m = /^(\d+)(?:-(\d+))?$/.exec(id == null ? '' : String(id));
  return m ? [+m[1], +(m[2] || 0)] : null;
}

/** Orders two ids: negative, zero or positive. Ids that do not parse sort first. */
export function compareIds(a, b) {
  const x = parseId(a), y = parseId(b);
  if (!x || !y) return (x ? 1 : 0) - (y ? 1 : 0);
  return x[0] - y[0] || x[1] - y[1];
}

/** `{news: "5-0", scores: "6-1"}` → `"news~5-0,scores~6-1"` (the SSE compound id). */
export function encodeCompound(positions) {
  return Object.keys(positions).map((ch) => ch + '~' + positions[ch]).join(',');
}

/** The inverse of encodeCompound; null when `s` is not a compound id. */
export function parseCompound(s) {
  if (typeof s !== 'string' || s.indexOf('~') < 0) return null;
  const out = {};
  for (const part of s.split(',')) {
    const i = part.lastIndexOf('~');
    if (i < 1) return null;
    out[part.slice(0, i)] = part.slice(i + 1);
  }
  return out;
}

/**
 * The starting position per channel from the `since` option: one id for every channel
 * (`"0"`: from the start of retained history), a compound id, or `{channel: id}`.
 */
export function initialPositions(channels, since) {
  const out = {};
  if (since == null || since === '') return out;
  const per = typeof since === 'object' ? since : parseCompound(since);
  for (const ch of channels) {
    const id = per ? per[ch] : since;
    if (id != null && id !== '') out[ch] = String(id);
  }
  return out;
}

/**
 * Records `msg` in `positions` and says whether to deliver it: a history message whose
 * id is not after the last one seen on its channel is a repeat (a resume overlaps what
 * was already delivered). Messages without an id are live-only and always pass.
 */
export function accept(positions, msg) {
  if (msg.id == null || !parseId(msg.id)) return true;
  const last = positions[msg.channel];
  if (last != null && compareIds(msg.id, last) <= 0) return false;
  positions[msg.channel] = msg.id;
  return true;
}

// ---- reconnect policy -------------------------------------------------------------

/** Delay before reconnect attempt `attempt` (0-based): full jitter, [0, min(max, min·2^attempt)). */
export function backoff(attempt, min, max, random = Math.random) {
  return Math.floor(random() * Math.min(max, min * Math.pow(2, attempt)));
}

/** Transports to try, in order: one fixed transport, or for `auto` the remembered one first. */
export function transportOrder(option, remembered) {
  if (option && option !== 'auto') {
    if (TRANSPORTS.indexOf(option) < 0) throw new Error('unknown transport ' + option);
    return [option];
  }
  return TRANSPORTS.indexOf(remembered) < 0 ? TRANSPORTS.slice() : [remembered].concat(TRANSPORTS.filter((t) => t !== remembered));
}

/**
 * What an HTTP status means for the connection: `token` (get a fresh token), `elsewhere`
 * (this node is going away: next node at once), `fatal` (retrying cannot help), `retry`.
 */
export function classifyStatus(status, code) {
  if (status === 401 || code === 'unauthorized') return 'token';
  if (status === 503) return 'elsewhere';
  if (status === 408 || status === 429 || status >= 500) return 'retry';
  return status >= 400 ? 'fatal' : 'retry';
}

/** The same for a WebSocket close code (1012: node restarting, 4001: token expired). */
export function classifyClose(code) {
  return code === 4001 ? 'token' : code === 1012 ? 'elsewhere' : 'retry';
}

/** The same for an SSE `event: disconnect` reason. */
export function classifyReason(reason) {
  return reason === 'token_expired' ? 'token' : reason === 'shutting_down' ? 'elsewhere' : 'retry';
}

/** A WebSocket `error` frame's code: `fatal` or `token` before the subscription is confirmed. */
export function classifyCode(code) {
  return code === 'unauthorized' ? 'token' : FATAL_CODES.indexOf(code) >= 0 ? 'fatal' : 'retry';
}

/** A JWT's `exp` in ms, or null when `token` is not a JWT with one. */
export function jwtExpiry(token) {
  try {
    const p = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const exp = JSON.parse(atob(p + '==='.slice((p.length + 3) % 4))).exp;
    return typeof exp === 'number' ? exp * 1000 : null;
  } catch (e) {
    return null;
  }
}

/** An Error with the server's error code (`err.code`) and HTTP status (`err.status`). */
export function apiError(status, body, fallback) {
  const err = new Error((body && body.message) || fallback || 'HTTP ' + status);
  err.code = (body && body.error) || (status ? 'http_' + status : 'network');
  err.status = status;
  return err;
}

// ---- SSE parser -------------------------------------------------------------------

/**
 * An event-stream parser as the HTML standard describes it: lines end with CR, LF or
 * CRLF (also split across chunks), `data:` lines join with LF, a leading BOM and one
 * space after the colon are dropped, comments are counted, `id` with NUL is ignored,
 * `retry` is kept when it is all digits. `feed(text)` returns the completed events.
 */
export class SseParser {
  constructor() {
    this.buf = '';
    this.data = null;
    this.event = '';
    this.lastId = '';
    this.retry = null;
    this.comments = 0;
    this.cr = false;
    this.bom = true;
  }

  feed(text) {
    const events = [];
    let s = this.buf + text;
    if (this.bom && s) {
      this.bom = false;
      if (s.charCodeAt(0) === 0xfeff) s = s.slice(1);
    }
    let i = 0;
    if (this.cr && s[0] === '\n') i = 1; // the LF of a CRLF split across chunks
    this.cr = false;
    for (;;) {
      const cr = s.indexOf('\r', i), lf = s.indexOf('\n', i);
      const end = cr < 0 ? lf : lf < 0 ? cr : Math.min(cr, lf);
      if (end < 0) break;
      this.line(s.slice(i, end), events);
      i = end + 1;
      if (s[end] === '\r') {
        if (i === s.length) this.cr = true;
        else if (s[i] === '\n') i++;
      }
    }
    this.buf = s.slice(i);
    return events;
  }

  line(line, events) {
    if (line === '') {
      if (this.data !== null) events.push({ event: this.event || 'message', data: this.data, id: this.lastId });
      this.data = null;
      this.event = '';
      return;
    }
    const colon = line.indexOf(':');
    if (colon === 0) {
      this.comments++;
      return;
    }
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value[0] === ' ') value = value.slice(1);
    if (field === 'data') this.data = this.data === null ? value : this.data + '\n' + value;
    else if (field === 'event') this.event = value;
    else if (field === 'id') {
      if (value.indexOf('\0') < 0) this.lastId = value;
    } else if (field === 'retry' && /^\d+$/.test(value)) this.retry = +value;
  }
}

// ---- the subscription -------------------------------------------------------------

function defaultEnv() {
  const g = typeof globalThis !== 'undefined' ? globalThis : self;
  let storage = null;
  try {
    storage = g.sessionStorage || null;
  } catch (e) { /* storage can be off (privacy settings, sandboxed frames) */ }
  return {
    fetch: g.fetch && g.fetch.bind(g),
    WebSocket: g.WebSocket,
    setTimeout: g.setTimeout.bind(g),
    clearTimeout: g.clearTimeout.bind(g),
    now: Date.now,
    random: Math.random,
    storage,
    onOnline(cb) {
      if (!g.addEventListener) return () => {};
      g.addEventListener('online', cb);
      return () => g.removeEventListener('online', cb);
    },
  };
}

function parseJson(s) {
  try {
    return JSON.parse(s);
  } catch (e) {
    return undefined;
  }
}

/** Reads an error answer's `{"error","message"}` body, if it has one. */
async function errorOf(res) {
  let body;
  try {
    body = parseJson(await res.text());
  } catch (e) { /* no body */ }
  return apiError(res.status, body);
}

const trimSlash = (u) => String(u).replace(/\/+$/, '');

/**
 * Subscribes to `channels` on the node(s) at `baseUrl` (one URL or a list to move
 * through on failure or drain) and keeps the subscription alive until `close()`:
 * reconnects with backoff, resumes every channel from its last id on any transport
 * and node, and never delivers a history message twice or out of order.
 */
export function subscribe(baseUrl, channels, opts) {
  return new Subscription(baseUrl, channels, opts || {});
}

class Subscription {
  constructor(baseUrl, channels, o) {
    const urls = (Array.isArray(baseUrl) ? baseUrl : [baseUrl]).map(trimSlash);
    if (!urls.length) throw new Error('fanout.subscribe: at least one base URL is needed');
    this.channels = Array.isArray(channels) ? channels.slice() : [channels];
    this.o = o;
    this.env = Object.assign(defaultEnv(), o.env);
    this.urls = urls;
    this.ui = 0; // current URL
    this.ti = 0; // current transport in `order`
    let remembered = null;
    try {
      remembered = this.env.storage && this.env.storage.getItem(STORE_KEY);
    } catch (e) { /* see defaultEnv */ }
    this.order = transportOrder(o.transport || 'auto', remembered);
    this.auto = this.order.length > 1;
    this.pos = initialPositions(this.channels, o.since);
    this.token = o.token || null;
    this.cursor = null; // long-poll cursor from this subscription
    this.attempt = 0;
    this.state = '';
    this.conn = null;
    this.timer = null;
    this.closed = false;
    this.offOnline = this.env.onOnline(() => {
      if (this.timer !== null) {
        this.env.clearTimeout(this.timer);
        this.timer = null;
        this.connect();
      }
    });
    this.connect();
  }

  /** The transport in use (or being tried). */
  get transport() {
    return this.order[this.ti];
  }

  /** The last id seen per channel (a copy): resume from it with the `since` option. */
  positions() {
    return Object.assign({}, this.pos);
  }

  /** Stops for good. */
  close() {
    if (this.closed) return;
    this.stop();
    this.setState('closed', {});
  }

  stop() {
    this.closed = true;
    if (this.timer !== null) this.env.clearTimeout(this.timer);
    this.timer = null;
    if (this.conn) this.conn.close();
    this.conn = null;
    this.offOnline();
  }

  setState(state, info) {
    this.state = state;
    if (this.o.onState) this.o.onState(state, info);
  }

  opt(name, dflt) {
    return this.o[name] != null ? this.o[name] : dflt;
  }

  /** The positions of this subscription's channels, for a resume. */
  resumeFrom() {
    const out = {};
    for (const ch of this.channels) if (this.pos[ch] != null) out[ch] = this.pos[ch];
    return out;
  }

  async connect() {
    this.timer = null;
    const t = this.order[this.ti], url = this.urls[this.ui];
    this.setState('connecting', { url, transport: t, attempt: this.attempt });
    if (this.tokenStale()) {
      // An expired token would be refused, and a browser cannot see why a WebSocket
      // upgrade failed: fetch a fresh one first.
      if (!(await this.refresh())) return;
    }
    if (this.closed) return;
    const conn = { closed: false, close() { this.closed = true; if (this.stop) this.stop(); } };
    this.conn = conn;
    (t === 'ws' ? openWs : t === 'sse' ? openSse : openPoll)(this, url, conn);
  }

  /** Whether the token (a JWT) expires within 5 s and getToken can replace it. */
  tokenStale() {
    const exp = this.token && this.o.getToken ? jwtExpiry(this.token) : null;
    return exp !== null && exp - this.env.now() < 5000;
  }

  async refresh() {
    try {
      this.token = await this.o.getToken();
      return !this.closed;
    } catch (e) {
      this.wait(this.attempt++, e);
      return false;
    }
  }

  /** A transport's connection is live (subscribed, or its stream started). */
  opened(conn) {
    if (conn.closed) return;
    this.attempt = 0;
    this.tokenTries = 0;
    const t = this.order[this.ti];
    if (t !== 'poll') this.cursor = null; // messages now come another way
    if (this.auto) {
      try {
        if (this.env.storage) this.env.storage.setItem(STORE_KEY, t);
      } catch (e) { /* see defaultEnv */ }
    }
    this.setState('open', { url: this.urls[this.ui], transport: t });
  }

  deliver(conn, msg) {
    if (conn.closed || !accept(this.pos, msg)) return;
    if (this.o.onMessage) this.o.onMessage({ channel: msg.channel, id: msg.id == null ? null : msg.id, event: msg.event == null ? null : msg.event, data: msg.data });
  }

  reset(conn, channel) {
    if (!conn.closed && this.o.onReset) this.o.onReset(channel);
  }

  /**
   * A connection ended; `kind` says what to do (see classifyStatus), `opened` whether it
   * had been live. Moves on to the next transport, node, token or gives up.
   */
  ended(conn, kind, opened, error) {
    if (conn.closed || this.closed) return;
    conn.closed = true;
    this.conn = null;
    if (kind === 'token' && !this.o.getToken) kind = 'fatal';
    if (kind === 'fatal') {
      error = error || apiError(0, null, 'refused');
      this.stop();
      if (this.o.onError) this.o.onError(error);
      this.setState('closed', { error });
      return;
    }
    if (kind === 'token') {
      this.ti = 0;
      const again = () => this.refresh().then((ok) => ok && this.connect());
      // A fresh token at once; one refused again and again waits like any failure.
      this.tokenTries = (this.tokenTries || 0) + 1;
      if (this.tokenTries <= 2) again();
      else this.wait(this.attempt++, error, again);
      return;
    }
    if (kind === 'retry' && !opened && this.auto && this.ti + 1 < this.order.length) {
      this.ti++; // this transport did not work here: the next one, at once
      this.connect();
      return;
    }
    if (!opened && this.auto) this.ti = 0;
    this.ui = (this.ui + 1) % this.urls.length;
    if (kind === 'elsewhere') this.wait(-1, error);
    else this.wait(this.attempt++, error);
  }

  /** Reconnects (or runs `then`) after a backoff delay; attempt -1: the node is going away, move on now. */
  wait(attempt, error, then) {
    const delay = attempt < 0
      ? Math.floor(this.env.random() * this.opt('elsewhereJitter', 250))
      : backoff(attempt, this.opt('minDelay', 500), this.opt('maxDelay', 30000), this.env.random);
    this.setState('reconnecting', { attempt: Math.max(attempt, 0) + 1, delay, error });
    this.timer = this.env.setTimeout(then || (() => this.connect()), delay);
  }
}

// ---- transports -------------------------------------------------------------------

/** WebSocket: `/ws?token=`, a `subscribe` op with `since`, `ping` ops for liveness. */
function openWs(sub, url, conn) {
  const env = sub.env;
  let ws, subscribed = false, timer = null, seen = env.now();
  const every = sub.opt('pingInterval', 15000);
  const done = (kind, error) => {
    if (conn.closed) return;
    conn.stop();
    sub.ended(conn, kind, subscribed, error);
  };
  conn.stop = () => {
    env.clearTimeout(timer);
    try {
      ws.onclose = ws.onmessage = ws.onopen = null;
      ws.close(1000);
    } catch (e) { /* already closed */ }
  };
  const tick = () => {
    if (env.now() - seen >= 2 * every) return done('retry', apiError(0, null, 'no answer to pings'));
    ws.send('{"op":"ping"}');
    timer = env.setTimeout(tick, every);
  };
  try {
    ws = new env.WebSocket(url.replace(/^http/, 'ws') + '/ws' + (sub.token ? '?token=' + encodeURIComponent(sub.token) : ''));
  } catch (e) {
    return done('retry', e);
  }
  ws.onopen = () => {
    const op = { op: 'subscribe', channels: sub.channels };
    const since = sub.resumeFrom();
    if (Object.keys(since).length) op.since = since;
    ws.send(JSON.stringify(op));
    seen = env.now();
    timer = env.setTimeout(tick, every);
  };
  ws.onmessage = (e) => {
    seen = env.now();
    const f = parseJson(e.data);
    if (!f) return;
    if (f.type === 'message') sub.deliver(conn, f);
    else if (f.type === 'subscribed') {
      if (!subscribed) {
        subscribed = true;
        sub.opened(conn);
      }
    } else if (f.type === 'reset') sub.reset(conn, f.channel);
    else if (f.type === 'error' && !subscribed) done(classifyCode(f.code), apiError(0, { error: f.code, message: f.message }));
  };
  ws.onclose = (e) => done(classifyClose(e.code), apiError(0, { error: 'closed_' + e.code, message: e.reason || 'connection closed (' + e.code + ')' }));
}

/** Query string for the subscription's channels. */
const channelQuery = (sub) => sub.channels.map((c) => 'channel=' + encodeURIComponent(c)).join('&');
const authHeaders = (sub) => (sub.token ? { Authorization: 'Bearer ' + sub.token } : {});

/** SSE over fetch: `format=json`, `last_event_id` (compound), heartbeats for liveness. */
function openSse(sub, url, conn) {
  const env = sub.env;
  const ac = new AbortController();
  let opened = false, timer = null, end = null;
  const limit = 2 * sub.opt('heartbeat', 15000);
  const done = (kind, error) => {
    if (conn.closed) return;
    conn.stop();
    sub.ended(conn, kind, opened, error);
  };
  conn.stop = () => {
    env.clearTimeout(timer);
    ac.abort();
  };
  const alive = () => {
    env.clearTimeout(timer);
    timer = env.setTimeout(() => done('retry', apiError(0, null, 'no heartbeat')), limit);
  };
  const resume = encodeCompound(sub.resumeFrom());
  const q = channelQuery(sub) + '&format=json' + (resume ? '&last_event_id=' + encodeURIComponent(resume) : '');
  alive();
  (async () => {
    const res = await env.fetch(url + '/sse?' + q, { headers: authHeaders(sub), signal: ac.signal, cache: 'no-store' });
    if (!res.ok) return done(classifyStatus(res.status), await errorOf(res));
    const reader = res.body.getReader(), dec = new TextDecoder(), parser = new SseParser();
    for (;;) {
      const r = await reader.read();
      if (r.done || conn.closed) break;
      alive();
      if (!opened) {
        opened = true;
        sub.opened(conn);
      }
      for (const ev of parser.feed(dec.decode(r.value, { stream: true }))) {
        const d = parseJson(ev.data);
        if (d && typeof d.channel === 'string' && 'data' in d) sub.deliver(conn, d);
        else if (ev.event === 'reset' && d) sub.reset(conn, d.channel);
        else if (ev.event === 'disconnect' && d) end = d;
      }
    }
    done(end ? classifyReason(end.reason) : 'retry', apiError(0, end && { error: end.reason, message: end.message }, 'stream ended'));
  })().catch((e) => done('retry', e));
}

/** Long-poll: a first poll answered at once, then held ones; `cursor`, else `since`. */
function openPoll(sub, url, conn) {
  const env = sub.env;
  let ac = null, timer = null, opened = false;
  const hold = sub.opt('pollTimeout', 25);
  const done = (kind, error) => {
    if (conn.closed) return;
    conn.stop();
    sub.ended(conn, kind, opened, error);
  };
  conn.stop = () => {
    env.clearTimeout(timer);
    if (ac) ac.abort();
  };
  (async () => {
    while (!conn.closed) {
      // Polls are short: refresh the token before it expires instead of being refused.
      if (sub.tokenStale()) return done('token');
      let q = channelQuery(sub) + '&timeout=' + (opened ? hold : 0);
      const since = encodeCompound(sub.resumeFrom());
      if (sub.cursor) q += '&cursor=' + encodeURIComponent(sub.cursor);
      else if (since) q += '&since=' + encodeURIComponent(since);
      ac = new AbortController();
      const a = ac;
      timer = env.setTimeout(() => a.abort(), (hold + 10) * 1000);
      const res = await env.fetch(url + '/poll?' + q, { headers: authHeaders(sub), signal: a.signal, cache: 'no-store' });
      if (!res.ok) return done(classifyStatus(res.status), await errorOf(res));
      const body = await res.json();
      env.clearTimeout(timer);
      if (conn.closed) return;
      if (!opened) {
        opened = true;
        sub.opened(conn);
      }
      for (const ch of (body.reset && body.reset_channels) || []) sub.reset(conn, ch);
      for (const m of body.messages || []) sub.deliver(conn, m);
      if (body.cursor) sub.cursor = body.cursor;
    }
  })().catch((e) => done('retry', e));
}

// ---- publishing -------------------------------------------------------------------

/**
 * Publishes `data` (a string; anything else is sent as JSON) to `channel` (or to a list
 * of channels) with history. Resolves to the server's answer (`{channel, id,
 * subscribed}`, or `{results: [...]}` for a list); rejects with an Error carrying the
 * server's `code` and `status`. Options: `event`, `apiKey`, `idempotencyKey`, `fetch`.
 */
export async function publish(baseUrl, channel, data, opts) {
  const o = opts || {};
  const f = o.fetch || fetch;
  const urls = (Array.isArray(baseUrl) ? baseUrl : [baseUrl]).map(trimSlash);
  const text = typeof data === 'string' ? data : JSON.stringify(data);
  const headers = {};
  if (o.apiKey) headers['X-API-Key'] = o.apiKey;
  let path, body;
  if (Array.isArray(channel)) {
    headers['Content-Type'] = 'application/json';
    path = '/api/publish';
    body = JSON.stringify({ channels: channel, data: text, event: o.event || undefined, idempotency_key: o.idempotencyKey || undefined });
  } else {
    headers['Content-Type'] = 'text/plain;charset=utf-8';
    if (o.idempotencyKey) headers['Idempotency-Key'] = o.idempotencyKey;
    path = '/publish/' + encodeURIComponent(channel) + (o.event ? '?event=' + encodeURIComponent(o.event) : '');
    body = text;
  }
  let err;
  for (const url of urls) {
    let res;
    try {
      res = await f(url + path, { method: 'POST', headers, body });
    } catch (e) {
      err = apiError(0, null, 'network error: ' + e.message);
      continue; // this node is unreachable: the next one
    }
    if (res.ok) return res.json();
    err = await errorOf(res);
    if (res.status !== 503) break;
  }
  throw err;
}
