// The event-stream parser against the HTML standard's rules.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SseParser } from '../src/fanout.mjs';

const all = (chunks) => {
  const p = new SseParser();
  return { events: chunks.flatMap((c) => p.feed(c)), p };
};

test('LF, CR and CRLF all end lines, also when split across chunks', () => {
  for (const nl of ['\n', '\r', '\r\n']) {
    const text = `event: a${nl}data: x${nl}${nl}data: y${nl}${nl}`;
    const whole = all([text]).events;
    assert.deepEqual(whole.map((e) => [e.event, e.data]), [['a', 'x'], ['message', 'y']], JSON.stringify(nl));
    // Every split point, one byte at a time.
    assert.deepEqual(all(text.split('')).events, whole, `byte by byte, ${JSON.stringify(nl)}`);
  }
  // A CR at the end of a chunk and the LF starting the next are one line end.
  assert.deepEqual(all(['data: a\r', '\ndata: b\r\n\r', '\n']).events.map((e) => e.data), ['a\nb']);
});

test('multi-line data joins with LF; one leading space is dropped, others kept', () => {
  const { events } = all(['data:first\ndata:  second\ndata\ndata: \n\n']);
  assert.equal(events[0].data, 'first\n second\n\n');
});

test('comments are counted, never dispatched; a blank line without data dispatches nothing', () => {
  const { events, p } = all([': ok\n\n:\n\n: heartbeat\nevent: x\n\n']);
  assert.deepEqual(events, []);
  assert.equal(p.comments, 3);
});

test('an empty data line still makes an event', () => {
  assert.deepEqual(all(['data\n\n']).events.map((e) => e.data), ['']);
});

test('retry is kept only when all digits; id persists and ignores NUL', () => {
  const { events, p } = all(['retry: 3000\nretry: 12x\nid: 5-0\ndata: a\n\ndata: b\n\nid: bad\0id\ndata: c\n\n']);
  assert.equal(p.retry, 3000);
  assert.deepEqual(events.map((e) => e.id), ['5-0', '5-0', '5-0']);
});

test('a leading BOM is dropped, an unfinished event is not dispatched, unknown fields are ignored', () => {
  const p = new SseParser();
  assert.deepEqual(p.feed('\uFEFFdata: a\nfoo: bar\n\n').map((e) => e.data), ['a']);
  assert.deepEqual(p.feed('data: unfinished\n'), []);
  assert.deepEqual(p.feed('\n').map((e) => e.data), ['unfinished']);
});

test('the gateway stream: start, JSON envelopes with named events, reset, disconnect', () => {
  const stream =
    'retry: 2000\n: ok\n\n' +
    'id: 1-0\nevent: note\ndata: {"channel":"a","id":"1-0","event":"note","data":"x\\ny"}\n\n' +
    'event: reset\ndata: {"channel":"a"}\n\n' +
    ':\n\n' +
    'retry: 1000\nevent: disconnect\ndata: {"reason":"shutting_down","message":"bye"}\n\n';
  const { events, p } = all([stream]);
  assert.deepEqual(events.map((e) => e.event), ['note', 'reset', 'disconnect']);
  assert.equal(JSON.parse(events[0].data).data, 'x\ny');
  assert.equal(p.retry, 1000);
  assert.equal(p.comments, 2);
});
