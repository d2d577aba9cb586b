// Drives real Chromium for gateway/tests/browser.rs: reads one JSON command per line on
// stdin, answers with JSON lines on stdout — `{"kind":"ok","seq":N,"value":...}` or
// `{"kind":"fail","seq":N,"error":"..."}` — and reports what pages see as they see it:
// `{"kind":"message"|"state"|"reset"|"error"|"token", "page", "sub", ...}`.
//
// Commands (`seq` is echoed back):
//   {"op":"page","name":"p","origin":"http://127.0.0.1:PORT"}   a page of that node that
//        loads /client.js and /client.mjs from it; value: the names each defines
//   {"op":"goto","name":"p","url":"http://...","width":W,"height":H}  a real page
//   {"op":"subscribe","page":"p","sub":"s","urls":[...],"channels":[...],"opts":{...},
//        "tokens":[...]}   fanout.subscribe in the page; getToken hands out `tokens`
//   {"op":"close","page":"p","sub":"s"}
//   {"op":"eval","page":"p","expr":"..."}                 value: the expression's value
//   {"op":"wait","page":"p","expr":"...","timeout":ms}    until the expression is truthy
//   {"op":"fill"|"click"|"select","page":"p","selector":"...","value":"..."}
//   {"op":"viewport","page":"p","width":W,"height":H}
//   {"op":"screenshot","page":"p","path":"...","fullPage":true}
//   {"op":"quit"}
// Chromium is Debian's (/usr/bin/chromium, or $CHROMIUM), started headless with a fresh
// profile directory that is removed at the end; nothing is downloaded.
import { chromium } from 'playwright-core';
import { mkdtempSync, rmSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';

const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
const profile = mkdtempSync(join(tmpdir(), 'fanout-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
});
const pages = new Map();

async function newPage(name, width, height) {
  const page = await context.newPage();
  if (width) await page.setViewportSize({ width, height: height || 800 });
  page.on('pageerror', (e) => emit({ kind: 'pageerror', page: name, error: String(e) }));
  page.on('console', (m) => m.type() === 'error' && emit({ kind: 'console', page: name, text: m.text() }));
  await page.exposeFunction('__report', (obj) => emit({ page: name, ...obj }));
  pages.set(name, page);
  return page;
}

// Runs in the page: a subscription whose callbacks report to the driver.
function subscribeInPage({ sub, urls, channels, opts, tokens }) {
  const report = (o) => window.__report({ sub, ...o });
  const err = (e) => e && { code: e.code, message: e.message, status: e.status };
  const o = Object.assign({}, opts, {
    onMessage: (m) => report({ kind: 'message', ...m }),
    onReset: (channel) => report({ kind: 'reset', channel }),
    onError: (e) => report({ kind: 'error', error: err(e) }),
    onState: (state, info) => report({ kind: 'state', state, info: Object.assign({}, info, { error: err(info.error) }) }),
  });
  if (tokens) {
    let n = 0;
    o.getToken = () =>
      new Promise((resolve) => {
        n++;
        report({ kind: 'token', n });
        setTimeout(() => resolve(tokens[Math.min(n - 1, tokens.length - 1)]), 10);
      });
  }
  window.__subs = window.__subs || {};
  window.__subs[sub] = window.fanout.subscribe(urls, channels, o);
}

const page = (name) => {
  const p = pages.get(name);
  if (!p) throw new Error('no page ' + name);
  return p;
};

async function run(c) {
  switch (c.op) {
    case 'page': {
      // The node's own page (the demo at /), which loads /client.js itself; the module
      // build is imported beside it. (A page made up by the driver would not do: Chromium
      // treats it as public and blocks its WebSockets to loopback.)
      const p = await newPage(c.name, c.width, c.height);
      await p.goto(c.origin + '/');
      await p.addScriptTag({ type: 'module', content: "import * as m from '/client.mjs'; window.fanoutModule = m;" });
      await p.waitForFunction(() => window.fanout && window.fanoutModule, null, { timeout: 10000 });
      return p.evaluate(() => ({ global: Object.keys(window.fanout).sort(), module: Object.keys(window.fanoutModule).sort() }));
    }
    case 'goto': {
      const p = pages.get(c.name) || (await newPage(c.name, c.width, c.height));
      const res = await p.goto(c.url);
      return res && res.status();
    }
    case 'viewport':
      return page(c.page).setViewportSize({ width: c.width, height: c.height });
    case 'subscribe':
      return page(c.page).evaluate(subscribeInPage, c);
    case 'close':
      return page(c.page).evaluate((s) => window.__subs[s].close(), c.sub);
    case 'eval':
      return page(c.page).evaluate(c.expr);
    case 'wait':
      await page(c.page).waitForFunction(c.expr, null, { timeout: c.timeout || 10000, polling: 50 });
      return true;
    case 'fill':
      return page(c.page).fill(c.selector, c.value);
    case 'select':
      return page(c.page).selectOption(c.selector, c.value);
    case 'click':
      return page(c.page).click(c.selector);
    case 'screenshot':
      mkdirSync(dirname(c.path), { recursive: true });
      await page(c.page).screenshot({ path: c.path, fullPage: !!c.fullPage });
      return c.path;
    case 'quit':
      return null;
    default:
      throw new Error('unknown op ' + c.op);
  }
}

let quit = false;
for await (const line of createInterface({ input: process.stdin })) {
  if (!line.trim()) continue;
  let c;
  try {
    c = JSON.parse(line);
    const value = await run(c);
    emit({ kind: 'ok', seq: c.seq, value: value === undefined ? null : value });
  } catch (e) {
    emit({ kind: 'fail', seq: c && c.seq, error: String((e && e.stack) || e) });
  }
  if (c && c.op === 'quit') {
    quit = true;
    break;
  }
}
await context.close().catch(() => {});
rmSync(profile, { recursive: true, force: true });
process.exit(quit ? 0 : 1);
