// The open conversation: header, messages (bubbles, ✓ delivered / ✓✓ read, reactions, replies,
// edits, deletions, file offers), the typing line, the key-change warning, transfers, and the
// composer (Enter sends, Shift+Enter is a new line; drop a file on the chat to share it).
import { el, fill, inline, fmtTime, fmtDay, fmtSize, initial, hueClass } from './text.js';
import { icon } from './icons.js';
import { toast, confirmDialog, popupMenu } from './dialogs.js';
import { keyChangeOf, keyChangeBanner } from './contacts.js';

const REACTIONS = ['👍', '❤️', '😂', '😮', '😢', '🎉'];
const TYPING_EVERY = 4000;   // at most one `typing @x` per this many ms while typing
const TYPING_IDLE = 5000;    // `typing @x --stop` after this long without a key

/** Makes `list`'s children `items`, touching only what differs from the first difference on:
 * a new message at the end moves nothing above it (no relayout of the whole conversation). */
function reconcile(list, items) {
  let same = 0;
  while (same < items.length && list.children[same] === items[same]) same++;
  while (list.children.length > same) list.lastChild.remove();
  list.append(...items.slice(same));
}

export class ChatView {
  constructor(ctx, root) {
    this.ctx = ctx;
    this.root = root;
    this.handle = null;
    this.messages = [];
    /** id → { key, node }: a message's element, kept while what it shows is the same, so a new
     * message costs one element, not the whole conversation's. */
    this.bubbles = new Map();
    this.peerKey = null;
    this.mode = null;          // {kind: 'reply'|'edit', msg}
    this.pending = [];         // sends not yet confirmed: shown greyed
    this.transfers = new Map(); // run id → transfer row
    this.loading = null;
    this.again = false;
    this.typingSentAt = 0;
    this.typingTimer = null;
    this.renderEmpty();
    document.addEventListener('visibilitychange', () => {
      if (!document.hidden && this.staleWhileHidden) { this.staleWhileHidden = false; this.reload(); }
    });
  }

  peer() { return this.peerKey; }

  renderEmpty() {
    fill(this.root, el('div', { class: 'chat-empty' },
      el('img', { src: 'icon.svg', alt: '', width: '72', height: '72' }),
      el('h2', {}, 'kez-chat'),
      el('p', {}, 'Choose a conversation, or start a new one with the + button (Alt+N).')));
  }

  open(handle, { focus = true, highlight = null } = {}) {
    const changed = handle !== this.handle;
    if (changed) {
      this.stopTyping();
      this.handle = handle;
      this.messages = [];
      this.bubbles = new Map();
      this.mode = null;
      this.pending = [];
      this.highlight = highlight;
      const conv = this.ctx.convOf(handle);
      const contact = this.ctx.state.contacts.get(handle);
      this.peerKey = conv?.peer || contact?.key || null;
      this.build();
    } else if (highlight) this.highlight = highlight;
    this.reload().then(() => { if (focus) this.input.focus(); });
    if (focus) this.input.focus();
  }

