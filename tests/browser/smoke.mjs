// The smallest scenario: alice's gateway serves a page that loads in chromium under its CSP,
// with a <main> and a title; a screenshot of it lands in $KEZ_SCREENSHOTS/alice.png.

import { env, eventually, expect, scenario, shot } from './lib.mjs';

await scenario('smoke', async ({ open }) => {
  const url = env('KEZ_UI_ALICE');
  const alice = await open('alice', url);
  await alice.locator('main').first().waitFor({ state: 'visible' });
  const title = await eventually(() => alice.title(), 'the page has a title');
  expect(title, 'the page title').toMatch(/\S/);
  // The page's own assets came from the gateway, under the token (module imports are relative).
  expect(alice.url(), "the page's URL").toBe(url);
  await shot(alice, 'alice');
});
