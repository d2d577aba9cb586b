// Builds dist/ from src/fanout.mjs, with no dependencies: `node build.mjs`.
//   dist/fanout.mjs  the ES module, as written
//   dist/fanout.js   a plain script that defines the global `fanout` (same code)
// `node build.mjs --check` exits 1 when dist/ is stale (the unit tests do the same).
// `node build.mjs --size` prints the minified + gzipped size of the plain script
// (needs the dev dependency terser: `npm ci`).
import { readFileSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { gzipSync } from 'node:zlib';

const here = (p) => fileURLToPath(new URL(p, import.meta.url));
const { version } = JSON.parse(readFileSync(here('package.json'), 'utf8'));
const banner = `/* @fanout/client ${version}: generated from src/fanout.mjs by build.mjs; do not edit. */\n`;

/** The two builds, as strings. */
export function build(src = readFileSync(here('src/fanout.mjs'), 'utf8')) {
  const names = [...src.matchAll(/^export (?:async function|function|class|const|let) (\w+)/gm)].map((m) => m[1]);
  const body = src.replace(/^export /gm, '');
  const script =
    banner +
    '(function (global) {\n' +
    "'use strict';\n" +
    body +
    `\nglobal.fanout = { ${names.join(', ')} };\n` +
    "})(typeof globalThis !== 'undefined' ? globalThis : self);\n";
  return { 'dist/fanout.mjs': banner + src, 'dist/fanout.js': script };
}

/** Minified + gzip -9 size of the plain script, in bytes. */
export async function size() {
  const { minify } = await import('terser');
  const { code } = await minify(build()['dist/fanout.js'], { compress: true, mangle: true });
  return { minified: code.length, gzipped: gzipSync(code, { level: 9 }).length, code };
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const out = build();
  if (process.argv.includes('--check')) {
    const stale = Object.keys(out).filter((f) => {
      try {
        return readFileSync(here(f), 'utf8') !== out[f];
      } catch {
        return true;
      }
    });
    if (stale.length) {
      console.error(`stale: ${stale.join(', ')}; run \`node clients/js/build.mjs\``);
      process.exit(1);
    }
  } else if (process.argv.includes('--size')) {
    const s = await size();
    console.log(`dist/fanout.js: ${s.minified} bytes minified, ${s.gzipped} bytes minified + gzip -9`);
  } else {
    for (const [f, text] of Object.entries(out)) writeFileSync(here(f), text);
    console.log(`wrote ${Object.keys(out).join(', ')}`);
  }
}