  /** The DOM skeleton of a conversation; the parts are re-rendered separately. */
  build() {
    this.headerSignature = null;
    this.header = el('header', { class: 'chat-head' });
    this.banner = el('div', { class: 'banner-host' });
    // Not a live region itself: the list is re-rendered whole, which would re-read everything.
    // New messages from the other side are announced through ctx.announce instead.
    this.list = el('ol', { class: 'messages', id: 'messages', 'aria-label': 'Messages' });
    this.scroller = el('div', { class: 'scroller', tabindex: '-1' }, this.list);
    this.typingLine = el('div', { class: 'typing-line', 'aria-live': 'polite' });
    this.transferHost = el('div', { class: 'transfers', 'aria-label': 'File transfers' });
    this.modeBar = el('div', { class: 'mode-bar', hidden: true });
    this.input = el('textarea', {
      id: 'composer-input', class: 'composer-input', rows: '1', placeholder: 'Write a message',
      'aria-label': 'Message', 'aria-describedby': 'composer-hint', autocomplete: 'off',
    });
    this.fileInput = el('input', { type: 'file', id: 'attach-input', class: 'visually-hidden', multiple: true, tabindex: '-1', 'aria-hidden': 'true' });
    const attach = el('button', { type: 'button', class: 'icon-btn', id: 'attach-btn', 'aria-label': 'Share a file', title: 'Share a file (or drop it on the chat)', onclick: () => this.fileInput.click() }, icon('attach'));
    this.sendBtn = el('button', { type: 'submit', class: 'send-btn', id: 'send-btn', 'aria-label': 'Send', title: 'Send (Enter)' }, icon('send'));
    this.form = el('form', { class: 'composer', 'aria-label': 'Write a message' },
      attach, this.fileInput,
      el('div', { class: 'composer-box' }, this.input),
      this.sendBtn,
      el('p', { id: 'composer-hint', class: 'visually-hidden' }, 'Enter sends, Shift+Enter starts a new line, Up edits your last message.'));
    this.dropZone = el('div', { class: 'drop-zone', hidden: true, 'aria-hidden': 'true' }, el('div', {}, 'Drop to share with ', inline(this.ctx.short(this.handle))));
    fill(this.root, this.header, this.banner, this.scroller, this.typingLine, this.transferHost, this.modeBar, this.form, this.dropZone);

    this.form.addEventListener('submit', e => { e.preventDefault(); this.submit(); });
    this.input.addEventListener('keydown', e => this.onComposerKey(e));
    this.input.addEventListener('input', () => { this.autosize(); this.onTypingInput(); });
    this.fileInput.addEventListener('change', () => {
      const files = [...this.fileInput.files];
      this.fileInput.value = '';
      for (const f of files) this.share(f);
    });
    // Drag and drop anywhere on the conversation shares the file with this person.
    let depth = 0;
    const hasFiles = e => [...(e.dataTransfer?.types || [])].includes('Files');
    this.root.addEventListener('dragenter', e => { if (!hasFiles(e)) return; e.preventDefault(); depth++; this.dropZone.hidden = false; });
    this.root.addEventListener('dragover', e => { if (!hasFiles(e)) return; e.preventDefault(); e.dataTransfer.dropEffect = 'copy'; });
    this.root.addEventListener('dragleave', () => { if (--depth <= 0) { depth = 0; this.dropZone.hidden = true; } });
    this.root.addEventListener('drop', e => {
      if (!hasFiles(e)) return;
      e.preventDefault();
      depth = 0;
      this.dropZone.hidden = true;
      for (const f of e.dataTransfer.files) this.share(f);
    });
    this.list.addEventListener('keydown', e => this.onMessageKey(e));
    this.renderHeader();
    this.renderBanner();
    this.renderTyping();
  }

  // ------------------------------------------------------------ loading

  /** Re-reads the conversation (`history @x --json`, which also marks it read). */
  async reload() {
    if (!this.handle) return;
    // Reading a conversation marks it read (and tells the sender ✓✓): not while nobody looks.
    if (document.hidden) { this.staleWhileHidden = true; return; }
    if (this.loading) { this.again = true; return this.loading; }
    this.loading = (async () => {
      do {
        this.again = false;
        const handle = this.handle;
        try {
          const msgs = await this.ctx.api.json(['history', handle, '--json']);
          if (handle !== this.handle) continue;
          this.messages = msgs || [];
          // Learn the peer's key from the messages when the list did not know it yet.
          if (!this.peerKey) {
            const m = this.messages[0];
            if (m) this.peerKey = m.direction === 'incoming' ? m.from : m.to;
          }
          this.renderMessages();
        } catch (err) {
          if (err.code !== 'disconnected') toast(`Could not read the conversation: ${err.message}`, { error: true });
        }
      } while (this.again);
      this.loading = null;
    })();
    return this.loading;
  }

  /** A message the live stream just brought for this conversation: shown at once from the
   * event, before the re-read (`history`) that marks it read and brings its full state. */
  showArrived(ev) {
    if (!this.handle || this.messages.some(m => m.id === ev.id)) return;
    if (!['text', 'kez.reply', 'file-offer'].includes(ev.content_type)) return;
    this.messages.push({
      id: ev.id, direction: ev.direction, from: ev.from, to: ev.to, time: ev.time,
      content_type: ev.content_type, text: ev.text, in_contacts: ev.in_contacts,
      from_retired_key_of: ev.from_retired_key_of, reply_to: null, reactions: {},
      edited: false, deleted: false, delivered: false, read: false, expires_at: null,
    });
    this.renderMessages();
  }

  // ------------------------------------------------------------ rendering

