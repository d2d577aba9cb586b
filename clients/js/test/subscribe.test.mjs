// The subscription's behaviour with fake transports: fallback and its memory, resume on
// every transport, duplicate dropping, reconnect policy, tokens, permanent errors.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { subscribe, publish } from '../src/fanout.mjs';
import { fakeEnv, flush, recorder } from '../test-support/fakes.mjs';

const A = 'http://a.test', B = 'http://b.test';
const params = (url) => new URL(url).searchParams;
const jwt = (exp) => `${Buffer.from('{"alg":"HS256"}').toString('base64url')}.${Buffer.from(JSON.stringify({ exp })).toString('base64url')}.sig`;

test('auto: a refused WebSocket falls back to SSE at once, and the next subscription remembers it', async () => {
  const f = fakeEnv();
  const r = recorder();
  const sub = subscribe(A, ['news'], { ...r.opts, env: f.env });
  assert.equal(f.sockets.length, 1);
  assert.equal(f.sockets[0].url, 'ws://a.test/ws');
  f.sockets[0].serverClose(1006); // refused before it opened (a proxy, an origin check)
  assert.equal(f.calls.length, 1, 'SSE is tried at once, without a backoff');
  assert.match(f.calls[0].url, /^http:\/\/a\.test\/sse\?channel=news&format=json$/);
  const s = f.calls[0].stream();
  s.push('retry: 2000\n: ok\n\n');
  await flush();
  assert.deepEqual(r.states.map((x) => x[0]), ['connecting', 'connecting', 'open']);
  assert.equal(r.states[2][1].transport, 'sse');
  assert.equal(f.storage.getItem('fanout.transport'), 'sse');
  sub.close();
  assert.equal(r.states.at(-1)[0], 'closed');

  // Same storage: SSE first now.
  const f2 = fakeEnv({ storage: f.storage });
  const sub2 = subscribe(A, ['news'], { env: f2.env });
  assert.equal(f2.sockets.length, 0);
  assert.equal(f2.calls.length, 1);
  assert.equal(sub2.transport, 'sse');
  sub2.close();
});

test('auto: when every transport fails on a node, the next node after a backoff', async () => {
  const f = fakeEnv();
  const r = recorder();
  const sub = subscribe([A, B], ['news'], { ...r.opts, env: f.env, minDelay: 1000 });
  f.sockets[0].serverClose(1006);
  f.calls[0].fail(); // SSE: network error
  await flush();
  assert.equal(f.calls.length, 2, 'then long-poll');
  assert.equal(params(f.calls[1].url).get('timeout'), '0', 'the first poll is answered at once');
  f.calls[1].fail();
  await flush();
  assert.deepEqual(r.states.at(-1), ['reconnecting', { attempt: 1, delay: 500, error: r.states.at(-1)[1].error }]);
  f.clock.advance(499);
  assert.equal(f.sockets.length, 1);
  f.clock.advance(1);
  assert.equal(f.sockets.length, 2, 'WebSocket again');
  assert.equal(f.sockets[1].url, 'ws://b.test/ws', 'on the next node');
  sub.close();
});

test('WebSocket: resumes every channel from its last id on the next node; repeats are dropped', () => {
  const f = fakeEnv();
  const r = recorder();
  const sub = subscribe([A, B], ['news', 'scores'], { ...r.opts, env: f.env, transport: 'ws', since: { scores: '3-0' } });
  const ws = f.sockets[0];
  ws.open();
  assert.deepEqual(ws.sent[0], { op: 'subscribe', channels: ['news', 'scores'], since: { scores: '3-0' } });
  ws.frame({ type: 'subscribed', channels: ['news', 'scores'], recovered: true });
  ws.frame({ type: 'message', channel: 'scores', id: '3-0', event: null, data: 'old' }); // not after since
  ws.frame({ type: 'message', channel: 'news', id: '10-0', event: null, data: 'n1' });
  ws.frame({ type: 'message', channel: 'scores', id: '4-0', event: 'goal', data: 's1' });
  ws.frame({ type: 'message', channel: 'news', id: null, event: null, data: 'raw' });
  ws.serverClose(1006);
  assert.equal(r.states.at(-1)[0], 'reconnecting');
  f.clock.advance(r.states.at(-1)[1].delay);
  const ws2 = f.sockets[1];
  assert.equal(ws2.url, 'ws://b.test/ws');
  ws2.open();
  assert.deepEqual(ws2.sent[0].since, { news: '10-0', scores: '4-0' });
  ws2.frame({ type: 'subscribed', channels: ['news', 'scores'], recovered: true });
  ws2.frame({ type: 'message', channel: 'news', id: '10-0', event: null, data: 'n1' }); // overlap
  ws2.frame({ type: 'message', channel: 'news', id: '11-0', event: null, data: 'n2' });
  ws2.frame({ type: 'reset', channel: 'scores' });
  assert.deepEqual(r.messages.map((m) => m.data), ['n1', 's1', 'raw', 'n2']);
  assert.deepEqual(r.messages[1], { channel: 'scores', id: '4-0', event: 'goal', data: 's1' });
  assert.deepEqual(r.messages[2].id, null, 'a raw message has no id (not the previous one)');
  assert.deepEqual(r.resets, ['scores']);
  assert.deepEqual(sub.positions(), { news: '11-0', scores: '4-0' });
  sub.close();
  assert.equal(ws2.closedWith, 1000);
});

