// Files: those offered to me (`files --json`, download), what someone publishes (`browse @x
// --json`, download `@x/NAME`), and what I publish (`shared --json`, publish, unpublish).
import { el, fill, inline, fmtSize, fmtTime } from './text.js';
import { openDialog, toast, confirmDialog } from './dialogs.js';

/** A download with a progress bar in `host`; the browser saves the file at the end. */
export function downloadInto(ctx, host, target, name) {
  const bar = el('progress', { max: '100', 'aria-label': `Download of ${inline(name)}` });
  const label = el('span', {}, 'Starting…');
  const cancel = el('button', { type: 'button', class: 'btn small' }, 'Cancel');
  fill(host, el('span', { class: 'dl-progress', role: 'status' }, label, bar, cancel));
  const run = ctx.api.start(['download', target, '--json'], {
    onProgress: p => {
      if (p.total) { bar.max = p.total; bar.value = p.done; fill(label, `${p.what === 'downloading' ? 'Downloading' : p.what} ${fmtSize(p.done)} of ${fmtSize(p.total)}`); }
    },
    onDownload: d => ctx.api.save(d),
  });
  cancel.addEventListener('click', () => run.cancel());
  return run.done.then(
    () => { fill(host, el('span', { class: 'ok-text' }, '✓ Downloaded')); },
    err => { fill(host, el('span', { class: 'error-text' }, inline(err.message))); throw err; });
}

function table(head, rows, empty) {
  if (!rows.length) return el('p', { class: 'hint empty-table' }, empty);
  return el('table', { class: 'files-table' },
    el('thead', {}, el('tr', {}, head.map(h => el('th', { scope: 'col' }, h)))),
    el('tbody', {}, rows));
}

function offeredTab(ctx, host) {
  fill(host, el('p', { role: 'status' }, 'Loading…'));
  ctx.api.json(['files', '--json']).then(files => {
    files = (files || []).slice().sort((a, b) => b.time - a.time);
    fill(host, table(['File', 'From', 'Size', 'When', ''], files.map(f => {
      const cell = el('td', { class: 'row-action' });
      const btn = el('button', {
        type: 'button', class: ['btn', 'small', !f.downloaded && 'primary'], 'aria-label': `Download ${inline(f.name)}`,
        onclick: () => downloadInto(ctx, cell, f.offer, f.name).then(() => ctx.reloadOffers(), () => {}),
      }, f.downloaded ? 'Again' : 'Download');
      cell.append(btn);
      return el('tr', {},
        el('td', { class: 'file-name' }, inline(f.name)),
        el('td', {}, f.from_handle ? el('button', { type: 'button', class: 'link-btn', onclick: () => ctx.openConversation(f.from_handle) }, inline(ctx.short(f.from_handle))) : 'someone not in your contacts'),
        el('td', {}, fmtSize(f.size)),
        el('td', {}, fmtTime(f.time)),
        cell);
    }), 'Nobody offered you a file yet.'));
  }, err => fill(host, el('p', { class: 'error-text' }, inline(err.message))));
}

function sharedTab(ctx, host) {
  fill(host, el('p', { role: 'status' }, 'Loading…'));
  const list = el('div');
  const publishForm = publishBox(ctx, () => load());
  const load = () => ctx.api.json(['shared', '--json']).then(res => {
    const files = res?.files || [];
    fill(list, table(['File', 'For', 'Size', 'Since', ''], files.map(f => el('tr', {},
      el('td', { class: 'file-name' }, inline(f.name)),
      el('td', {}, f.public ? 'everyone' : (f.recipients || []).map(r => inline(ctx.short(r))).join(', ')),
      el('td', {}, fmtSize(f.size)),
      el('td', {}, fmtTime(f.time)),
      el('td', { class: 'row-action' }, el('button', {
        type: 'button', class: 'btn small danger-outline', 'aria-label': `Stop publishing ${inline(f.name)}`,
        onclick: async () => {
          if (!await confirmDialog('Stop publishing?', `${inline(f.name)} is taken out of your shared files. Whoever downloaded it keeps their copy.`, { confirm: 'Unpublish', danger: true })) return;
          try { await ctx.api.json(['unpublish', '--json', '--', f.name]); toast(`Unpublished ${inline(f.name)}`); load(); }
          catch (err) { toast(`Not unpublished: ${err.message}`, { error: true }); }
        },
      }, 'Unpublish')))), 'You do not publish any file yet.'));
  }, err => fill(list, el('p', { class: 'error-text' }, inline(err.message))));
  fill(host, publishForm, el('h3', {}, 'Published'), list);
  load();
}