  renderHeader() {
    if (!this.handle || !this.header) return;
    const { ctx } = this;
    const name = ctx.nameOf(this.handle);
    const contact = ctx.state.contacts.get(this.handle);
    const presence = ctx.state.presence.get(this.handle);
    const conv = ctx.convOf(this.handle);
    if (!this.peerKey) this.peerKey = conv?.peer || contact?.key || null;
    // Rebuilt only when what it shows changed, so a focused header button keeps its focus.
    const signature = JSON.stringify([this.handle, name, presence, !!contact, contact?.forward_secret, this.peerKey]);
    if (signature === this.headerSignature) return;
    this.headerSignature = signature;
    fill(this.header,
      el('button', { type: 'button', class: 'icon-btn back-btn', 'aria-label': 'Back to the conversations', onclick: () => ctx.showList() }, icon('back')),
      el('span', { class: ['avatar', hueClass(this.peerKey || this.handle)], 'aria-hidden': 'true' }, initial(name)),
      el('div', { class: 'chat-title' },
        el('h1', { class: 'chat-name', id: 'chat-name' }, inline(name)),
        el('p', { class: 'chat-sub' },
          el('span', { class: 'chat-handle' }, inline(this.handle)),
          presence && el('span', { class: ['presence-text', presence] }, ` · ${presence}`),
          contact ? null : el('span', { class: 'tag warn' }, 'not in contacts'),
          contact && (contact.forward_secret
            ? el('span', { class: 'tag secrecy', id: 'secrecy-tag', title: 'Every device of theirs has an Olm key: a key stolen later does not open these messages' }, '🔒 forward secret')
            : el('span', { class: 'tag warn', id: 'secrecy-tag', title: 'A device of theirs has no Olm key yet (an older client): a key stolen later opens what it gets' }, 'not forward secret')))),
      el('div', { class: 'chat-tools' },
        contact ? null : el('button', { type: 'button', class: 'btn small', onclick: () => ctx.addContact(this.handle) }, 'Add contact'),
        el('button', { type: 'button', class: 'icon-btn', 'aria-label': `Share a file with ${inline(name)}`, title: 'Share a file', onclick: () => this.fileInput.click() }, icon('upload')),
        el('button', {
          type: 'button', class: 'icon-btn', id: 'timer-btn', 'aria-label': 'Disappearing messages', 'aria-haspopup': 'menu',
          title: 'Disappearing messages', onclick: e => this.timerMenu(e.currentTarget),
        }, icon('timer')),
        el('button', { type: 'button', class: 'icon-btn', id: 'browse-btn', 'aria-label': `Files ${inline(name)} shares`, title: 'Their shared files', onclick: () => ctx.browse(this.handle) }, icon('folder')),
        el('button', { type: 'button', class: 'icon-btn', id: 'profile-btn', 'aria-label': `Profile of ${inline(name)}`, title: 'Profile and keys', onclick: () => ctx.profile(this.handle) }, icon('info'))));
    this.root.setAttribute('aria-labelledby', 'chat-name');
  }

  renderBanner() {
    if (!this.banner) return;
    const change = keyChangeOf(this.handle);
    fill(this.banner, change ? keyChangeBanner(this.ctx, this.handle, change, () => { this.renderBanner(); this.reload(); }) : null);
  }

  renderTyping() {
    if (!this.typingLine) return;
    const typing = this.peerKey && this.ctx.state.typing.has(this.peerKey);
    fill(this.typingLine, typing ? [el('span', { class: 'dots', 'aria-hidden': 'true' }, el('i'), el('i'), el('i')), `${inline(this.ctx.nameOf(this.handle))} is typing…`] : null);
    this.typingLine.classList.toggle('on', !!typing);
  }

  atBottom() {
    const s = this.scroller;
    return s.scrollHeight - s.scrollTop - s.clientHeight < 60;
  }

