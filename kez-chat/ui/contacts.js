// Contacts: adding one (`add @x --json`, then its verified profile `profile @x --json`), the
// profile view, and the key-change warning with its explicit accept step.
import { el, fill, inline, fmtTime, initial, hueClass } from './text.js';
import { icon } from './icons.js';
import { openDialog, toast } from './dialogs.js';

// handle → {key, message}: contacts whose key changed (a `send`/`add` refused). Kept per page:
// every later send checks again and refuses again, so the warning comes back if it is still so.
const changes = new Map();

export function keyChangeOf(handle) { return changes.get(handle) || null; }

/** If `err` (a failed send/add/share/react) is a key change, remember it and return true. */
export function noteKeyChange(handle, err) {
  const text = `${err?.message || ''}\n${err?.err || ''}`;
  if (err?.code !== 4 || !/key\b[^\n]*\bchanged/i.test(text)) return false;
  const key = /--accept-key (ed25519:[0-9a-f]{64})/.exec(text)?.[1] || null;
  changes.set(handle, { key, message: (err.message || '').trim() || text.trim() });
  return true;
}

/** The prominent warning in the conversation. Accepting needs the user to say they checked. */
export function keyChangeBanner(ctx, handle, change, onChange) {
  const who = inline(ctx.short(handle));
  return el('section', { class: 'key-warning', role: 'alert', 'aria-labelledby': 'kw-title', id: 'key-warning' },
    el('div', { class: 'kw-icon', 'aria-hidden': 'true' }, icon('warn', { size: 30 })),
    el('div', { class: 'kw-main' },
      el('h2', { id: 'kw-title' }, `The key of ${who} changed — nothing was sent`),
      el('p', {}, `Someone may be impersonating ${who}, or their server lies, or ${who} made a new account. `,
        `Check with ${who} in person or on a call before you trust the new key.`),
      el('details', {}, el('summary', {}, 'What kez-chat said'), el('pre', { class: 'prewrap kw-detail' }, change.message)),
      el('div', { class: 'actions start' },
        change.key && el('button', { type: 'button', class: 'btn danger-outline', id: 'kw-accept', onclick: () => acceptKeyDialog(ctx, handle, change, onChange) }, 'I checked the new key…'),
        el('button', { type: 'button', class: 'btn', onclick: () => { changes.delete(handle); onChange(); } }, 'Dismiss'))));
}

function acceptKeyDialog(ctx, handle, change, onChange) {
  const who = inline(ctx.short(handle));
  openDialog(`Accept a new key for ${who}?`, (dialog, close) => {
    const status = el('p', { role: 'status' });
    const box = el('input', { type: 'checkbox', id: 'kw-confirm' });
    const accept = el('button', { type: 'submit', class: 'btn danger', disabled: true, id: 'kw-accept-confirm' }, 'Accept the new key');
    box.addEventListener('change', () => { accept.disabled = !box.checked; });
    const form = el('form', { class: 'stack' },
      el('p', {}, `Only accept it if ${who} told you, another way than this chat, that this is their new key:`),
      el('code', { class: 'key-block' }, change.key),
      el('p', { class: 'check-row' }, box, el('label', { for: 'kw-confirm' }, `I compared this key with ${who} in person or on a call, and it matches.`)),
      status,
      el('div', { class: 'actions' }, el('button', { type: 'button', class: 'btn', onclick: () => close() }, 'Cancel'), accept));
    form.addEventListener('submit', async e => {
      e.preventDefault();
      accept.disabled = true;
      status.textContent = 'Checking the new key…';
      try {
        await ctx.api.json(['add', handle, '--accept-key', change.key, '--json']);
        changes.delete(handle);
        toast(`The new key of ${who} is accepted`);
        close(true);
        ctx.reloadList();
        onChange();
      } catch (err) {
        status.textContent = '';
        status.append(el('strong', { class: 'error-text' }, inline(err.message)));
        accept.disabled = false;
      }
    });
    return form;
  });
}

