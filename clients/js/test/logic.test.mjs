// The client's pure logic: ids, resume positions, backoff, transport order, error classes.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  accept, backoff, classifyClose, classifyCode, classifyReason, classifyStatus, compareIds,
  encodeCompound, initialPositions, jwtExpiry, parseCompound, parseId, transportOrder,
} from '../src/fanout.mjs';

test('backoff is full jitter within [0, min(max, min*2^attempt))', () => {
  const min = 500, max = 30000;
  for (let attempt = 0; attempt < 12; attempt++) {
    const cap = Math.min(max, min * 2 ** attempt);
    assert.equal(backoff(attempt, min, max, () => 0), 0, 'the low end is 0 (full jitter)');
    assert.equal(backoff(attempt, min, max, () => 0.999999), cap - 1, `attempt ${attempt}: just under the cap`);
    for (let i = 0; i < 200; i++) {
      const d = backoff(attempt, min, max);
      assert.ok(d >= 0 && d < cap && Number.isInteger(d), `attempt ${attempt}: ${d} in [0, ${cap})`);
    }
  }
  assert.equal(backoff(3, 500, 30000, () => 0.5), 2000, 'cap doubles per attempt');
  assert.equal(backoff(50, 500, 30000, () => 0.5), 15000, 'and stops at max');
});

test('ids parse and order numerically, not as strings', () => {
  assert.deepEqual(parseId('1700000000000-12'), [1700000000000, 12]);
  assert.deepEqual(parseId('0'), [0, 0]);
  for (const bad of ['', 'x', '1-', '-1', '1-2-3', null, undefined]) assert.equal(parseId(bad), null, String(bad));
  assert.ok(compareIds('9-0', '10-0') < 0);
  assert.ok(compareIds('5-10', '5-9') > 0);
  assert.equal(compareIds('5-0', '5-0'), 0);
  assert.ok(compareIds('0', '1-0') < 0, '"0" is before everything');
});

test('per-channel bookkeeping drops repeats and old ids, passes raw messages', () => {
  const pos = {};
  const m = (channel, id) => ({ channel, id, data: '' });
  assert.ok(accept(pos, m('a', '5-0')));
  assert.ok(accept(pos, m('b', '1-0')), 'channels are independent');
  assert.ok(!accept(pos, m('a', '5-0')), 'same id again');
  assert.ok(!accept(pos, m('a', '4-9')), 'older id');
  assert.ok(accept(pos, m('a', '5-1')));
  assert.ok(accept(pos, m('a', null)), 'raw (no id) passes');
  assert.ok(accept(pos, m('a', null)), 'every time');
  assert.deepEqual(pos, { a: '5-1', b: '1-0' }, 'raw messages do not move the position');
  const fromStart = { a: '0' };
  assert.ok(accept(fromStart, m('a', '1-0')), 'since "0" accepts the first history message');
});

test('compound ids encode and parse (channel names may hold : @ / = . -)', () => {
  const p = { news: '5-1', 'a:b@c/d=e.f-g': '6-0' };
  const s = encodeCompound(p);
  assert.equal(s, 'news~5-1,a:b@c/d=e.f-g~6-0');
  assert.deepEqual(parseCompound(s), p);
  assert.equal(parseCompound('5-1'), null, 'a plain id is not compound');
  assert.equal(parseCompound('~5-1'), null, 'a part needs a channel');
  assert.equal(encodeCompound({}), '');
});

test('the since option: one id for all, compound, or per channel', () => {
  assert.deepEqual(initialPositions(['a', 'b'], '0'), { a: '0', b: '0' });
  assert.deepEqual(initialPositions(['a', 'b'], '7-1'), { a: '7-1', b: '7-1' });
  assert.deepEqual(initialPositions(['a', 'b'], 'a~3-0,c~9-0'), { a: '3-0' });
  assert.deepEqual(initialPositions(['a', 'b'], { b: '2-0', z: '1-0' }), { b: '2-0' });
  assert.deepEqual(initialPositions(['a'], undefined), {});
});

test('auto tries WebSocket, then SSE, then long-poll, the remembered transport first', () => {
  assert.deepEqual(transportOrder('auto', null), ['ws', 'sse', 'poll']);
  assert.deepEqual(transportOrder(undefined, 'sse'), ['sse', 'ws', 'poll']);
  assert.deepEqual(transportOrder('auto', 'poll'), ['poll', 'ws', 'sse']);
  assert.deepEqual(transportOrder('auto', 'bogus'), ['ws', 'sse', 'poll'], 'a bad stored value is ignored');
  assert.deepEqual(transportOrder('sse', 'ws'), ['sse'], 'a fixed transport never falls back');
  assert.throws(() => transportOrder('carrier-pigeon'));
});

test('answers are classified: token, elsewhere (drain), fatal, retry', () => {
  assert.equal(classifyStatus(401), 'token');
  assert.equal(classifyStatus(503), 'elsewhere');
  for (const s of [400, 403, 404, 405, 413]) assert.equal(classifyStatus(s), 'fatal', String(s));
  for (const s of [429, 500, 502, 504, 408]) assert.equal(classifyStatus(s), 'retry', String(s));
  assert.equal(classifyClose(4001), 'token');
  assert.equal(classifyClose(1012), 'elsewhere');
  for (const c of [1000, 1001, 1006, 1008, 1011]) assert.equal(classifyClose(c), 'retry', String(c));
  assert.equal(classifyReason('token_expired'), 'token');
  assert.equal(classifyReason('shutting_down'), 'elsewhere');
  assert.equal(classifyReason('slow_consumer'), 'retry');
  assert.equal(classifyCode('invalid_channel'), 'fatal');
  assert.equal(classifyCode('too_many_channels'), 'fatal');
  assert.equal(classifyCode('unauthorized'), 'token');
  assert.equal(classifyCode('broker_unavailable'), 'retry');
});

test('a JWT expiry is read without verifying; anything else has none', () => {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  assert.equal(jwtExpiry(`${b64({ alg: 'HS256' })}.${b64({ exp: 1700000000, x: '??>' })}.sig`), 1700000000000);
  assert.equal(jwtExpiry(`${b64({})}.${b64({ sub: 'x' })}.sig`), null);
  assert.equal(jwtExpiry('opaque-token'), null);
});
