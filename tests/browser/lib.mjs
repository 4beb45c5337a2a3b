// Shared helpers for the browser scenarios of `kez-chat ui` (tests/browser/*.mjs).
//
// A scenario is run by tests/tests/ui_browser.rs (`cargo test -p kez-tests --test ui_browser`),
// which starts a real stack and one `kez-chat ui` gateway per person, then runs
// `node tests/browser/<scenario>.mjs` with these variables:
//
//   KEZ_UI_ALICE, KEZ_UI_BOB     the gateways' URLs (http://127.0.0.1:PORT/TOKEN/)
//   KEZ_CHAT                     the kez-chat binary
//   KEZ_HOME_ALICE, KEZ_HOME_BOB their homes (empty: not registered yet)
//   KEZ_SERVER                   the NATS URL to register against
//   KEZ_DOMAIN                   the server's domain (handles are @name@KEZ_DOMAIN)
//   KEZ_SCREENSHOTS              where shot() writes PNGs (fresh for each run)
//   KEZ_CHROMIUM                 the chromium binary (default /usr/bin/chromium)
//
// A scenario is a plain ES module:
//
//   import { scenario, expect, shot } from './lib.mjs';
//   await scenario('smoke', async ({ open }) => {
//     const alice = await open('alice', process.env.KEZ_UI_ALICE);
//     await alice.locator('main').waitFor();
//     await shot(alice, 'alice');
//   });
//
// scenario() launches chromium, runs the body under a deadline, closes everything and sets the
// exit code: 0 when the body returned and no page threw or broke the CSP, 1 otherwise, with a
// screenshot of every open page (failed-<name>.png) and each page's console in the output.

import { mkdirSync } from 'node:fs';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { inspect } from 'node:util';

import { chromium } from 'playwright-core';

/** The chromium binary: $KEZ_CHROMIUM, else Debian's. */
export const CHROMIUM = process.env.KEZ_CHROMIUM || '/usr/bin/chromium';

/**
 * Flags for a headless chromium on a machine with no network but loopback: no GPU, no QUIC, and
 * none of the background connections (updates, sync, safe browsing…) that would be refused.
 */
export const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

/** How long one scenario may run (ms): $KEZ_SCENARIO_TIMEOUT_MS, else 200 s (under the harness's 240 s). */
export const SCENARIO_TIMEOUT_MS = Number(process.env.KEZ_SCENARIO_TIMEOUT_MS || 200_000);

/** The default timeout of a Playwright action or wait on a page (ms). */
export const ACTION_TIMEOUT_MS = 15_000;

/**
 * The environment variable `name`, which must be set (the harness sets them all).
 * @param {string} name
 * @returns {string}
 */
export function env(name) {
  const value = process.env[name];
  if (value === undefined || value === '') {
    throw new Error(
      `${name} is not set; run the scenarios through the harness: ` +
        'cargo test -p kez-tests --test ui_browser',
    );
  }
  return value;
}

/**
 * Launches chromium (headless, with CHROMIUM_ARGS). Playwright gives it a new, empty
 * user-data dir in the temporary directory and removes it on close; every `newContext()` is a
 * separate profile on top (its own cookies and storage), so each person gets their own.
 * @returns {Promise<import('playwright-core').Browser>}
 */
export async function launch() {
  if (!existsSync(CHROMIUM)) {
    throw new Error(
      `chromium not found at ${CHROMIUM}; install it with: sudo apt-get install -y chromium ` +
        '(or set KEZ_CHROMIUM to a chromium binary)',
    );
  }
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: CHROMIUM_ARGS,
    timeout: 30_000,
  });
}

/**
 * Writes a full-page screenshot of `page` to ${KEZ_SCREENSHOTS}/${name}.png; answers the path.
 * @param {import('playwright-core').Page} page
 * @param {string} name  a file name without extension: letters, digits, `-`, `_`, `.`
 */
export async function shot(page, name) {
  if (!/^[A-Za-z0-9._-]+$/.test(name)) {
    throw new Error(`shot(): ${JSON.stringify(name)} is not a plain file name`);
  }
  const dir = env('KEZ_SCREENSHOTS');
  mkdirSync(dir, { recursive: true });
  const path = join(dir, `${name}.png`);
  await page.screenshot({ path, fullPage: true, timeout: ACTION_TIMEOUT_MS });
  return path;
}

