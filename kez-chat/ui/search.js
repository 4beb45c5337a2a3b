// Ctrl+K: jump to a conversation by name as you type, or search every message (`search WORDS
// --json`); a result opens its conversation at the message.
import { el, fill, inline, fmtTime } from './text.js';
import { openDialog } from './dialogs.js';

export function searchDialog(ctx) {
  openDialog('Search', (dialog, close) => {
    const input = el('input', { id: 'search-input', class: 'input', type: 'search', autocomplete: 'off', spellcheck: 'false', placeholder: 'A name, or words in messages', 'aria-describedby': 'search-hint' });
    const jump = el('ul', { class: 'plain results', 'aria-label': 'Conversations' });
    const found = el('ul', { class: 'plain results', 'aria-label': 'Messages' });
    const status = el('p', { role: 'status', class: 'hint' });
    const go = (handle, id) => { close(); ctx.openConversation(handle, { highlight: id || null }); };
    const names = () => {
      const q = input.value.trim().toLowerCase();
      const handles = new Set([...ctx.state.convs.map(c => c.handle), ...ctx.state.contacts.keys()]);
      const hits = q ? [...handles].filter(h => `${ctx.nameOf(h)} ${h}`.toLowerCase().includes(q)).slice(0, 6) : [];
      fill(jump, hits.map(h => el('li', {}, el('button', { type: 'button', class: 'result', onclick: () => go(h) },
        el('strong', {}, inline(ctx.nameOf(h))), ' ', el('span', { class: 'hint' }, inline(ctx.short(h)))))));
    };
    let timer;
    const words = async () => {
      const q = input.value.trim();
      if (!q) { fill(found); fill(status); return; }
      fill(status, 'Searching…');
      try {
        const hits = await ctx.api.json(['search', '--json', '--', q]) || [];
        if (q !== input.value.trim()) return;
        fill(status, hits.length ? `${hits.length} message(s)` : 'No message contains that.');
        fill(found, hits.slice(0, 50).map(h => {
          const handle = h.peer_handle || ctx.handleOfPeer(h.peer);
          const who = handle ? ctx.nameOf(handle) : 'someone not in your contacts';
          return el('li', {}, el('button', {
          type: 'button', class: 'result', onclick: () => go(handle, h.id), disabled: !handle,
        },
          el('span', { class: 'result-top' }, el('strong', {}, h.direction === 'outgoing' ? `You → ${inline(who)}` : inline(who)),
            el('time', { class: 'hint' }, fmtTime(h.time))),
          el('span', { class: 'result-text' }, inline(h.text).slice(0, 200))));
        }));
      } catch (err) { fill(status, el('span', { class: 'error-text' }, inline(err.message))); }
    };
    input.addEventListener('input', () => { names(); clearTimeout(timer); timer = setTimeout(words, 300); });
    const form = el('form', { role: 'search', onsubmit: e => { e.preventDefault(); clearTimeout(timer); words(); } },
      el('label', { for: 'search-input', class: 'visually-hidden' }, 'Search'), input,
      el('p', { id: 'search-hint', class: 'hint' }, 'Type a name to jump to a conversation; words find messages and file names.'));
    return [form, jump, status, found];
  }, { wide: true, className: 'search-dialog' });
}