  renderMessages() {
    if (!this.list || !this.handle) return;
    const stick = this.atBottom() || !this.rendered;
    const focusedId = document.activeElement?.closest?.('.msg')?.dataset.id;
    const byId = new Map(this.messages.map(m => [m.id, m]));
    const items = [];
    let day = null;
    let prev = null;
    for (const m of this.messages) {
      const d = new Date(m.time * 1000).toDateString();
      if (d !== day) { day = d; prev = null; items.push(this.daySeparator(d, m.time)); }
      // Bubbles of one sender within two minutes group together, as chat apps do.
      const grouped = prev && prev.direction === m.direction && m.time - prev.time < 120;
      items.push(this.bubble(m, byId, grouped));
      prev = m;
    }
    for (const id of this.bubbles.keys()) if (!byId.has(id) && !id.startsWith('day:')) this.bubbles.delete(id);
    for (const p of this.pending) items.push(this.renderPending(p));
    if (!this.messages.length && !this.pending.length) {
      items.push(el('li', { class: 'empty-conv' }, 'No messages yet. Say hello — it is end-to-end encrypted.'));
    }
    reconcile(this.list, items);
    this.rendered = true;
    if (focusedId) this.list.querySelector(`.msg[data-id="${CSS.escape(focusedId)}"]`)?.focus({ preventScroll: true });
    if (this.highlight) {
      const target = this.list.querySelector(`.msg[data-id="${CSS.escape(this.highlight)}"]`);
      if (target) {
        target.classList.add('flash');
        target.scrollIntoView({ block: 'center' });
        target.focus({ preventScroll: true });
        this.highlight = null;
        return;
      }
    }
    if (stick) this.scroller.scrollTop = this.scroller.scrollHeight;
  }

  statusOf(m) {
    if (m.direction !== 'outgoing') return null;
    if (m.read) return { key: 'read', mark: '✓✓', label: 'Read' };
    if (m.delivered) return { key: 'delivered', mark: '✓', label: 'Delivered' };
    return { key: 'sent', mark: '○', label: 'Sent to the server' };
  }

  /** The "Today" / date line above a day's first message, kept like the bubbles. */
  daySeparator(day, time) {
    const key = `day:${day}:${fmtDay(time)}`;
    const kept = this.bubbles.get(key);
    if (kept) return kept.node;
    const node = el('li', { class: 'day', role: 'separator' }, el('span', {}, fmtDay(time)));
    this.bubbles.set(key, { key, node });
    return node;
  }

  /** The element of message `m`: the one made before when nothing it shows changed. A file
   * offer is made afresh (its transfer state lives outside the message). */
  bubble(m, byId, grouped) {
    if (m.content_type === 'file-offer') return this.renderMessage(m, byId, grouped);
    const q = m.reply_to ? byId.get(m.reply_to) : null;
    const key = JSON.stringify([m, grouped, q && [q.direction, q.deleted, q.text],
      this.ctx.nameOf(this.handle), this.ctx.state.myKey]);
    const kept = this.bubbles.get(m.id);
    if (kept?.key === key) return kept.node;
    const node = this.renderMessage(m, byId, grouped);
    this.bubbles.set(m.id, { key, node });
    return node;
  }

