// Settings (`settings --json`, `settings KEY on|off`), the display name (`name`), the theme,
// devices (`devices --json`, `device add REQUEST`, `device revoke NAME`) and the paper key.
import { el, fill, inline, fmtTime } from './text.js';
import { openDialog, toast, confirmDialog, runDialog } from './dialogs.js';

const SETTINGS = [
  ['read-receipts', 'read_receipts', 'Read receipts', 'Tell people when you read their messages.'],
  ['typing', 'typing', 'Typing indicator', 'Tell contacts when you are typing.'],
  ['presence', 'presence', 'Online status', 'Tell contacts when your kez-chat service is online.'],
  ['notifications', 'notifications', 'Notifications', 'Show a notification when a message arrives and this page is hidden.'],
];

export function settingsDialog(ctx) {
  openDialog('Settings', () => {
    const toggles = el('div', { class: 'stack' }, el('p', { role: 'status' }, 'Loading…'));
    const render = () => {
      const s = ctx.state.settings;
      fill(toggles, SETTINGS.map(([key, field, label, hint]) => {
        const id = `set-${key}`;
        const box = el('input', { type: 'checkbox', role: 'switch', id, class: 'switch', checked: !!s[field], 'aria-describedby': `${id}-hint` });
        box.addEventListener('change', async () => {
          const on = box.checked;
          box.disabled = true;
          try {
            if (key === 'notifications' && on && 'Notification' in window && Notification.permission === 'default') {
              await Notification.requestPermission();
            }
            await ctx.api.text(['settings', key, on ? 'on' : 'off']);
            await ctx.refreshSettings();
          } catch (err) {
            box.checked = !on;
            toast(`Not changed: ${err.message}`, { error: true });
          } finally { box.disabled = false; }
        });
        return el('div', { class: 'setting' },
          el('div', {}, el('label', { for: id }, label), el('p', { class: 'hint', id: `${id}-hint` }, hint)), box);
      }));
    };
    ctx.refreshSettings().then(render);

    const nameInput = el('input', { id: 'set-name', class: 'input', maxlength: '64', placeholder: 'Alice Liddell', value: ctx.myName() });
    const nameStatus = el('span', { role: 'status' });
    const nameForm = el('form', { class: 'stack' },
      el('div', { class: 'field' }, el('label', { for: 'set-name' }, 'Display name'), el('div', { class: 'row' }, nameInput, el('button', { type: 'submit', class: 'btn primary' }, 'Save')),
        el('p', { class: 'hint' }, 'Sent, signed by your key, to each of your contacts.')), nameStatus);
    nameForm.addEventListener('submit', async e => {
      e.preventDefault();
      const name = nameInput.value.trim();
      if (!name) return;
      fill(nameStatus, 'Saving…');
      try {
        const r = await ctx.api.json(['name', '--json', '--', name]);
        fill(nameStatus, el('span', { class: 'ok-text' }, `✓ Saved${r?.told?.length ? `; told ${r.told.length} contact(s)` : ''}`));
        ctx.setMyName(r?.display_name || name);
      } catch (err) { fill(nameStatus, el('span', { class: 'error-text' }, inline(err.message))); }
    });

    const theme = el('select', { id: 'set-theme', class: 'input' },
      el('option', { value: '' }, 'Like the system'), el('option', { value: 'light' }, 'Light'), el('option', { value: 'dark' }, 'Dark'));
    theme.value = ctx.theme();
    theme.addEventListener('change', () => ctx.setTheme(theme.value));

    return [
      el('section', { class: 'stack' }, el('h3', {}, 'You'), el('p', { class: 'hint' }, inline(ctx.state.me)), nameForm),
      el('section', { class: 'stack' }, el('h3', {}, 'Privacy and notices'), toggles),
      el('section', { class: 'stack' }, el('h3', {}, 'Look'), el('div', { class: 'field' }, el('label', { for: 'set-theme' }, 'Theme'), theme)),
    ];
  }, { wide: true });
}

export function devicesDialog(ctx) {
  openDialog('Your devices', () => {
    const host = el('div', {}, el('p', { role: 'status' }, 'Loading…'));
    const load = () => ctx.api.json(['devices', '--json']).then(res => {
      const devices = res?.devices || [];
      fill(host, el('ul', { class: 'plain devices' }, devices.map(d => el('li', { class: ['device', !d.active && 'revoked'] },
        el('div', { class: 'device-main' },
          el('strong', {}, inline(d.name)), ` · ${inline(d.kind)}`,
          d.key === res.this_device ? el('span', { class: 'tag' }, 'this device') : null,
          d.active ? null : el('span', { class: 'tag warn' }, 'revoked'),
          el('code', { class: 'key small' }, inline(d.key)),
          el('span', { class: 'hint' }, d.last_seen ? `last seen ${fmtTime(d.last_seen)}` : '')),
        d.active && d.key !== res.this_device ? el('button', {
          type: 'button', class: 'btn small danger-outline', 'aria-label': `Revoke ${inline(d.name)}`,
          onclick: async () => {
            const ok = await confirmDialog(`Revoke ${inline(d.name)}?`, 'From now on its key signs nothing for you. Do this for a lost device or a paper key someone may have seen.', { confirm: 'Revoke', danger: true });
            if (!ok) return;
            try { await ctx.api.text(['device', 'revoke', '--', d.name]); toast(`Revoked ${inline(d.name)}`); load(); }
            catch (err) { toast(`Not revoked: ${err.message}`, { error: true }); }
          },
        }, 'Revoke') : null))));
    }, err => fill(host, el('p', { class: 'error-text' }, inline(err.message))));
    load();

    const req = el('input', { id: 'device-request', class: 'input', placeholder: 'kez-pair:…', spellcheck: 'false', autocomplete: 'off' });
    const addForm = el('form', { class: 'stack' },
      el('h3', {}, 'Add a device'),
      el('p', { class: 'hint' }, 'On the new device run `kez-chat device join @you`, and paste the pairing request it shows.'),
      el('div', { class: 'field' }, el('label', { for: 'device-request' }, 'Pairing request'), el('div', { class: 'row' }, req, el('button', { type: 'submit', class: 'btn primary' }, 'Add…'))));
    addForm.addEventListener('submit', async e => {
      e.preventDefault();
      const line = req.value.trim();
      if (!line) return;
      await runDialog(ctx.api, 'Add a device', ['device', 'add', '--', line], 'Check that the fingerprint matches what the new device shows.');
      load();
    });
    return [host, addForm,
      el('div', { class: 'actions start' }, el('button', { type: 'button', class: 'btn', onclick: () => paperKeyDialog(ctx).then(load) }, 'Make a paper key…'))];
  }, { wide: true });
}

export function paperKeyDialog(ctx) {
  return runDialog(ctx.api, 'Paper key', ['paperkey'],
    'A paper key is 24 words that can recover your identity when every device is lost. Write them down; you will type one back.');
}