test('WebSocket: pings every interval, reconnects when nothing came back for two', () => {
  const f = fakeEnv();
  const r = recorder();
  const sub = subscribe(A, ['a'], { ...r.opts, env: f.env, transport: 'ws', pingInterval: 1000, minDelay: 60000 });
  const ws = f.sockets[0];
  ws.open();
  ws.frame({ type: 'subscribed', channels: ['a'], recovered: false });
  f.clock.advance(1000);
  assert.deepEqual(ws.sent.at(-1), { op: 'ping' });
  ws.frame({ type: 'pong' });
  f.clock.advance(1000);
  f.clock.advance(999);
  assert.equal(r.states.at(-1)[0], 'open', 'a pong keeps it alive, pongs are not messages');
  assert.equal(r.messages.length, 0);
  f.clock.advance(1001);
  assert.equal(r.states.at(-1)[0], 'reconnecting', 'silent for two intervals');
  assert.equal(ws.closedWith, 1000);
  sub.close();
});

test('drain: close 1012 or SSE shutting_down moves to the next node at once (small jitter)', async () => {
  const f = fakeEnv();
  const r = recorder();
  const sub = subscribe([A, B], ['a'], { ...r.opts, env: f.env, transport: 'sse', elsewhereJitter: 100 });
  const s = f.calls[0].stream();
  s.push(': ok\n\ndata: {"channel":"a","id":"7-0","event":null,"data":"x"}\n\n');
  s.push('retry: 1000\nevent: disconnect\ndata: {"reason":"shutting_down","message":"restarting"}\n\n');
  s.end();
  await flush();
  assert.deepEqual(r.states.at(-1)[0], 'reconnecting');
  assert.equal(r.states.at(-1)[1].delay, 50, 'within the jitter, not a backoff');
  f.clock.advance(50);
  assert.match(f.calls[1].url, /^http:\/\/b\.test\/sse\?/);
  assert.equal(params(f.calls[1].url).get('last_event_id'), 'a~7-0', 'resumes with the compound id');
  sub.close();

  const g = fakeEnv();
  const sub2 = subscribe([A, B], ['a'], { env: g.env, transport: 'ws', elsewhereJitter: 0 });
  g.sockets[0].open();
  g.sockets[0].frame({ type: 'subscribed', channels: ['a'], recovered: false });
  g.sockets[0].serverClose(1012, 'server restarting, reconnect');
  g.clock.advance(0);
  assert.equal(g.sockets[1].url, 'ws://b.test/ws');
  sub2.close();
});

test('a permanent 400 is reported once and not retried', async () => {
  const f = fakeEnv();
  const r = recorder();
  subscribe(A, ['bad name'], { ...r.opts, env: f.env, transport: 'sse' });
  f.calls[0].json(400, { error: 'invalid_channel', message: 'invalid channel "bad name": bad character' });
  await flush();
  assert.deepEqual(r.states.map((s) => s[0]), ['connecting', 'closed']);
  const err = r.states[1][1].error;
  assert.equal(err.code, 'invalid_channel');
  assert.match(err.message, /bad character/);
  assert.deepEqual(r.errors, [err]);
  f.clock.advance(600000);
  assert.equal(f.calls.length, 1, 'never retried');

  // The same over WebSocket: an error frame before `subscribed`.
  const g = fakeEnv();
  const q = recorder();
  subscribe(A, ['bad name'], { ...q.opts, env: g.env, transport: 'ws' });
  g.sockets[0].open();
  g.sockets[0].frame({ type: 'error', code: 'invalid_channel', message: 'nope' });
  assert.deepEqual(q.states.map((s) => s[0]), ['connecting', 'closed']);
  assert.equal(q.errors[0].code, 'invalid_channel');
  g.clock.advance(600000);
  assert.equal(g.sockets.length, 1);
});

