// Two people in two browsers, each on their own `kez-chat ui` gateway, from unregistered homes
// to a conversation: register (paper key shown, one word typed back), add a contact (verified
// profile), chat live both ways with ✓ delivered and ✓✓ read, typing, edit, delete, reaction,
// reply, a shared file downloaded byte for byte, a published file browsed and downloaded, hostile
// text shown as text, a narrow window and the dark theme, and a key change that is warned about.
//
// Run by tests/tests/ui_browser.rs (see lib.mjs for the environment); the key change asks the
// harness to make the server name a new key for bob (changeBobsKey()).

import { readFileSync, mkdirSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { join, dirname } from 'node:path';
import { createInterface } from 'node:readline';

import { env, eventually, expect, scenario, shot, withTimeout, paperWord, unlabelledControls } from './lib.mjs';

const DOMAIN = env('KEZ_DOMAIN');
const SERVER = env('KEZ_SERVER');
const SHOTS = env('KEZ_SCREENSHOTS');
const DOWNLOADS = join(dirname(SHOTS), `${SHOTS.split('/').pop()}-downloads`);
mkdirSync(DOWNLOADS, { recursive: true });

let shotNo = 0;
/** A numbered screenshot: `07-bob-sees-typing.png`. */
const snap = (page, what) => shot(page, `${String(++shotNo).padStart(2, '0')}-${what}`);
const log = (...a) => console.log(`[${new Date().toISOString().slice(11, 19)}]`, ...a);

/** Registers through the welcome screen: name, server, the paper key, one word typed back. */
async function register(page, name) {
  await page.locator('#reg-name').waitFor({ state: 'visible' });
  await snap(page, `${name}-welcome`);
  expect(await unlabelledControls(page), 'controls without a name on the welcome screen').toEqual([]);
  await page.getByLabel('Your name').fill(name);
  const server = page.getByLabel('Server');
  if (!(await server.inputValue())) await server.fill(SERVER);
  await page.getByRole('button', { name: 'Create my account' }).click();
  // The paper key block (the CLI's own text), then a prompt "Type word N …" with an input.
  const prompt = page.locator('.run-input:not([hidden]) label');
  await prompt.waitFor({ state: 'visible', timeout: 30_000 });
  const promptText = await prompt.textContent();
  const n = Number(/word (\d+)/.exec(promptText)?.[1]);
  expect(n, `the word number in ${JSON.stringify(promptText)}`).toBeGreaterThan(0);
  const block = await page.locator('.run-out').textContent();
  expect(block, 'the paper key block').toContain('paper key');
  const word = paperWord(block, n);
  expect(word, `word ${n} of the paper key`).toBeTruthy();
  await snap(page, `${name}-paper-key`);
  await page.locator('.run-input:not([hidden]) input').fill(word);
  await page.locator('.run-input:not([hidden]) button[type=submit]').click();
  const outcome = await eventually(async () => {
    if (await page.locator('#reg-done').isVisible()) return 'done';
    if ((await page.locator('.run-log').textContent()).includes('That is not word')) return 'wrong';
    return null;
  }, `${name}'s registration ends`, { timeout: 30_000 });
  expect(outcome, `${name}'s registration (word ${n}: ${JSON.stringify(word)})`).toBe('done');
  log(`${name} registered (paper key word ${n} confirmed)`);
  await snap(page, `${name}-registered`);
  await page.locator('#reg-continue').click();
  await page.locator('#conv-list').waitFor({ state: 'attached' });
  await page.locator('#app:not([hidden])').waitFor();
}

/** The message bubble (li.msg) whose text contains `text`. */
const bubble = (page, text) => page.locator('#messages li.msg', { hasText: text }).last();

/** Opens a message's actions menu and picks an item. */
async function messageAction(page, text, item) {
  const msg = bubble(page, text);
  await msg.hover();
  await msg.locator('.msg-menu-btn').click();
  await page.getByRole('menuitem', { name: item, exact: true }).click();
}

async function send(page, text) {
  const box = page.getByRole('textbox', { name: 'Message' });
  await box.fill(text);
  await box.press('Enter');
}

async function settingOn(page, label) {
  await page.locator('#main-menu').click();
  await page.getByRole('menuitem', { name: 'Settings and name' }).click();
  const sw = page.getByRole('switch', { name: label });
  await sw.waitFor();
  await eventually(async () => !(await sw.isDisabled()), `the ${label} switch is ready`);
  if (!(await sw.isChecked())) await sw.check();
  await eventually(async () => (await sw.isChecked()) && !(await sw.isDisabled()), `${label} is on`);
}

/**
 * Makes the server name another key for @bob, through the harness (tests/src/browser.rs): a
 * line `KEZ-REKEY bob` on stdout, answered `KEZ-REKEYED` on stdin once the registry's record of
 * bob names an impostor's key (as the lying server of tests/tests/cli.rs). A harness that does not
 * offer it (KEZ_REKEY=stdin) fails the scenario: the key-change warning is never skipped.
 */
async function changeBobsKey() {
  expect(process.env.KEZ_REKEY, 'KEZ_REKEY (the harness must offer KEZ-REKEY)').toBe('stdin');
  const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
  console.log('KEZ-REKEY bob');
  const answer = await withTimeout(lines.next(), 60_000, 'the harness answer to KEZ-REKEY');
  expect(answer.value, 'the harness answer to KEZ-REKEY').toBe('KEZ-REKEYED');
}

await scenario('two_users', async ({ open }) => {
  const alice = await open('alice', env('KEZ_UI_ALICE'));
  const bob = await open('bob', env('KEZ_UI_BOB'));
  await Promise.all([register(alice, 'alice'), register(bob, 'bob')]);
  const bobHandle = `@bob@${DOMAIN}`;

  // alice adds bob: the verified profile (key, devices, endpoints) is shown before chatting.
  await alice.getByRole('button', { name: /New conversation/ }).click();
  await alice.getByLabel('Their handle').fill('@bob');
  await alice.getByRole('button', { name: 'Look up and verify' }).click();
  const profile = alice.locator('#profile-view');
  await profile.waitFor({ timeout: 30_000 });
  const profileText = await profile.textContent();
  expect(profileText, 'the verified profile').toContain(bobHandle);
  expect(profileText, 'the verified profile').toContain('verified');
  expect(profileText, 'the verified profile').toMatch(/ed25519:[0-9a-f]{64}/);
  expect(profileText, 'the verified profile').toContain('Devices');
  await snap(alice, 'alice-verified-bob');
  await alice.locator('#add-chat').click();
  await alice.locator('#chat-name').waitFor();
  log('alice added bob (verified profile shown)');
  // bob adds alice too (receipts go to contacts only), and closes the dialog: no chat is open.
  await bob.getByRole('button', { name: /New conversation/ }).click();
  await bob.getByLabel('Their handle').fill('alice');
  await bob.getByRole('button', { name: 'Look up and verify' }).click();
  await bob.locator('#profile-view').waitFor({ timeout: 30_000 });
  await bob.getByRole('button', { name: 'Close', exact: true }).last().click();
  await bob.locator('.conv', { hasText: 'alice' }).waitFor();

  // Typing notices are opt-in; alice turns them on, and gives herself a display name.
  await settingOn(alice, 'Typing indicator');
  await alice.getByLabel('Display name').fill('Alice Liddell');
  await alice.getByRole('button', { name: 'Save' }).click();
  await alice.getByText('✓ Saved').waitFor({ timeout: 20_000 });
  await alice.keyboard.press('Escape');

  // alice → bob: bob's list shows the conversation live, unread; alice sees ✓ delivered.
  await send(alice, 'Hello Bob!');
  const sent = bubble(alice, 'Hello Bob!');
  await sent.waitFor();
  await eventually(async () => (await sent.getAttribute('data-status')) === 'delivered',
    "alice's message shows ✓ delivered", { timeout: 30_000 });
  expect(await sent.locator('.status').textContent(), 'the delivered mark').toBe('✓');
  // Both registered with this release: bob's device has an Olm key, so the header says so.
  expect(await alice.locator('#secrecy-tag').textContent(), 'the conversation header').toContain('forward secret');
  expect(await alice.locator('#secrecy-tag').getAttribute('class'), 'not the warning').not.toContain('warn');
  await snap(alice, 'alice-sent-delivered');
  const bobConv = bob.locator('.conv', { hasText: /Alice|alice/ });
  await bobConv.waitFor({ timeout: 30_000 });
  await eventually(async () => (await bobConv.locator('.badge').count()) === 1, "bob's list shows an unread badge");
  await snap(bob, 'bob-new-message-unread');
  await bobConv.click();
  await bubble(bob, 'Hello Bob!').waitFor();
  // bob read it: alice's ✓ becomes ✓✓.
  await eventually(async () => (await sent.getAttribute('data-status')) === 'read',
    "alice's message shows ✓✓ read", { timeout: 30_000 });
  expect(await sent.locator('.status').textContent(), 'the read mark').toBe('✓✓');
  await snap(alice, 'alice-sent-read');
  log('live message, ✓ delivered then ✓✓ read');

  // bob → alice, live.
  await send(bob, 'Hi Alice, good to see you here');
  await bubble(alice, 'good to see you here').waitFor({ timeout: 30_000 });
  log(`bob's header names alice: ${await bob.locator('#chat-name').textContent()}`);

  // alice types: bob sees "is typing…".
  await alice.getByRole('textbox', { name: 'Message' }).pressSequentially('Let me think', { delay: 30 });
  await bob.locator('.typing-line.on').waitFor({ timeout: 20_000 });
  expect(await bob.locator('.typing-line').textContent(), "bob's typing line").toContain('typing');
  await snap(bob, 'bob-sees-alice-typing');
  await alice.getByRole('textbox', { name: 'Message' }).press('Enter');
  await bubble(bob, 'Let me think').waitFor({ timeout: 30_000 });
  await eventually(async () => !(await bob.locator('.typing-line.on').count()), 'the typing line goes away', { timeout: 20_000 });
  log('typing seen');

  // alice edits a message; bob sees the new text, marked edited.
  await send(alice, 'Meet at 5?');
  await bubble(bob, 'Meet at 5?').waitFor({ timeout: 30_000 });
  await messageAction(alice, 'Meet at 5?', 'Edit');
  const box = alice.getByRole('textbox', { name: 'Message' });
  expect(await box.inputValue(), 'the composer while editing').toBe('Meet at 5?');
  await box.fill('Meet at 6?');
  await box.press('Enter');
  const edited = bubble(bob, 'Meet at 6?');
  await edited.waitFor({ timeout: 30_000 });
  await edited.locator('.edited').waitFor();
  expect(await bob.locator('#messages').textContent(), "bob's messages").not.toContain('Meet at 5?');
  log('edit seen');

  // alice deletes one; bob sees it deleted.
  await send(alice, 'oops, wrong chat');
  await bubble(bob, 'oops, wrong chat').waitFor({ timeout: 30_000 });
  await messageAction(alice, 'oops, wrong chat', 'Delete for everyone');
  await alice.getByRole('button', { name: 'Delete for everyone' }).click();
  await bob.locator('#messages .text.deleted').waitFor({ timeout: 30_000 });
  expect(await bob.locator('#messages').textContent(), "bob's messages").not.toContain('oops, wrong chat');
  await snap(bob, 'bob-sees-edit-and-delete');
  log('delete seen');

  // bob reacts to alice's first message and replies to the edited one; alice sees both.
  await messageAction(bob, 'Hello Bob!', 'React 👍');
  await bubble(alice, 'Hello Bob!').locator('.reaction').waitFor({ timeout: 30_000 });
  expect(await bubble(alice, 'Hello Bob!').locator('.reaction').textContent(), 'the reaction').toContain('👍');
  await messageAction(bob, 'Meet at 6?', 'Reply');
  await bob.locator('.mode-bar:not([hidden])').waitFor();
  await send(bob, '6 works for me');
  const reply = bubble(alice, '6 works for me');
  await reply.waitFor({ timeout: 30_000 });
  expect(await reply.locator('.quote').textContent(), 'the quoted message').toContain('Meet at 6?');
  await snap(alice, 'alice-sees-reaction-and-reply');
  log('reaction and reply seen');

  // alice shares a file (the picker); bob downloads it with progress; the bytes are the same.
  const original = randomBytes(700_000);
  await alice.locator('#attach-input').setInputFiles({ name: 'holiday-photos.bin', mimeType: 'application/octet-stream', buffer: original });
  await alice.locator('.transfer').waitFor();
  const card = bob.locator('#messages .file-card', { hasText: 'holiday-photos.bin' });
  await card.waitFor({ timeout: 30_000 });
  await snap(alice, 'alice-shares-file');
  const [download] = await Promise.all([
    bob.waitForEvent('download', { timeout: 60_000 }),
    card.getByRole('button', { name: /Download/ }).click(),
  ]);
  const saved = join(DOWNLOADS, 'holiday-photos.bin');
  await download.saveAs(saved);
  expect(download.suggestedFilename(), 'the downloaded file name').toBe('holiday-photos.bin');
  expect(readFileSync(saved).equals(original), 'the downloaded bytes equal the shared ones').toBe(true);
  await alice.locator('.transfer', { hasText: 'downloaded' }).waitFor({ timeout: 30_000 });
  await snap(bob, 'bob-downloaded-file');
  log('file shared and downloaded byte for byte');

  // Drag and drop: a file dropped on the conversation is shared too.
  const dropped = await alice.evaluateHandle(() => {
    const dt = new DataTransfer();
    dt.items.add(new File(['dropped on the chat\n'], 'dropped-note.txt', { type: 'text/plain' }));
    return dt;
  });
  await alice.locator('#chat').dispatchEvent('dragenter', { dataTransfer: dropped });
  await alice.locator('.drop-zone:not([hidden])').waitFor();
  await snap(alice, 'alice-drags-a-file');
  await alice.locator('#chat').dispatchEvent('drop', { dataTransfer: dropped });
  await bob.locator('#messages .file-card', { hasText: 'dropped-note.txt' }).waitFor({ timeout: 30_000 });
  log('a dropped file is offered');

  // alice publishes a file for everyone; bob browses her files and downloads it.
  const published = Buffer.from('The minutes of the tea party.\n'.repeat(100));
  await alice.locator('#main-menu').click();
  await alice.getByRole('menuitem', { name: 'My shared files' }).click();
  await alice.locator('#publish-file').setInputFiles({ name: 'minutes.txt', mimeType: 'text/plain', buffer: published });
  await alice.locator('#publish-submit').click();
  await alice.getByText('✓ Published minutes.txt').waitFor({ timeout: 30_000 });
  await alice.locator('.files-table', { hasText: 'minutes.txt' }).waitFor();
  await snap(alice, 'alice-published');
  await alice.keyboard.press('Escape');
  await bob.locator('#browse-btn').click();
  const row = bob.locator('.files-table tr', { hasText: 'minutes.txt' });
  await row.waitFor({ timeout: 30_000 });
  await snap(bob, 'bob-browses-alice');
  const [dl2] = await Promise.all([
    bob.waitForEvent('download', { timeout: 60_000 }),
    row.getByRole('button', { name: /Download/ }).click(),
  ]);
  const saved2 = join(DOWNLOADS, 'minutes.txt');
  await dl2.saveAs(saved2);
  expect(readFileSync(saved2).equals(published), 'the published file downloaded byte for byte').toBe(true);
  await bob.keyboard.press('Escape');
  log('published file browsed and downloaded');

  // alice unpublishes it (after confirming); bob's browse no longer lists it.
  await alice.locator('#main-menu').click();
  await alice.getByRole('menuitem', { name: 'My shared files' }).click();
  await alice.getByRole('button', { name: 'Stop publishing minutes.txt' }).click();
  await alice.getByRole('button', { name: 'Unpublish', exact: true }).click();
  await alice.getByText('You do not publish any file yet.').waitFor({ timeout: 30_000 });
  await alice.keyboard.press('Escape');
  await bob.locator('#browse-btn').click();
  await bob.getByText('shares no file you may see').waitFor({ timeout: 30_000 });
  await bob.keyboard.press('Escape');
  log('unpublished');

  // Search (Ctrl+K): bob finds alice's message and jumps to it.
  await bob.keyboard.press('Control+K');
  await bob.getByRole('searchbox', { name: 'Search' }).fill('let me');
  const hit = bob.locator('.result', { hasText: 'Let me think' });
  await hit.waitFor({ timeout: 20_000 });
  await snap(bob, 'bob-search');
  await hit.click();
  await bob.locator('#messages li.msg.flash', { hasText: 'Let me think' }).waitFor();
  log('search finds and jumps to a message');

  // Hostile text: shown as text, nothing runs, no element is made of it; bidi is made visible.
  const hostile = ['<img src=x onerror="window.__pwned=1">', '<script>window.__pwned=1</script>', 'invoice\u202Etxt.exe'];
  for (const text of hostile) await send(alice, text);
  await bubble(bob, 'invoice').waitFor({ timeout: 30_000 });
  await bubble(bob, '<script>').waitFor();
  const listText = await bob.locator('#messages').textContent();
  expect(listText, "bob's messages").toContain('<img src=x onerror="window.__pwned=1">');
  expect(listText, "bob's messages").toContain('<script>window.__pwned=1</script>');
  expect(listText, "bob's messages").toContain('invoice<U+202E>txt.exe');
  expect(listText, "bob's messages").not.toContain('\u202E');
  expect(await bob.locator('#messages img, #messages script').count(), 'img/script elements in the messages').toBe(0);
  expect(await bob.evaluate(() => window.__pwned), 'window.__pwned on bob').toBe(undefined);
  expect(await alice.evaluate(() => window.__pwned), 'window.__pwned on alice').toBe(undefined);
  await snap(bob, 'bob-hostile-text');
  log('hostile text stays text');
  // Every control a person can reach has a name a screen reader says, in the full chat view
  // (list, conversation, composer, message actions) and in a dialog.
  for (const page of [alice, bob]) {
    expect(await unlabelledControls(page), 'controls without a name in the chat view').toEqual([]);
  }
  await alice.keyboard.press('F1');
  await alice.getByRole('dialog').waitFor();
  expect(await unlabelledControls(alice), 'controls without a name in the shortcuts dialog').toEqual([]);
  await alice.keyboard.press('Escape');

  // A narrow window (375 px): the list and the chat are separate screens.
  await bob.setViewportSize({ width: 375, height: 740 });
  await snap(bob, 'bob-narrow-chat');
  await bob.getByRole('button', { name: 'Back to the conversations' }).click();
  await bob.locator('#conv-list').waitFor({ state: 'visible' });
  await snap(bob, 'bob-narrow-list');
  await bob.locator('.conv').first().click();
  await bob.locator('#composer-input').waitFor({ state: 'visible' });
  // The dark theme.
  await alice.locator('#theme-toggle').click();
  expect(await alice.evaluate(() => document.documentElement.dataset.theme), 'the theme').toBe('dark');
  await snap(alice, 'alice-dark');
  await bob.keyboard.press('Alt+T');
  expect(await bob.evaluate(() => document.documentElement.dataset.theme), "bob's theme (Alt+T)").toBe('dark');
  await snap(bob, 'bob-narrow-dark');
  log('narrow window and dark theme');

  // A browser notification: bob turns them on (the browser grants the permission), looks away
  // (his page hidden) and alice writes; his page shows a Notification with her name and text.
  await bob.setViewportSize({ width: 1280, height: 720 });
  await bob.context().grantPermissions(['notifications']);
  await bob.evaluate(() => {
    window.__notified = [];
    const Real = window.Notification;
    window.Notification = class extends Real {
      constructor(title, options) { super(title, options); window.__notified.push({ title, body: options?.body }); }
    };
    Object.defineProperty(document, 'hidden', { configurable: true, get: () => true });
  });
  await settingOn(bob, 'Notifications');
  await bob.keyboard.press('Escape');
  await send(alice, 'Are you there?');
  const notified = await eventually(() => bob.evaluate(() => window.__notified.find(n => n.body === 'Are you there?')), 'a notification of the message in bob\'s page', { timeout: 30_000 });
  expect(notified.title, 'the notification names the sender').toBe('Alice Liddell');
  await bob.evaluate(() => { delete document.hidden; });
  log('notification shown while the page was hidden');

  // A key change: the server names a new key for bob (it lies, or bob's name went to a new
  // account). alice's next send is refused and warned about; accepting needs a confirmation.
  await changeBobsKey();
  await send(alice, 'Are you still you?');
  const warning = alice.locator('#key-warning');
  await warning.waitFor({ timeout: 30_000 });
  expect(await warning.textContent(), 'the key-change warning').toContain('changed');
  expect(await warning.getAttribute('role'), 'the warning role').toBe('alert');
  // Nothing was sent: the text is back in the composer.
  expect(await alice.getByRole('textbox', { name: 'Message' }).inputValue(), 'the unsent text').toBe('Are you still you?');
  await snap(alice, 'alice-key-change-warning');
  await alice.locator('#kw-accept').click();
  const accept = alice.locator('#kw-accept-confirm');
  expect(await accept.isDisabled(), 'accept before confirming').toBe(true);
  await snap(alice, 'alice-key-change-confirm');
  await alice.getByLabel(/I compared this key/).check();
  expect(await accept.isDisabled(), 'accept after confirming').toBe(false);
  await accept.click();
  await eventually(async () => !(await warning.count()), 'the warning goes once the key is accepted', { timeout: 30_000 });
  await alice.getByRole('textbox', { name: 'Message' }).press('Enter');
  await bubble(alice, 'Are you still you?').waitFor({ timeout: 30_000 });
  log('key change warned about, accepted only after confirmation');
});
