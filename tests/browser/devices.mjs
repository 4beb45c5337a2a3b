// Devices in the browser: alice registers; bob's empty home joins alice's identity as a new
// device (`device join`, its pairing request shown), alice adds it after seeing its fingerprint
// (`device add`, answered in the page), the new device's page comes up as @alice, and alice, who
// made a second paper key before, revokes the new device. Run by tests/tests/ui_browser.rs like two_users.mjs
// (KEZ_UI_BOB is used as alice's second device).

import { env, eventually, expect, scenario, shot, paperWord } from './lib.mjs';

const DOMAIN = env('KEZ_DOMAIN');
const SERVER = env('KEZ_SERVER');
let shotNo = 0;
const snap = (page, what) => shot(page, `devices-${String(++shotNo).padStart(2, '0')}-${what}`);

/** Answers the prompt of an interactive run ("Type word N …"): the word from the paper key block. */
async function typePaperWord(page) {
  const prompt = page.locator('.run-input:not([hidden]) label');
  await prompt.waitFor({ state: 'visible', timeout: 30_000 });
  const n = Number(/word (\d+)/.exec(await prompt.textContent())?.[1]);
  const block = await page.locator('.run-out').last().textContent();
  const word = paperWord(block, n);
  expect(word, `word ${n} of the paper key`).toBeTruthy();
  await page.locator('.run-input:not([hidden]) input').fill(word);
  await page.locator('.run-input:not([hidden]) button[type=submit]').click();
}

await scenario('devices', async ({ open }) => {
  const alice = await open('alice', env('KEZ_UI_ALICE'));
  const laptop = await open('laptop', env('KEZ_UI_BOB'));

  // alice registers (paper key confirmed).
  await alice.getByLabel('Your name').fill('alice');
  const server = alice.getByLabel('Server');
  if (!(await server.inputValue())) await server.fill(SERVER);
  await alice.getByRole('button', { name: 'Create my account' }).click();
  await typePaperWord(alice);
  await alice.locator('#reg-continue').click();
  await alice.locator('#app:not([hidden])').waitFor();

  // alice makes a second paper key (menu → Paper key), typing one word back.
  await alice.locator('#main-menu').click();
  await alice.getByRole('menuitem', { name: 'Paper key' }).click();
  await typePaperWord(alice);
  await alice.locator('dialog .run-status', { hasText: 'Done.' }).waitFor({ timeout: 30_000 });
  await alice.getByRole('button', { name: 'Close', exact: true }).last().click();

  // The second home asks to join @alice: its pairing request is shown, with a copy button.
  await laptop.getByRole('button', { name: 'Join as a new device' }).click();
  await laptop.getByLabel('Your handle').fill('@alice');
  await laptop.getByRole('button', { name: 'Show the pairing request' }).click();
  const out = laptop.locator('.run-out');
  await eventually(async () => /kez-pair:\S+/.test((await out.textContent()) || ''), 'the pairing request is shown', { timeout: 30_000 });
  const request = /kez-pair:\S+/.exec(await out.textContent())[0];
  await laptop.getByRole('button', { name: 'Copy' }).waitFor();
  await snap(laptop, 'laptop-pairing-request');

  // alice adds it in Devices: the fingerprint is shown, she confirms with "y".
  await alice.locator('#main-menu').click();
  await alice.getByRole('menuitem', { name: 'Devices' }).click();
  await alice.getByLabel('Pairing request').fill(request);
  await alice.getByRole('button', { name: 'Add…' }).click();
  const confirm = alice.locator('.run-input:not([hidden])');
  await confirm.waitFor({ timeout: 30_000 });
  expect(await alice.locator('.run-log').last().textContent(), 'what device add shows').toContain('fingerprint');
  await snap(alice, 'alice-confirms-device');
  await confirm.locator('input').fill('y');
  await confirm.locator('button[type=submit]').click();
  await alice.locator('dialog .run-status', { hasText: 'Done.' }).waitFor({ timeout: 60_000 });
  await alice.getByRole('button', { name: 'Close', exact: true }).last().click();

  // The new device's page comes up as alice.
  await laptop.locator('#reg-continue').waitFor({ timeout: 60_000 });
  await laptop.locator('#reg-continue').click();
  await laptop.locator('#app:not([hidden])').waitFor();
  expect(await laptop.locator('#me').textContent(), "the new device's own handle").toContain('@alice');
  await snap(laptop, 'laptop-is-alice');

  // alice's devices list the new one; she revokes it (a lost laptop). Right after joining, the
  // new device appends its own endpoint link, and an append of alice's at that moment loses the
  // race ("expected seq N+1, found N"; the CLI does not retry it): the page says so, she retries.
  // (The Devices dialog is still open under the one that added the device, and re-read.)
  const devices = alice.locator('.devices');
  await eventually(async () => (await devices.locator('li').count()) >= 4, 'primary, two paper keys and the new device', { timeout: 20_000 });
  await snap(alice, 'alice-devices');
  const laptopRow = devices.locator('li').filter({ hasNotText: 'paper' }).filter({ hasNotText: 'this device' }).first();
  for (let attempt = 1; ; attempt++) {
    await laptopRow.getByRole('button', { name: /Revoke/ }).click();
    await alice.getByRole('button', { name: 'Revoke', exact: true }).click();
    const done = await eventually(async () => {
      if (await laptopRow.locator('.tag', { hasText: 'revoked' }).count()) return 'revoked';
      if (await alice.locator('.toast.error', { hasText: 'Not revoked' }).count()) return 'failed';
      return null;
    }, 'the revocation ends', { timeout: 30_000 });
    if (done === 'revoked') break;
    expect(attempt, 'revocation attempts').toBeAtLeast(1);
    if (attempt >= 3) throw new Error('the revocation failed three times');
    await alice.locator('.toast.error .icon-btn').first().click();
    await new Promise(r => setTimeout(r, 1000));
  }
  await snap(alice, 'alice-revoked-device');
  console.log(`devices: joined, added, paper key made, revoked (handle @alice@${DOMAIN})`);
});