/** Publish: a file (picker), for everyone or for some contacts. */
function publishBox(ctx, onDone) {
  const file = el('input', { type: 'file', id: 'publish-file', class: 'input', required: true });
  const pub = el('input', { type: 'radio', name: 'aud', id: 'aud-public', value: 'public', checked: true });
  const some = el('input', { type: 'radio', name: 'aud', id: 'aud-to', value: 'to' });
  const to = el('input', { id: 'publish-to', class: 'input', placeholder: '@bob, @carol', spellcheck: 'false', disabled: true, 'aria-label': 'Handles it is for, separated by commas' });
  const status = el('div', { role: 'status' });
  const submit = el('button', { type: 'submit', class: 'btn primary', id: 'publish-submit' }, 'Publish');
  const sync = () => { to.disabled = !some.checked; };
  pub.addEventListener('change', sync);
  some.addEventListener('change', sync);
  const form = el('form', { class: 'stack publish-box', 'aria-labelledby': 'publish-title' },
    el('h3', { id: 'publish-title' }, 'Publish a file'),
    el('div', { class: 'field' }, el('label', { for: 'publish-file' }, 'File'), file),
    el('fieldset', { class: 'field' }, el('legend', {}, 'Who may see it'),
      el('div', { class: 'radio-row' }, pub, el('label', { for: 'aud-public' }, 'Everyone who browses me')),
      el('div', { class: 'radio-row' }, some, el('label', { for: 'aud-to' }, 'Only'), to)),
    el('div', { class: 'actions' }, status, submit));
  form.addEventListener('submit', async e => {
    e.preventDefault();
    const f = file.files[0];
    if (!f) return;
    const handles = to.value.split(/[\s,]+/).filter(Boolean).map(h => h.startsWith('@') ? h : `@${h}`);
    if (some.checked && !handles.length) { fill(status, el('span', { class: 'error-text' }, 'Name at least one handle.')); to.focus(); return; }
    submit.disabled = true;
    const bar = el('progress', { max: '100', value: '0', 'aria-label': 'Publishing' });
    fill(status, 'Uploading…', bar);
    try {
      const ref = await ctx.api.upload(f, (d, t) => { bar.value = t ? (100 * d) / t : 0; });
      const args = ['publish', ref, '--json'];
      if (some.checked) for (const h of handles) args.push('--to', h); else args.push('--public');
      fill(status, 'Encrypting and publishing…', bar);
      await ctx.api.json(args, { onProgress: p => { if (p.total) { bar.max = p.total; bar.value = p.done; } } });
      fill(status, el('span', { class: 'ok-text' }, `✓ Published ${inline(f.name)}`));
      form.reset();
      sync();
      onDone();
    } catch (err) {
      fill(status, el('span', { class: 'error-text' }, inline(err.message)));
    } finally { submit.disabled = false; }
  });
  return form;
}

/** Files offered to me, and my own shared files, in tabs. */
export function filesDialog(ctx, tab = 'offered') {
  openDialog('Files', (dialog) => {
    const tabs = [['offered', 'Offered to me', offeredTab], ['shared', 'My shared files', sharedTab]];
    const panel = el('div', { class: 'tab-panel', role: 'tabpanel', id: 'files-panel', tabindex: '0' });
    const list = el('div', { class: 'tabs', role: 'tablist', 'aria-label': 'Files' });
    const select = name => {
      for (const b of list.children) {
        const on = b.dataset.tab === name;
        b.setAttribute('aria-selected', String(on));
        b.tabIndex = on ? 0 : -1;
        if (on) panel.setAttribute('aria-labelledby', b.id);
      }
      tabs.find(t => t[0] === name)[2](ctx, panel);
    };
    for (const [name, label] of tabs) {
      list.append(el('button', { type: 'button', role: 'tab', id: `tab-${name}`, 'aria-controls': 'files-panel', dataset: { tab: name }, onclick: () => select(name) }, label));
    }
    list.addEventListener('keydown', e => {
      if (e.key !== 'ArrowRight' && e.key !== 'ArrowLeft') return;
      const btns = [...list.children];
      const i = btns.indexOf(document.activeElement);
      const next = btns[(i + (e.key === 'ArrowRight' ? 1 : -1) + btns.length) % btns.length];
      next.focus();
      select(next.dataset.tab);
    });
    select(tab);
    return [list, panel];
  }, { wide: true });
}

/** What someone publishes that I may see; `handle` null asks for one. */
export function browseDialog(ctx, handle) {
  openDialog(handle ? `Files ${inline(ctx.short(handle))} shares` : 'Browse someone’s files', () => {
    const host = el('div', { class: 'browse-list' });
    const load = h => {
      fill(host, el('p', { role: 'status' }, el('span', { class: 'spinner', 'aria-hidden': 'true' }), 'Verifying their manifest…'));
      ctx.api.json(['browse', h, '--json']).then(res => {
        const full = res?.handle || h;
        const files = res?.files || [];
        fill(host, table(['File', 'For', 'Size', 'Since', ''], files.map(f => {
          const cell = el('td', { class: 'row-action' });
          cell.append(el('button', {
            type: 'button', class: 'btn small primary', 'aria-label': `Download ${inline(f.name)}`,
            onclick: () => downloadInto(ctx, cell, `${full}/${f.name}`, f.name).catch(() => {}),
          }, 'Download'));
          return el('tr', {}, el('td', { class: 'file-name' }, inline(f.name)),
            el('td', {}, f.audience === 'public' ? 'everyone' : 'you'),
            el('td', {}, fmtSize(f.size)), el('td', {}, fmtTime(f.time)), cell);
        }), `${inline(ctx.short(full))} shares no file you may see.`));
      }, err => fill(host, el('p', { class: 'error-text' }, inline(err.message))));
    };
    if (handle) { load(handle); return host; }
    const input = el('input', { id: 'browse-handle', class: 'input', required: true, placeholder: '@alice', spellcheck: 'false' });
    const form = el('form', { class: 'row', onsubmit: e => { e.preventDefault(); const v = input.value.trim(); if (v) load(v.startsWith('@') ? v : `@${v}`); } },
      el('label', { for: 'browse-handle' }, 'Handle'), input, el('button', { type: 'submit', class: 'btn primary' }, 'Browse'));
    return [form, host];
  }, { wide: true });
}