/** The error expect() throws: its message says what was expected and what was there. */
export class ExpectationError extends Error {
  constructor(message) {
    super(message);
    this.name = 'ExpectationError';
  }
}

function show(value) {
  return inspect(value, { depth: 6, breakLength: 120, maxStringLength: 2000 });
}

/**
 * A small `expect` for plain values (Playwright's own `expect` lives in @playwright/test, which is
 * not installed). Each check throws an ExpectationError naming `what`, the expectation and the
 * value; `.not` negates the next check.
 *
 *   expect(title, 'the page title').toContain('kez-chat');
 *   expect(rows.length, 'conversations').toBe(1);
 *
 * @param {unknown} actual
 * @param {string} [what]  what the value is, for the message
 */
export function expect(actual, what = 'value') {
  const make = (negated) => {
    const check = (ok, expectation) => {
      if (Boolean(ok) === negated) {
        throw new ExpectationError(
          `expected ${what} ${negated ? 'not ' : ''}${expectation}, but it was ${show(actual)}`,
        );
      }
    };
    const checks = {
      toBe: (expected) => check(Object.is(actual, expected), `to be ${show(expected)}`),
      toEqual: (expected) =>
        check(
          JSON.stringify(actual) === JSON.stringify(expected),
          `to equal ${show(expected)}`,
        ),
      toBeTruthy: () => check(actual, 'to be truthy'),
      toContain: (item) =>
        check(
          actual != null && typeof actual.includes === 'function' && actual.includes(item),
          `to contain ${show(item)}`,
        ),
      toMatch: (pattern) =>
        check(typeof actual === 'string' && pattern.test(actual), `to match ${pattern}`),
      toBeGreaterThan: (n) => check(actual > n, `to be greater than ${show(n)}`),
      toBeAtLeast: (n) => check(actual >= n, `to be at least ${show(n)}`),
      toHaveLength: (n) =>
        check(actual != null && actual.length === n, `to have length ${show(n)}`),
    };
    return checks;
  };
  return Object.assign(make(false), { not: make(true) });
}

/**
 * Runs `promise` (or the function `run`) with a deadline: rejects with "<what> did not finish
 * within N ms" if it has not settled by then.
 * @template T
 * @param {Promise<T> | (() => Promise<T>)} run
 * @param {number} ms
 * @param {string} what
 * @returns {Promise<T>}
 */
export async function withTimeout(run, ms, what) {
  const promise = typeof run === 'function' ? run() : run;
  let timer;
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not finish within ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([promise, deadline]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Calls `probe` every `interval` ms until it answers something truthy, which it answers; throws
 * after `timeout` ms with `what` and the last answer (or error).
 * @template T
 * @param {() => Promise<T> | T} probe
 * @param {string} what
 * @param {{ timeout?: number, interval?: number }} [options]
 * @returns {Promise<T>}
 */
export async function eventually(probe, what, { timeout = ACTION_TIMEOUT_MS, interval = 100 } = {}) {
  const end = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      last = await probe();
      if (last) return last;
    } catch (err) {
      last = err;
    }
    if (Date.now() >= end) {
      throw new ExpectationError(`${what}: not within ${timeout} ms; last: ${show(last)}`);
    }
    await new Promise((resolve) => setTimeout(resolve, interval));
  }
}

/**
 * Runs one scenario: launches chromium, calls `body({ browser, open, pages })` within
 * SCENARIO_TIMEOUT_MS, then closes the browser and exits the process (0 = passed).
 *
 * `open(name, url)` makes a new context (a separate profile) and page for one person, records
 * its console, page errors and CSP violations, navigates to `url` and answers the page. Any
 * uncaught error in a page, or any CSP violation, fails the scenario even when the body passes.
 *
 * @param {string} name
 * @param {(ctx: {
 *   browser: import('playwright-core').Browser,
 *   open: (person: string, url: string) => Promise<import('playwright-core').Page>,
 *   pages: Map<string, import('playwright-core').Page>,
 * }) => Promise<void>} body
 */
