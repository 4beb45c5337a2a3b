// `make bench`'s ui section (tests/bench/src/ui.rs): the time from Enter in alice's composer to
// the message in bob's open conversation, KEZ_BENCH_N times at a person's pace. Both pages are in
// one browser, so both clocks are the same `Date.now()`: alice's page notes when Enter is pressed
// (a capturing keydown listener, before the page's own), bob's when the text enters his DOM (a
// MutationObserver). Prints one line: `KEZ-BENCH {"samples_ms":[…]}`.
//
// Extra variables (besides lib.mjs's): KEZ_ALICE_HANDLE, KEZ_BOB_HANDLE (both registered and each
// other's contact), KEZ_BENCH_N (default 20), KEZ_BENCH_PACE_MS (default 300).

import { scenario, env, eventually, shot } from './lib.mjs';

const n = Number(process.env.KEZ_BENCH_N || 20);
const pace = Number(process.env.KEZ_BENCH_PACE_MS || 300);

await scenario('bench_latency', async ({ open }) => {
  const alice = await open('alice', `${env('KEZ_UI_ALICE')}#${encodeURIComponent(env('KEZ_BOB_HANDLE'))}`);
  const bob = await open('bob', `${env('KEZ_UI_BOB')}#${encodeURIComponent(env('KEZ_ALICE_HANDLE'))}`);
  const box = alice.getByRole('textbox', { name: 'Message' });
  await box.waitFor({ timeout: 30_000 });
  await bob.getByRole('textbox', { name: 'Message' }).waitFor({ timeout: 30_000 });
  await alice.evaluate(() => {
    window.__pressed = {};
    document.addEventListener('keydown', (event) => {
      const match = /^bench-(\d+)-end$/.exec(event.target.value || '');
      if (event.key === 'Enter' && match) window.__pressed[match[1]] = Date.now();
    }, { capture: true });
  });
  await bob.evaluate(() => {
    window.__shown = {};
    const look = () => {
      for (const item of document.querySelectorAll('#messages li.msg')) {
        const match = /bench-(\d+)-end/.exec(item.textContent);
        if (match && !(match[1] in window.__shown)) window.__shown[match[1]] = Date.now();
      }
    };
    new MutationObserver(look).observe(document.body, { childList: true, subtree: true, characterData: true });
  });
  const samples = [];
  for (let i = 0; i < n; i++) {
    await box.fill(`bench-${i}-end`);
    await box.press('Enter');
    const shown = await eventually(() => bob.evaluate((i) => window.__shown[i], i), `bench-${i} in bob's page`, { timeout: 30_000, interval: 20 });
    const pressed = await alice.evaluate((i) => window.__pressed[i], i);
    samples.push(shown - pressed);
    await new Promise((resolve) => setTimeout(resolve, pace));
  }
  await shot(bob, 'bench-bob');
  console.log(`KEZ-BENCH ${JSON.stringify({ samples_ms: samples })}`);
});