  renderMessage(m, byId, grouped) {
    const { ctx } = this;
    const own = m.direction === 'outgoing';
    const status = this.statusOf(m);
    const who = own ? 'You' : ctx.nameOf(this.handle);
    const parts = [];
    if (m.reply_to) {
      const q = byId.get(m.reply_to);
      parts.push(el('button', {
        type: 'button', class: 'quote', 'aria-label': 'Go to the message replied to',
        onclick: () => this.jumpTo(m.reply_to),
      },
        el('span', { class: 'quote-who' }, q ? (q.direction === 'outgoing' ? 'You' : inline(ctx.nameOf(this.handle))) : 'A message'),
        el('span', { class: 'quote-text' }, q ? (q.deleted ? 'deleted message' : inline(q.text).slice(0, 140)) : 'not on this device')));
    }
    if (m.deleted) {
      parts.push(el('p', { class: 'text deleted' }, own ? 'You deleted this message' : 'This message was deleted'));
    } else if (m.content_type === 'file-offer') {
      parts.push(this.renderOffer(m));
    } else if (m.content_type === '!undecryptable') {
      parts.push(el('p', { class: 'text warn undecryptable' }, '⚠ This message did not decrypt. The sending device was asked to send it again.'));
    } else if (m.content_type === 'text' || m.content_type === 'kez.reply') {
      parts.push(el('p', { class: 'text' }, m.text));
    } else {
      parts.push(el('p', { class: 'text other' }, m.text || `a message of type ${inline(m.content_type)}`));
    }
    // The home server could not deliver it to a device on another server (a bounce).
    for (const u of own ? m.undelivered || [] : []) {
      parts.push(el('p', { class: 'tag warn undelivered' }, `⚠ not delivered to ${inline(this.handle)}: ${inline(u.message)} (${inline(u.reason)})`));
    }
    if (!m.in_contacts && !own) parts.unshift(el('p', { class: 'tag warn' }, 'sender not in your contacts'));
    if (m.from_retired_key_of) parts.unshift(el('p', { class: 'tag warn' }, 'signed by a key this contact retired'));

    const meta = el('span', { class: 'meta' },
      m.expires_at && el('span', { class: 'timer', title: `disappears ${fmtTime(m.expires_at, { long: true })}` }, icon('timer', { size: 12 })),
      m.edited && !m.deleted && el('span', { class: 'edited' }, 'edited'),
      el('time', { datetime: new Date(m.time * 1000).toISOString(), title: fmtTime(m.time, { long: true }) }, fmtTime(m.time).replace(/^.* (?=\d)/, '')),
      status && el('span', { class: ['status', status.key], 'aria-hidden': 'true', title: status.label, dataset: { status: status.key } }, status.mark),
      status && el('span', { class: 'visually-hidden' }, status.label));

    const reactions = Object.entries(m.reactions || {}).filter(([, who]) => who.length);
    const reactRow = reactions.length ? el('div', { class: 'reactions' }, reactions.map(([emoji, keys]) => {
      const mine = keys.includes(ctx.state.myKey);
      return el('button', {
        type: 'button', class: ['reaction', mine && 'mine'], 'aria-pressed': String(mine),
        'aria-label': `${inline(emoji)} ${keys.length}${mine ? ', yours: press to take it back' : ''}`,
        onclick: () => this.react(m, emoji, mine),
      }, inline(emoji), keys.length > 1 ? el('span', { class: 'count' }, String(keys.length)) : null);
    })) : null;

    const menuBtn = el('button', {
      type: 'button', class: 'icon-btn msg-menu-btn', 'aria-label': 'Message actions', 'aria-haspopup': 'menu', tabindex: '-1',
      onclick: e => this.menu(m, e.currentTarget),
    }, icon('more', { className: 'more-icon' }));
    return el('li', {
      class: ['msg', own ? 'out' : 'in', grouped && 'grouped', m.deleted && 'is-deleted'],
      tabindex: '0', dataset: { id: m.id, status: status?.key || '' },
    },
      el('div', { class: 'bubble' }, el('span', { class: 'visually-hidden' }, `${inline(who)}:`), parts, meta),
      reactRow,
      !m.deleted && menuBtn);
  }

  renderPending(p) {
    return el('li', { class: ['msg', 'out', 'pending', p.failed && 'failed'], dataset: { pending: '1' } },
      el('div', { class: 'bubble' },
        el('p', { class: 'text' }, p.text),
        el('span', { class: 'meta' }, p.failed ? el('span', { class: 'error-text' }, 'not sent') : el('span', { class: 'status sending', 'aria-label': 'Sending' }, '…'))));
  }

  /** A file offer: name, size, and for me as the recipient a Download button with progress. */
  renderOffer(m) {
    const offer = this.ctx.state.offers.get(m.id);
    const parsed = /^offers the file (.*) \((.*?)\):/s.exec(m.text || '');
    const name = offer?.name ?? parsed?.[1] ?? 'a file';
    const size = offer ? fmtSize(offer.size) : parsed?.[2] || '';
    const card = el('div', { class: 'file-card' },
      el('span', { class: 'file-icon', 'aria-hidden': 'true' }, icon('file', { size: 30 })),
      el('span', { class: 'file-info' },
        el('span', { class: 'file-name' }, inline(name)),
        el('span', { class: 'file-size' }, size, m.direction === 'outgoing' ? ' · offered' : '')));
    if (m.direction === 'incoming') {
      const running = this.downloads?.get(m.id);
      if (running) card.append(running.node);
      else {
        const done = offer?.downloaded;
        card.append(el('button', {
          type: 'button', class: ['btn', 'small', done ? '' : 'primary', 'download-btn'],
          'aria-label': `${done ? 'Download again' : 'Download'} ${inline(name)}`,
          onclick: () => this.download(m.id, name),
        }, done ? 'Download again' : 'Download'));
      }
    }
    return card;
  }

  // ------------------------------------------------------------ actions