export async function scenario(name, body) {
  const started = Date.now();
  const pages = new Map();
  const logs = new Map();
  const problems = [];
  let browser;
  let failure;

  const open = async (person, url) => {
    if (pages.has(person)) throw new Error(`open(): ${person} already has a page`);
    const context = await browser.newContext({ acceptDownloads: true });
    context.setDefaultTimeout(ACTION_TIMEOUT_MS);
    const page = await context.newPage();
    const log = [];
    logs.set(person, log);
    pages.set(person, page);
    page.on('console', (message) => {
      const line = `[${message.type()}] ${message.text()}`;
      log.push(line);
      // Chromium reports a CSP violation as a console error starting "Refused to …".
      if (message.type() === 'error' && /Refused to|Content Security Policy/.test(message.text())) {
        problems.push(`${person}: CSP violation: ${message.text()}`);
      }
    });
    page.on('pageerror', (error) => {
      log.push(`[pageerror] ${error.stack || error.message}`);
      problems.push(`${person}: uncaught error in the page: ${error.message}`);
    });
    page.on('crash', () => problems.push(`${person}: the page crashed`));
    await page.goto(url, { waitUntil: 'load', timeout: ACTION_TIMEOUT_MS });
    return page;
  };

  try {
    browser = await launch();
    await withTimeout(() => body({ browser, open, pages }), SCENARIO_TIMEOUT_MS, `scenario ${name}`);
    if (problems.length > 0) {
      throw new ExpectationError(`the pages reported problems:\n  ${problems.join('\n  ')}`);
    }
  } catch (err) {
    failure = err;
  }

  if (failure) {
    for (const [person, page] of pages) {
      try {
        const path = await withTimeout(shot(page, `failed-${person}`), 10_000, 'screenshot');
        console.error(`screenshot of ${person}'s page: ${path}`);
      } catch (err) {
        console.error(`no screenshot of ${person}'s page: ${err.message}`);
      }
    }
    for (const [person, log] of logs) {
      console.error(`--- ${person}'s console (${log.length} lines) ---`);
      for (const line of log) console.error(line);
    }
  }
  if (browser) {
    await withTimeout(browser.close(), 15_000, 'closing chromium').catch((err) =>
      console.error(`closing chromium: ${err.message}`),
    );
  }
  const seconds = ((Date.now() - started) / 1000).toFixed(1);
  if (failure) {
    console.error(`scenario ${name} FAILED after ${seconds} s:`);
    console.error(failure.stack || String(failure));
    process.exit(1);
  }
  console.log(`scenario ${name} passed in ${seconds} s`);
  process.exit(0);
}

/**
 * Word `n` (from 1) of a paper key as the CLI shows it: only its grid lines ("  1 slab   2 belt
 * …") count, not the sentence above them ("write these 24 words down"), so word 24 is not
 * "words".
 * @param {string} block  the shown text
 * @param {number} n
 * @returns {string | undefined}
 */
export function paperWord(block, n) {
  for (const line of block.split('\n')) {
    if (!/^\s*(\d+ +[a-z]+\s*)+$/.test(line)) continue;
    const match = new RegExp(`(?:^|\\s)${n} +([a-z]+)`).exec(line);
    if (match) return match[1];
  }
  return undefined;
}

/**
 * The visible controls of `page` (buttons, links, inputs, selects, text areas, switches; not
 * those hidden from assistive technology) that a screen reader could not name: no label, aria-label(ledby), title or text. Answers a short
 * description of each, for an assertion that there are none.
 * @param {import('playwright-core').Page} page
 * @returns {Promise<string[]>}
 */
export async function unlabelledControls(page) {
  return page.evaluate(() => {
    const controls = document.querySelectorAll('button, a[href], input:not([type=hidden]), select, textarea, [role=button], [role=switch], [role=menuitem]');
    const named = (el) => {
      if (el.getAttribute('aria-label')?.trim() || el.title?.trim()) return true;
      const by = el.getAttribute('aria-labelledby');
      if (by && by.split(/\s+/).some(id => document.getElementById(id)?.textContent.trim())) return true;
      if (el.labels && [...el.labels].some(label => label.textContent.trim())) return true;
      if (['button', 'a'].includes(el.localName) || el.getAttribute('role')) return !!el.textContent.trim();
      return !!el.placeholder?.trim();
    };
    const visible = (el) => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
    const hidden = (el) => !!el.closest('[aria-hidden="true"], [inert]');
    return [...controls].filter(el => visible(el) && !hidden(el) && !named(el)).map(el => el.outerHTML.slice(0, 120));
  });
}