test('backoff grows between failures and resets after a connection opens', async () => {
  const f = fakeEnv();
  const r = recorder();
  const sub = subscribe(A, ['a'], { ...r.opts, env: f.env, transport: 'poll', minDelay: 100, maxDelay: 1000 });
  const delays = [];
  for (let i = 0; i < 6; i++) {
    f.calls.at(-1).json(502, { error: 'bad_gateway', message: 'proxy' });
    await flush();
    delays.push(r.states.at(-1)[1].delay);
    f.clock.advance(delays.at(-1));
  }
  assert.deepEqual(delays, [50, 100, 200, 400, 500, 500], 'random 0.5 × min(max, min·2^n)');
  f.calls.at(-1).json(200, { messages: [], cursor: 'c1' });
  await flush();
  assert.equal(r.states.at(-1)[0], 'open');
  f.calls.at(-1).json(502, {});
  await flush();
  assert.equal(r.states.at(-1)[1].delay, 50, 'back to the first step');
  sub.close();
});

test('long-poll: the first poll answers at once; then the cursor; without one, since', async () => {
  const f = fakeEnv();
  const r = recorder();
  const sub = subscribe([A, B], ['a', 'b'], { ...r.opts, env: f.env, transport: 'poll', since: '0', pollTimeout: 20 });
  let q = params(f.calls[0].url);
  assert.deepEqual([q.getAll('channel'), q.get('timeout'), q.get('since'), q.get('cursor')], [['a', 'b'], '0', 'a~0,b~0', null]);
  f.calls[0].json(200, { messages: [{ channel: 'a', id: '1-0', event: null, data: 'x' }], cursor: 'C1' });
  await flush();
  assert.equal(r.states.at(-1)[0], 'open', 'open after the first (immediate) answer');
  q = params(f.calls[1].url);
  assert.deepEqual([q.get('timeout'), q.get('cursor'), q.get('since')], ['20', 'C1', null]);
  f.calls[1].json(200, { messages: [{ channel: 'a', id: '1-0', event: null, data: 'x' }, { channel: 'b', id: '2-0', event: 'e', data: 'y' }], cursor: 'C2', reset: true, reset_channels: ['a'] });
  await flush();
  assert.deepEqual(r.messages.map((m) => m.data), ['x', 'y']);
  assert.deepEqual(r.resets, ['a']);
  f.calls[2].fail(); // the node died
  await flush();
  f.clock.advance(r.states.at(-1)[1].delay);
  assert.match(f.calls[3].url, /^http:\/\/b\.test\/poll/);
  assert.equal(params(f.calls[3].url).get('cursor'), 'C2', 'the cursor works on any node');
  sub.close();

  // A cursor is only used by the session that got it: a new subscription resumes with since.
  const g = fakeEnv();
  subscribe(A, ['a'], { env: g.env, transport: 'poll', since: sub.positions() }).close();
  assert.equal(params(g.calls[0].url).get('since'), 'a~1-0');
});

test('token: close 4001 or 401 calls getToken (sync or async) and reconnects with the fresh token', async () => {
  const f = fakeEnv();
  const r = recorder();
  let n = 0;
  const sub = subscribe(A, ['a'], { ...r.opts, env: f.env, transport: 'ws', token: 't0', getToken: async () => 't' + ++n });
  assert.equal(f.sockets[0].url, 'ws://a.test/ws?token=t0');
  f.sockets[0].open();
  f.sockets[0].frame({ type: 'subscribed', channels: ['a'], recovered: false });
  f.sockets[0].serverClose(4001, 'token expired');
  await flush();
  assert.equal(n, 1);
  assert.equal(f.sockets[1].url, 'ws://a.test/ws?token=t1', 'at once, with the new token, same node');
  sub.close();

  const g = fakeEnv();
  const sub2 = subscribe(A, ['a'], { env: g.env, transport: 'sse', token: 'old', getToken: () => 'new' });
  assert.equal(g.calls[0].init.headers.Authorization, 'Bearer old', 'SSE sends the token as a header');
  assert.equal(params(g.calls[0].url).get('token'), null, 'not in the URL');
  g.calls[0].json(401, { error: 'unauthorized', message: 'expired' });
  await flush();
  assert.equal(g.calls[1].init.headers.Authorization, 'Bearer new');
  sub2.close();
});