  async submit() {
    const text = this.input.value;
    if (!text.trim()) return;
    const handle = this.handle;
    const mode = this.mode;
    this.input.value = '';
    this.autosize();
    this.setMode(null);
    this.stopTyping({ sent: mode?.kind !== 'edit' });
    let args;
    if (mode?.kind === 'edit') args = ['edit', handle, mode.msg.id, '--json', '--', text];
    else if (mode?.kind === 'reply') args = ['reply', handle, mode.msg.id, '--json', '--', text];
    else args = ['send', handle, '--json', '--', text];
    const pending = mode?.kind === 'edit' ? null : { text };
    // The command goes out first; the "sending" bubble is drawn while it runs.
    const sending = this.ctx.api.json(args);
    if (pending) { this.pending.push(pending); this.renderMessages(); this.scroller.scrollTop = this.scroller.scrollHeight; }
    try {
      await sending;
      if (pending) this.pending = this.pending.filter(p => p !== pending);
      await this.reload();
      this.ctx.reloadList();
    } catch (err) {
      if (pending) this.pending = this.pending.filter(p => p !== pending);
      if (handle === this.handle && !this.input.value) {
        // Nothing was sent: the text comes back to the composer so nothing is lost.
        this.input.value = text;
        this.autosize();
        if (mode) this.setMode(mode.kind, mode.msg);
      }
      if (this.ctx.noteKeyChange?.(handle, err)) this.renderBanner();
      else toast(`Not sent: ${err.message}`, { error: true });
      this.renderMessages();
    }
  }

  async react(m, emoji, remove) {
    const args = ['react', this.handle, m.id, '--json'];
    if (remove) args.push('--remove');
    args.push('--', emoji);
    try { await this.ctx.api.json(args); await this.reload(); }
    catch (err) { if (!this.ctx.noteKeyChange?.(this.handle, err)) toast(`The reaction was not sent: ${err.message}`, { error: true }); else this.renderBanner(); }
  }

  async remove(m) {
    const ok = await confirmDialog('Delete this message?', 'It is deleted on every device of both of you. (A modified app could have kept a copy.)', { confirm: 'Delete for everyone', danger: true });
    if (!ok) return;
    try { await this.ctx.api.json(['delete', this.handle, m.id, '--json']); await this.reload(); this.ctx.reloadList(); }
    catch (err) { toast(`Not deleted: ${err.message}`, { error: true }); }
  }

  setMode(kind, msg) {
    this.mode = kind ? { kind, msg } : null;
    if (!kind) { this.modeBar.hidden = true; fill(this.modeBar); return; }
    this.modeBar.hidden = false;
    fill(this.modeBar,
      el('span', { class: 'mode-icon', 'aria-hidden': 'true' }, icon(kind === 'edit' ? 'edit' : 'reply')),
      el('span', { class: 'mode-text' },
        el('strong', {}, kind === 'edit' ? 'Editing' : `Replying to ${msg.direction === 'outgoing' ? 'yourself' : inline(this.ctx.nameOf(this.handle))}`),
        el('span', { class: 'mode-quote' }, inline(msg.text).slice(0, 120))),
      el('button', { type: 'button', class: 'icon-btn', 'aria-label': kind === 'edit' ? 'Stop editing' : 'Stop replying', onclick: () => { if (kind === 'edit') this.input.value = ''; this.setMode(null); this.input.focus(); } }, icon('close')));
    if (kind === 'edit') { this.input.value = msg.text; this.autosize(); }
    this.input.focus();
    this.input.setSelectionRange(this.input.value.length, this.input.value.length);
  }

  menu(m, button) {
    const own = m.direction === 'outgoing';
    const items = [
      ...REACTIONS.map(emoji => {
        const mine = (m.reactions?.[emoji] || []).includes(this.ctx.state.myKey);
        return [emoji, () => this.react(m, emoji, mine), { class: 'emoji-item', label: mine ? `Take back ${emoji}` : `React ${emoji}` }];
      }),
      ['Reply', () => this.setMode('reply', m)],
    ];
    if (own && ['text', 'kez.reply'].includes(m.content_type)) items.push(['Edit', () => this.setMode('edit', m)]);
    if (m.text && m.content_type !== 'file-offer') items.push(['Copy text', () => navigator.clipboard?.writeText(m.text).then(() => toast('Copied'), () => toast('Could not copy', { error: true }))]);
    if (own) items.push(['Delete for everyone', () => this.remove(m), { class: 'danger' }]);
    popupMenu(button, items, { className: 'msg-menu' });
  }

