// Stand-ins for the browser APIs the client takes from `env`, for the unit tests
// (kept outside test/ so `node --test clients/js/test/` runs only tests).

/** Manual timers: nothing fires until `advance`. */
export class Clock {
  constructor() {
    this.t = 0;
    this.timers = new Map();
    this.next = 1;
    this.setTimeout = (fn, ms) => {
      const id = this.next++;
      this.timers.set(id, { at: this.t + ms, fn, ms });
      return id;
    };
    this.clearTimeout = (id) => this.timers.delete(id);
    this.now = () => this.t;
  }

  /** Delays of the pending timers. */
  pending() {
    return [...this.timers.values()].map((t) => t.ms);
  }

  /** Moves time forward, firing due timers in order. */
  advance(ms) {
    const end = this.t + ms;
    for (;;) {
      const due = [...this.timers.entries()].filter(([, t]) => t.at <= end).sort((a, b) => a[1].at - b[1].at)[0];
      if (!due) break;
      this.timers.delete(due[0]);
      this.t = due[1].at;
      due[1].fn();
    }
    this.t = end;
  }
}

/** A WebSocket the test plays the server of. */
export function fakeWebSocket() {
  const sockets = [];
  class FakeWS {
    constructor(url) {
      this.url = url;
      this.sent = [];
      sockets.push(this);
    }
    send(s) {
      this.sent.push(JSON.parse(s));
    }
    close(code) {
      this.closedWith = code;
    }
    // The server side:
    open() {
      this.onopen && this.onopen();
    }
    frame(obj) {
      this.onmessage && this.onmessage({ data: JSON.stringify(obj) });
    }
    serverClose(code, reason = '') {
      this.onclose && this.onclose({ code, reason });
    }
  }
  return { WebSocket: FakeWS, sockets };
}

/** A fetch the test answers: each call waits until the test responds or streams. */
export function fakeFetch() {
  const calls = [];
  const fetch = (url, init = {}) =>
    new Promise((resolve, reject) => {
      const call = { url, init, resolve, reject };
      init.signal && init.signal.addEventListener('abort', () => reject(new DOMException('aborted', 'AbortError')));
      call.json = (status, body) => resolve(new Response(JSON.stringify(body), { status, headers: { 'content-type': 'application/json' } }));
      call.stream = () => {
        let ctl;
        const body = new ReadableStream({ start: (c) => (ctl = c) });
        init.signal && init.signal.addEventListener('abort', () => ctl.error(new DOMException('aborted', 'AbortError')));
        resolve(new Response(body, { status: 200, headers: { 'content-type': 'text/event-stream' } }));
        const enc = new TextEncoder();
        return { push: (text) => ctl.enqueue(enc.encode(text)), end: () => ctl.close(), fail: () => ctl.error(new TypeError('network error')) };
      };
      call.fail = () => reject(new TypeError('Failed to fetch'));
      calls.push(call);
    });
  return { fetch, calls };
}

/** Storage with the Web Storage interface. */
export function memoryStorage() {
  const m = new Map();
  return { getItem: (k) => (m.has(k) ? m.get(k) : null), setItem: (k, v) => m.set(k, String(v)), map: m };
}

/** Lets pending promise callbacks (fetch answers, stream reads) run. */
export const flush = async () => {
  for (let i = 0; i < 10; i++) await new Promise((r) => setImmediate(r));
};

/** A complete env for `subscribe(..., {env})`, with everything observable. */
export function fakeEnv(extra = {}) {
  const clock = new Clock();
  const ws = fakeWebSocket();
  const http = fakeFetch();
  const storage = memoryStorage();
  let online = () => {};
  const env = {
    fetch: http.fetch,
    WebSocket: ws.WebSocket,
    setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout,
    now: clock.now,
    random: () => 0.5,
    storage,
    onOnline: (cb) => {
      online = cb;
      return () => (online = () => {});
    },
    ...extra,
  };
  return { env, clock, sockets: ws.sockets, calls: http.calls, storage, goOnline: () => online() };
}

/** Records the callbacks of a subscription. */
export function recorder() {
  const r = { messages: [], states: [], resets: [], errors: [] };
  r.opts = {
    onMessage: (m) => r.messages.push(m),
    onState: (s, info) => r.states.push([s, info]),
    onReset: (c) => r.resets.push(c),
    onError: (e) => r.errors.push(e),
  };
  return r;
}