/** "New conversation": add a contact by handle, show their verified profile, then chat. */
export function addContactDialog(ctx, preset = '') {
  openDialog('New conversation', (dialog, close, body) => {
    const input = el('input', { id: 'add-handle', class: 'input', required: true, spellcheck: 'false', autocomplete: 'off', placeholder: '@bob or @bob@kez.lat', value: preset || '' });
    const status = el('div', { role: 'status', class: 'add-status' });
    const submit = el('button', { type: 'submit', class: 'btn primary', id: 'add-submit' }, 'Look up and verify');
    const result = el('div', { class: 'add-result' });
    const form = el('form', { class: 'stack' },
      el('div', { class: 'field' }, el('label', { for: 'add-handle' }, 'Their handle'), input,
        el('p', { class: 'hint' }, 'kez-chat looks the handle up, verifies its signed history (sigchain) and pins its key.')),
      status,
      el('div', { class: 'actions' }, submit));
    form.addEventListener('submit', async e => {
      e.preventDefault();
      let handle = input.value.trim();
      if (!handle) return;
      if (!handle.startsWith('@')) handle = `@${handle}`;
      submit.disabled = true;
      fill(status, el('span', { class: 'spinner', 'aria-hidden': 'true' }), 'Looking up and verifying…');
      fill(result);
      try {
        const added = await ctx.api.json(['add', handle, '--json']);
        const full = added?.handle || handle;
        const profile = await ctx.api.json(['profile', full, '--json']).catch(() => null);
        fill(status, el('p', { class: 'ok-text' }, added?.change === 'new' ? '✓ Verified and added to your contacts' : '✓ Verified: already in your contacts'));
        form.hidden = true;
        fill(result,
          profile ? profileView(ctx, profile) : el('p', {}, inline(full)),
          el('div', { class: 'actions' },
            el('button', { type: 'button', class: 'btn', onclick: () => close() }, 'Close'),
            el('button', { type: 'button', class: 'btn primary', id: 'add-chat', onclick: () => { close(); ctx.openConversation(full); } }, 'Start chatting')));
        result.querySelector('#add-chat').focus();
        ctx.reloadList();
      } catch (err) {
        submit.disabled = false;
        if (noteKeyChange(handle, err)) {
          close();
          ctx.openConversation(handle);
          return;
        }
        fill(status, el('p', { class: 'error-text' }, err.code === 3 ? `${inline(handle)} is not registered on that server.` : inline(err.message)));
        input.focus();
      }
    });
    return [form, result];
  }, { wide: true });
}

/** A profile as `profile @x --json` gives it: verified keys, devices, endpoints, claims, files. */
export function profileView(ctx, p) {
  const sc = p.sigchain || {};
  const name = ctx.state.contacts.get(p.handle)?.display_name;
  const rows = (label, value) => value === null || value === undefined || value === '' ? null :
    [el('dt', {}, label), el('dd', {}, value)];
  const keyChanged = p.pinned_key && p.key && p.pinned_key !== p.key;
  return el('div', { class: 'profile', id: 'profile-view' },
    el('div', { class: 'profile-head' },
      el('span', { class: ['avatar', 'large', hueClass(p.key)], 'aria-hidden': 'true' }, initial(name || ctx.short(p.handle))),
      el('div', {},
        el('h3', { class: 'profile-name' }, inline(name || ctx.short(p.handle))),
        el('p', { class: 'profile-handle' }, inline(p.handle)),
        el('p', { class: keyChanged ? 'error-text' : 'ok-text' }, keyChanged ? '⚠ The server names another key than the one you pinned' : '✓ Signed history verified on this computer'))),
    el('dl', { class: 'facts' },
      rows('Key', el('code', { class: 'key' }, inline(p.key))),
      sc.current_key && sc.current_key !== p.key ? rows('Current key', el('code', { class: 'key' }, inline(sc.current_key))) : null,
      rows('In contacts', p.in_contacts ? 'yes' : 'no'),
      rows('Registered', p.registered_at ? fmtTime(p.registered_at, { long: true }) : null),
      rows('Sigchain', sc.seq ? `${sc.seq} links, head ${String(sc.head || '').slice(0, 16)}…${sc.rotated ? ' (rotated)' : ''}` : null),
      rows('Shared files', p.files ? `${p.files.visible ?? 0} visible to you` : null)),
    section('Devices', sc.devices, d => el('li', { class: ['device', !d.active && 'revoked'] },
      el('strong', {}, inline(d.name)), ` · ${inline(d.kind)}`, d.active ? '' : ' · revoked',
      d.last_seen ? ` · seen ${fmtTime(d.last_seen)}` : '',
      el('code', { class: 'key small' }, inline(d.key)))),
    section('Endpoints', sc.endpoints, e => el('li', {}, el('strong', {}, inline(e.name)), ` (${inline(e.kind)}) `, el('code', { class: 'small' }, inline(e.address)))),
    section('Claims', sc.claims, c => el('li', {}, typeof c === 'string' ? inline(c) : inline(JSON.stringify(c)))),
    sc.unknown_ops?.length ? el('p', { class: 'hint' }, `${sc.unknown_ops.length} link(s) of kinds this version does not know`) : null);
}

function section(title, items, render) {
  if (!items || !items.length) return null;
  return el('section', { class: 'profile-section' }, el('h4', {}, title), el('ul', { class: 'plain' }, items.map(render)));
}

export function profileDialog(ctx, handle) {
  openDialog(`Profile of ${inline(ctx.short(handle))}`, (dialog, close, body) => {
    const host = el('div', {}, el('p', { role: 'status' }, el('span', { class: 'spinner', 'aria-hidden': 'true' }), 'Verifying…'));
    ctx.api.json(['profile', handle, '--json']).then(p => {
      fill(host, profileView(ctx, p), el('div', { class: 'actions' },
        el('button', { type: 'button', class: 'btn', onclick: () => { close(); ctx.browse(handle); } }, 'Shared files'),
        el('button', { type: 'button', class: 'btn primary', onclick: () => close() }, 'Close')));
    }, err => fill(host, el('p', { class: 'error-text' }, inline(err.message))));
    return host;
  }, { wide: true });
}