  /** Disappearing messages for this conversation (`timer @x DURATION`): from now on, both
   * sides delete each message that long after it was sent. */
  timerMenu(button) {
    const set = async (duration, label) => {
      try {
        await this.ctx.api.json(['timer', this.handle, '--json', '--', duration]);
        toast(duration === 'off' ? 'Messages no longer disappear' : `New messages disappear after ${label}`);
        this.reload();
      } catch (err) {
        if (this.ctx.noteKeyChange?.(this.handle, err)) this.renderBanner();
        else toast(`Not changed: ${err.message}`, { error: true });
      }
    };
    popupMenu(button, [
      ['Off', () => set('off')],
      ['5 minutes', () => set('5m', '5 minutes')],
      ['1 hour', () => set('1h', '1 hour')],
      ['1 day', () => set('1d', '1 day')],
      ['1 week', () => set('7d', '1 week')],
    ]);
  }

  jumpTo(id) {
    const target = this.list.querySelector(`.msg[data-id="${CSS.escape(id)}"]`);
    if (!target) { toast('That message is not on this device'); return; }
    target.scrollIntoView({ block: 'center', behavior: 'smooth' });
    target.classList.remove('flash');
    void target.offsetWidth;
    target.classList.add('flash');
    target.focus({ preventScroll: true });
  }

  // ------------------------------------------------------------ keyboard

