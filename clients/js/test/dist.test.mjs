// dist/ is committed so nobody needs a build step: it must match the source.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import vm from 'node:vm';
import { build, size } from '../build.mjs';
import * as mod from '../src/fanout.mjs';

const dist = (f) => readFileSync(new URL('../' + f, import.meta.url), 'utf8');

test('dist/ is what build.mjs makes from src/ (run `node clients/js/build.mjs` after editing src/)', () => {
  for (const [file, text] of Object.entries(build())) {
    assert.ok(dist(file) === text, `${file} is stale: run \`node clients/js/build.mjs\` and commit dist/`);
  }
});

test('the plain script defines the global `fanout` with the module\'s names', () => {
  const ctx = vm.createContext({});
  vm.runInContext(dist('dist/fanout.js'), ctx);
  assert.deepEqual(Object.keys(ctx.fanout).sort(), Object.keys(mod).sort());
  assert.equal(typeof ctx.fanout.subscribe, 'function');
  assert.equal(ctx.fanout.encodeCompound({ a: '1-0' }), 'a~1-0');
});

test('the plain script is at most 8 KB minified + gzipped', async (t) => {
  let s;
  try {
    s = await size();
  } catch (e) {
    if (process.env.CI) throw new Error(`terser is missing (cd clients/js && npm ci): ${e.message}`);
    t.skip('terser not installed (cd clients/js && npm ci)');
    return;
  }
  t.diagnostic(`${s.gzipped} bytes minified + gzip -9`);
  assert.ok(s.gzipped <= 8192, `${s.gzipped} bytes`);
  // The minified code still works.
  const ctx = vm.createContext({});
  vm.runInContext(s.code, ctx);
  assert.equal(ctx.fanout.backoff(2, 100, 1000, () => 0.5), 200);
});