test('token: an expired JWT is refreshed before connecting; a token refused again and again backs off', async () => {
  const f = fakeEnv();
  f.clock.t = 1_000_000_000;
  let n = 0;
  const sub = subscribe(A, ['a'], { env: f.env, transport: 'ws', token: jwt(999_999), getToken: () => (++n, jwt(2_000_000)) });
  await flush();
  assert.equal(n, 1, 'refreshed first: a browser cannot see a WebSocket 401');
  assert.equal(f.sockets.length, 1);
  assert.ok(f.sockets[0].url.endsWith(encodeURIComponent(jwt(2_000_000))));
  sub.close();

  const g = fakeEnv();
  const r = recorder();
  let m = 0;
  const sub2 = subscribe(A, ['a'], { ...r.opts, env: g.env, transport: 'sse', getToken: () => 'still-bad' + ++m });
  for (let i = 0; i < 3; i++) {
    g.calls.at(-1).json(401, { error: 'unauthorized', message: 'bad signature' });
    await flush();
  }
  assert.equal(r.states.at(-1)[0], 'reconnecting', 'the third refusal waits');
  assert.equal(m, 2);
  g.clock.advance(r.states.at(-1)[1].delay);
  await flush();
  assert.equal(m, 3, 'then a fresh token again');
  sub2.close();

  // Without getToken, 401 is final.
  const h = fakeEnv();
  const q = recorder();
  subscribe(A, ['a'], { ...q.opts, env: h.env, transport: 'sse', token: 'x' });
  h.calls[0].json(401, { error: 'unauthorized', message: 'no' });
  await flush();
  assert.equal(q.states.at(-1)[0], 'closed');
  assert.equal(q.errors[0].code, 'unauthorized');
});

test('SSE: no heartbeat for two intervals reconnects; the online event retries at once', async () => {
  const f = fakeEnv();
  const r = recorder();
  const sub = subscribe(A, ['a'], { ...r.opts, env: f.env, transport: 'sse', heartbeat: 1000, minDelay: 60000 });
  const s = f.calls[0].stream();
  s.push(': ok\n\n');
  await flush();
  f.clock.advance(1500);
  s.push(':\n\n');
  await flush();
  f.clock.advance(1999);
  assert.equal(r.states.at(-1)[0], 'open', 'a heartbeat comment counts');
  f.clock.advance(1);
  await flush();
  assert.equal(r.states.at(-1)[0], 'reconnecting');
  assert.ok(r.states.at(-1)[1].delay > 1000);
  f.goOnline();
  assert.equal(f.calls.length, 2, 'the browser came back online: now, not after the backoff');
  sub.close();
});

test('close() stops everything: no callbacks, no timers, no reconnects', async () => {
  const f = fakeEnv();
  const r = recorder();
  const sub = subscribe(A, ['a'], { ...r.opts, env: f.env, transport: 'sse' });
  const s = f.calls[0].stream();
  s.push(': ok\n\n');
  await flush();
  sub.close();
  await flush();
  assert.deepEqual(f.clock.pending(), []);
  f.clock.advance(100000);
  assert.equal(f.calls.length, 1);
  assert.equal(r.states.at(-1)[0], 'closed');
  assert.equal(r.states.filter((x) => x[0] === 'closed').length, 1);
});

test('publish: raw endpoint for one channel, JSON for several; errors carry the server code', async () => {
  const seen = [];
  const fetch = async (url, init) => {
    seen.push([url, init]);
    if (url.startsWith('http://down')) throw new TypeError('Failed to fetch');
    if (url.includes('bad')) return new Response('{"error":"invalid_channel","message":"bad"}', { status: 400 });
    return new Response(JSON.stringify({ channel: 'news', id: '1-0', subscribed: true }), { status: 200 });
  };
  const ok = await publish(['http://down', 'http://up/'], 'news', 'hi', { event: 'note', apiKey: 'k', fetch });
  assert.deepEqual(ok, { channel: 'news', id: '1-0', subscribed: true });
  assert.equal(seen[1][0], 'http://up/publish/news?event=note', 'an unreachable node: the next one');
  assert.equal(seen[1][1].headers['X-API-Key'], 'k');
  assert.equal(seen[1][1].body, 'hi');
  await publish('http://up', ['a', 'b'], { n: 1 }, { fetch });
  assert.equal(seen[2][0], 'http://up/api/publish');
  assert.deepEqual(JSON.parse(seen[2][1].body), { channels: ['a', 'b'], data: '{"n":1}' });
  await assert.rejects(publish('http://up', 'bad', 'x', { fetch }), (e) => e.code === 'invalid_channel' && e.status === 400 && e.message === 'bad');
});

test('token: long-polls refresh a token about to expire instead of being refused', async () => {
  const f = fakeEnv();
  f.clock.t = 1_000_000_000;
  let n = 0;
  const sub = subscribe(A, ['a'], { env: f.env, transport: 'poll', token: jwt(1_000_030), getToken: () => (++n, jwt(1_000_600)) });
  assert.equal(f.calls[0].init.headers.Authorization, 'Bearer ' + jwt(1_000_030));
  f.calls[0].json(200, { messages: [], cursor: 'c' });
  await flush();
  f.clock.t += 26_000; // 4 s left
  f.calls[1].json(200, { messages: [], cursor: 'c2' });
  await flush();
  assert.equal(n, 1);
  assert.equal(f.calls[2].init.headers.Authorization, 'Bearer ' + jwt(1_000_600));
  assert.equal(params(f.calls[2].url).get('cursor'), 'c2', 'same session: the cursor is kept');
  sub.close();
});