  onComposerKey(e) {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      this.submit();
    } else if (e.key === 'Escape' && this.mode) {
      e.preventDefault();
      if (this.mode.kind === 'edit') this.input.value = '';
      this.setMode(null);
    } else if (e.key === 'ArrowUp' && !this.input.value && !e.altKey) {
      const last = [...this.messages].reverse().find(m => m.direction === 'outgoing' && !m.deleted && ['text', 'kez.reply'].includes(m.content_type));
      if (last) { e.preventDefault(); this.setMode('edit', last); }
    }
  }

  /** On a focused message: Enter / Shift+F10 / ContextMenu open its actions, r replies, e edits,
   * ↑/↓ move between messages. */
  onMessageKey(e) {
    const li = e.target.closest('.msg');
    if (!li || e.target !== li) return;
    const m = this.messages.find(x => x.id === li.dataset.id);
    if (!m) return;
    const all = [...this.list.querySelectorAll('.msg[tabindex]')];
    const i = all.indexOf(li);
    if (e.key === 'Enter' || e.key === 'ContextMenu' || (e.key === 'F10' && e.shiftKey)) {
      e.preventDefault();
      const btn = li.querySelector('.msg-menu-btn');
      if (btn) this.menu(m, btn);
    } else if (e.key === 'ArrowUp' && !e.altKey) { e.preventDefault(); all[Math.max(0, i - 1)]?.focus(); }
    else if (e.key === 'ArrowDown' && !e.altKey) { e.preventDefault(); if (i === all.length - 1) this.input.focus(); else all[i + 1]?.focus(); }
    else if (e.key === 'r' && !m.deleted) { e.preventDefault(); this.setMode('reply', m); }
    else if (e.key === 'e' && m.direction === 'outgoing' && !m.deleted) { e.preventDefault(); this.setMode('edit', m); }
  }

  autosize() {
    this.input.style.height = 'auto';
    this.input.style.height = `${Math.min(this.input.scrollHeight, 200)}px`;
  }

  // ------------------------------------------------------------ typing notices

  onTypingInput() {
    if (!this.ctx.state.settings.typing || !this.handle) return;
    clearTimeout(this.typingTimer);
    if (!this.input.value) { this.stopTyping(); return; }
    const now = Date.now();
    if (now - this.typingSentAt > TYPING_EVERY) {
      this.typingSentAt = now;
      this.typingTo = this.handle;
      this.ctx.api.start(['typing', this.handle]);
    }
    this.typingTimer = setTimeout(() => this.stopTyping(), TYPING_IDLE);
  }

  /** Says "stopped typing" if a typing notice went out; `sent` when a message goes instead (a
   * message ends the other side's typing line by itself). */
  stopTyping({ sent = false } = {}) {
    clearTimeout(this.typingTimer);
    if (!sent && this.typingSentAt && this.typingTo) this.ctx.api.start(['typing', this.typingTo, '--stop']);
    this.typingSentAt = 0;
    this.typingTo = null;
  }

  // ------------------------------------------------------------ files

  /** Shares a file with this person: upload it to the gateway, then `share @x upload:… --json`,
   * which waits (showing progress) until they downloaded it; "Stop waiting" ends only the wait. */
  async share(file) {
    const handle = this.handle;
    const who = inline(this.ctx.nameOf(handle));
    const bar = el('progress', { max: '100', value: '0', 'aria-label': `Progress of ${inline(file.name)}` });
    const text = el('span', { class: 'transfer-text' }, `Uploading ${inline(file.name)}…`);
    const stop = el('button', { type: 'button', class: 'btn small' }, 'Cancel');
    const row = el('div', { class: 'transfer', role: 'status' }, el('span', { class: 'file-icon', 'aria-hidden': 'true' }, icon('upload', { size: 24 })), el('div', { class: 'transfer-main' }, text, bar), stop);
    this.transferHost.append(row);
    let run = null;
    let cancelled = false;
    stop.addEventListener('click', () => { cancelled = true; if (run) run.cancel(); else row.remove(); });
    try {
      const ref = await this.ctx.api.upload(file, (done, total) => { bar.value = total ? (100 * done) / total : 0; });
      if (cancelled) return;
      fill(text, `Encrypting ${inline(file.name)}…`);
      bar.removeAttribute('value');
      let offered = false;
      run = this.ctx.api.start(['share', handle, ref, '--json'], {
        onProgress: p => {
          if (p.total) { bar.max = p.total; bar.value = p.done; }
          const what = p.what === 'encrypting' ? 'Encrypting' : offered ? `${who} is downloading` : p.what;
          if (p.total) fill(text, `${what} ${inline(file.name)}: ${fmtSize(p.done)} of ${fmtSize(p.total)}`);
        },
        onErr: line => {
          // The offer went out once the CLI says "shared …": show it in the conversation now.
          if (!offered && /(^|\n)shared /.test(line)) {
            offered = true;
            fill(text, `Offered ${inline(file.name)} · waiting for ${who} to download it`);
            bar.removeAttribute('value');
            fill(stop, 'Stop waiting');
            if (handle === this.handle) this.reload();
            this.ctx.reloadList();
          }
        },
      });
      const res = await run.done;
      let out = null;
      try { out = JSON.parse(res.out); } catch { /* text */ }
      row.classList.add('done');
      fill(text, out?.downloaded ? `${who} downloaded ${inline(file.name)} ✓` : `Offered ${inline(file.name)} (your kez-chat service keeps serving it)`);
      bar.remove();
      stop.remove();
      setTimeout(() => row.remove(), 6000);
      if (handle === this.handle) this.reload();
      this.ctx.reloadList();
    } catch (err) {
      if (this.ctx.noteKeyChange?.(handle, err)) { this.renderBanner(); row.remove(); return; }
      row.classList.add('failed');
      fill(text, `${inline(file.name)}: ${inline(err.message)}`);
      bar.remove();
      fill(stop, 'Dismiss');
      stop.onclick = () => row.remove();
    }
  }

  /** Downloads an offered file: progress in its card, then the browser saves it. */
  async download(offerId, name) {
    this.downloads ||= new Map();
    const bar = el('progress', { max: '100', 'aria-label': `Download of ${inline(name)}` });
    const label = el('span', { class: 'dl-text' }, 'Starting…');
    const cancel = el('button', { type: 'button', class: 'btn small' }, 'Cancel');
    const node = el('span', { class: 'dl-progress', role: 'status' }, label, bar, cancel);
    const run = this.ctx.api.start(['download', offerId, '--json'], {
      onProgress: p => {
        if (p.total) { bar.max = p.total; bar.value = p.done; fill(label, `${p.what === 'downloading' ? 'Downloading' : p.what} ${fmtSize(p.done)} of ${fmtSize(p.total)}`); }
      },
      onDownload: d => this.ctx.api.save(d),
    });
    cancel.addEventListener('click', () => run.cancel());
    this.downloads.set(offerId, { node, run });
    this.renderMessages();
    try {
      await run.done;
      toast(`Downloaded ${inline(name)}`);
    } catch (err) {
      toast(`Download of ${inline(name)} failed: ${err.message}`, { error: true });
    } finally {
      this.downloads.delete(offerId);
      await this.ctx.reloadOffers();
    }
  }
}
