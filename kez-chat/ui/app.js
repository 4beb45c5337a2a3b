// kez-chat ui: the application shell. It owns the state (who I am, the conversation list, the
// open conversation), the live event stream (`listen --json --events`), the sidebar, keyboard
// shortcuts and the theme; the views (chat.js, files.js, settings.js, search.js, register.js)
// render into it and call back through `ctx`.
import { Api } from './api.js';
import { icon } from './icons.js';
import { el, fill, inline, shortHandle, fmtTime, initial, hueClass } from './text.js';
import { toast, openDialog, popupMenu } from './dialogs.js';
import { showRegister } from './register.js';
import { ChatView } from './chat.js';
import { addContactDialog, profileDialog, noteKeyChange } from './contacts.js';
import { filesDialog, browseDialog } from './files.js';
import { settingsDialog, devicesDialog, paperKeyDialog } from './settings.js';
import { searchDialog } from './search.js';

const api = new Api();
const $ = id => document.getElementById(id);

const state = {
  me: null,          // my handle, `@alice@kez.localhost`
  myKey: null,       // my identity key
  domain: null,      // my server's domain
  convs: [],         // `history --json`
  contacts: new Map(), // handle → `contacts --json` entry
  offers: new Map(), // offer id → `files --json` entry (file cards in the chat)
  settings: {},      // `settings --json`
  open: null,        // the open conversation's handle
  typing: new Map(), // peer key → timeout id (someone is typing)
  presence: new Map(), // handle → online/away/offline
  // peer key → handle, learned from live messages: `history --json` names no handle for someone
  // not in the contacts, but the message that arrived did (the server's word, as the CLI shows it).
  handles: new Map(loadHandles()),
};

function loadHandles() {
  try { return JSON.parse(sessionStorage.getItem('kez-handles') || '[]'); } catch { return []; }
}
function learnHandle(peer, handle) {
  if (!peer || !handle || state.handles.get(peer) === handle) return;
  state.handles.set(peer, handle);
  try { sessionStorage.setItem('kez-handles', JSON.stringify([...state.handles])); } catch { /* full */ }
}

const ctx = {
  api, state,
  short: h => shortHandle(h, state.domain),
  /** The name to show for a handle: the contact's display name, else the short handle. */
  nameOf(handle) {
    const c = state.contacts.get(handle);
    return c?.display_name || shortHandle(handle, state.domain);
  },
  /** The handle of a peer key: its conversation's, its contact's, or one a message named. */
  handleOfPeer(peer) {
    const conv = state.convs.find(c => c.peer === peer);
    if (conv?.handle) return conv.handle;
    for (const c of state.contacts.values()) if (c.key === peer || c.current_key === peer) return c.handle;
    const h = state.handles.get(peer);
    return h && !state.contacts.has(h) && !state.convs.some(c => c.handle === h) ? h : null;
  },
  /** The `history --json` entry of a handle's conversation. */
  convOf: handle => state.convs.find(c => c.handle === handle) || state.convs.find(c => !c.handle && ctx.handleOfPeer(c.peer) === handle),
  openConversation, reloadList, reloadOffers, afterRegister, showList,
  refreshSettings,
  // The own display name: no command prints it back, so the page keeps what it last set (per
  // handle).
  myName: () => { try { return localStorage.getItem(`kez-my-name:${state.me}`) || ''; } catch { return ''; } },
  setMyName: name => { try { localStorage.setItem(`kez-my-name:${state.me}`, name); } catch { /* ignore */ } renderMe(); },
  profile: handle => profileDialog(ctx, handle),
  browse: handle => browseDialog(ctx, handle),
  addContact: handle => addContactDialog(ctx, handle),
  noteKeyChange,
};

let chat;

// ---------------------------------------------------------------- theme

/** The theme: `light`/`dark` chosen here, or the system's (prefers-color-scheme) by default. */
function applyTheme(theme) {
  const root = document.documentElement;
  if (theme === 'light' || theme === 'dark') root.dataset.theme = theme;
  else delete root.dataset.theme;
  const dark = theme === 'dark' || (theme !== 'light' && matchMedia('(prefers-color-scheme: dark)').matches);
  const btn = $('theme-toggle');
  if (btn) {
    btn.setAttribute('aria-pressed', String(dark));
    btn.title = dark ? 'Light theme (Alt+T)' : 'Dark theme (Alt+T)';
    fill(btn, icon(dark ? 'sun' : 'moon'));
  }
}
function toggleTheme() {
  const dark = document.documentElement.dataset.theme === 'dark' ||
    (!document.documentElement.dataset.theme && matchMedia('(prefers-color-scheme: dark)').matches);
  const next = dark ? 'light' : 'dark';
  try { localStorage.setItem('kez-theme', next); } catch { /* private mode */ }
  applyTheme(next);
}
ctx.setTheme = theme => {
  try { if (theme) localStorage.setItem('kez-theme', theme); else localStorage.removeItem('kez-theme'); } catch { /* ignore */ }
  applyTheme(theme);
};
ctx.theme = () => { try { return localStorage.getItem('kez-theme') || ''; } catch { return ''; } };

// ---------------------------------------------------------------- connection

function showConnState(s) {
  const bar = $('conn');
  document.body.dataset.conn = s;
  if (s === 'online') { bar.hidden = true; fill(bar); return; }
  bar.hidden = false;
  if (s === 'connecting') fill(bar, el('span', { class: 'spinner', 'aria-hidden': 'true' }), 'Connecting to kez-chat…');
  else {
    const secs = Math.max(1, Math.round((api.retryAt - Date.now()) / 1000));
    // A gateway that was restarted has a new address (its token changes): this one will not
    // come back, so after a few tries say where to look.
    fill(bar, 'Not connected to kez-chat ui. ', `Retrying in ${secs} s. `,
      el('button', { type: 'button', class: 'link-btn', onclick: () => api.reconnect() }, 'Retry now'),
      api.failures >= 3 ? el('span', { class: 'conn-hint' }, ' If you restarted `kez-chat ui`, open the new address it printed.') : null);
  }
}
api.addEventListener('state', e => showConnState(e.detail));
api.addEventListener('retry', () => showConnState('offline'));
setInterval(() => { if (api.state === 'offline') showConnState('offline'); }, 1000);

api.addEventListener('hello', e => {
  const hello = e.detail;
  if (!hello.registered) {
    // A registration that failed is followed by a hello that still says unregistered: the
    // register screen keeps showing what went wrong (its "Try again" starts over).
    if (document.body.dataset.screen === 'register' && ctx.registering) return;
    setScreen('register');
    showRegister(ctx, $('welcome'));
    return;
  }
  // Right after registering the gateway sends a new hello; the register screen still shows the
  // paper key step's end until the user continues.
  if (document.body.dataset.screen === 'register' && ctx.registering) { pendingHello = hello; return; }
  enterApp(hello);
});

let pendingHello = null;

/** `register` or `app`: only one of them is shown (and only its <main> is in the page's tree). */
function setScreen(screen) {
  document.body.dataset.screen = screen;
  $('welcome').hidden = screen !== 'register';
  $('app').hidden = screen !== 'app';
}

function enterApp(hello) {
  setScreen('app');
  // The register screen may still hold the paper key's words: they leave the page now.
  fill($('welcome'));
  state.me = hello.handle;
  state.domain = String(hello.handle || '').split('@')[2] || null;
  renderMe();
  startListen();
  Promise.all([reloadList(), reloadOffers(), refreshSettings(),
    api.json(['whoami', '--json']).then(w => { state.myKey = w.key; }).catch(() => {})])
    .then(() => {
      renderMe();
      if (state.open) openConversation(state.open, { focus: false });
      else if (!matchMedia('(max-width: 720px)').matches && state.convs[0]) {
        // On a wide window open the latest conversation, like desktop chat apps do.
        openConversation(state.convs[0].handle, { focus: false });
      }
    });
}

function afterRegister() {
  ctx.registering = false;
  if (pendingHello?.registered) { const h = pendingHello; pendingHello = null; enterApp(h); }
  else api.reconnect();
}

// ---------------------------------------------------------------- live events

let listenRun = null;
let lineBuf = '';
function startListen() {
  if (listenRun) return;
  lineBuf = '';
  const run = api.start(['listen', '--json', '--events'], {
    onOut: text => {
      lineBuf += text;
      const lines = lineBuf.split('\n');
      lineBuf = lines.pop();
      for (const line of lines) {
        if (!line.trim()) continue;
        let ev;
        try { ev = JSON.parse(line); } catch { continue; }
        onEvent(ev);
      }
    },
  });
  listenRun = run;
  run.done.catch(err => err).then(res => {
    if (listenRun === run) listenRun = null;
    // A listen that ended while the socket is up is restarted (the service restarted, …).
    if (api.state === 'online') {
      if (res instanceof Error && res.code !== 'disconnected') toast(`Live updates stopped: ${res.message}. Restarting…`, { error: true });
      setTimeout(() => { if (api.state === 'online') startListen(); }, 2000);
    }
  });
}
api.addEventListener('state', e => { if (e.detail !== 'online') listenRun = null; });

function onEvent(ev) {
  if (ev.changed) {
    const peer = ev.changed.peer;
    if (peer === chat.peer()) chat.reload().then(reloadList);
    else reloadList();
    return;
  }
  if (ev.typing) { setTyping(ev.typing.from, ev.typing.handle, ev.typing.typing); return; }
  if (ev.presence) {
    state.presence.set(ev.presence.handle, ev.presence.state);
    renderList();
    chat.renderHeader();
    return;
  }
  if (ev.note) { serviceNote(ev.note); return; }
  if (ev.type === 'bounce') {
    // A sent message did not reach a device on another server: the conversation shows it
    // under the message.
    if (ev.peer === chat.peer() || ev.to_handle === state.open) chat.reload().then(reloadList);
    return;
  }
  if (ev.id) {
    // A message: it arrived, or another of my devices sent it.
    const peer = ev.direction === 'incoming' ? ev.from : ev.to;
    const handle = ev.direction === 'incoming' ? ev.from_handle : ev.to_handle;
    learnHandle(peer, handle);
    if (ev.direction === 'incoming') setTyping(ev.from, handle, false);
    // The open conversation is re-read first (which marks it read), then the list, so the
    // list does not count as unread what is on the screen.
    if ((peer && peer === chat.peer()) || (handle && handle === state.open)) {
      if (!document.hidden) chat.showArrived(ev);
      chat.reload().then(reloadList);
      if (ev.direction === 'incoming') announce(`${ctx.nameOf(handle)}: ${ev.content_type === 'file-offer' ? 'offers a file' : inline(ev.text)}`);
    } else reloadList();
    if (ev.content_type === 'file-offer') reloadOffers();
    if (ev.direction === 'incoming') notify(ev);
  }
}

/** Says something to screen readers (a polite live region that is otherwise invisible). */
function announce(text) {
  const host = $('announcer');
  host.textContent = '';
  setTimeout(() => { host.textContent = inline(text).slice(0, 300); }, 50);
}

/** Notes of the service itself ("kez-chat: receiving stopped …", "… receiving again") go to the
 * status bar; the others (x edited, reacted, calls themselves …) are what the views show anyway. */
function serviceNote(note) {
  if (!/^kez-chat:/.test(note)) return;
  const bar = $('service-note');
  if (/stopped/.test(note)) { bar.hidden = false; fill(bar, el('strong', {}, 'Not receiving. '), inline(note.replace(/^kez-chat: /, ''))); }
  else { bar.hidden = true; fill(bar); toast(note.replace(/^kez-chat: /, '')); }
}

/** A browser notification for a message, when the page is not being looked at and the user
 * turned notifications on (`settings notifications on`). */
function notify(msg) {
  if (!state.settings.notifications || !document.hidden) return;
  if (!('Notification' in window) || Notification.permission !== 'granted') return;
  const who = msg.from_handle ? ctx.nameOf(msg.from_handle) : 'Someone not in your contacts';
  const body = msg.content_type === 'file-offer' ? 'offers you a file' : inline(msg.text).slice(0, 200);
  const n = new Notification(inline(who), { body, tag: msg.from, silent: false });
  n.onclick = () => { window.focus(); if (msg.from_handle) openConversation(msg.from_handle); n.close(); };
}

function setTyping(peer, handle, typing) {
  clearTimeout(state.typing.get(peer));
  if (typing) {
    // A typing notice is live only: if no "stopped" comes (a closed lid), it fades by itself.
    state.typing.set(peer, setTimeout(() => setTyping(peer, handle, false), 8000));
  } else state.typing.delete(peer);
  chat.renderTyping();
  renderList();
}

// ---------------------------------------------------------------- the list

let listLoading = null, listAgain = false;
/** Re-reads the conversations and contacts; calls that come while one runs are folded into one more. */
async function reloadList() {
  if (listLoading) { listAgain = true; return listLoading; }
  listLoading = (async () => {
    do {
      listAgain = false;
      try {
        const [convs, contacts] = await Promise.all([api.json(['history', '--json']), api.json(['contacts', '--json'])]);
        state.convs = convs || [];
        state.contacts = new Map((contacts || []).map(c => [c.handle, c]));
        renderList();
        chat.renderHeader();
      } catch (err) {
        if (err.code !== 'disconnected') toast(`Could not read the conversations: ${err.message}`, { error: true });
      }
    } while (listAgain);
    listLoading = null;
  })();
  return listLoading;
}

async function reloadOffers() {
  try {
    const files = await api.json(['files', '--json']);
    state.offers = new Map((files || []).map(f => [f.offer, f]));
    chat.renderMessages();
  } catch { /* the list still works without file cards */ }
}

async function refreshSettings() {
  try { state.settings = await api.json(['settings', '--json']) || {}; } catch { /* keep the last */ }
}

/** The entries of the sidebar: conversations (latest first), then contacts not talked to yet. */
function entries() {
  // A learned handle names an old identity only while no contact or conversation holds it now
  // (after a key change the old conversation keeps the old key, and has no handle).
  const claimed = new Set([...state.convs.map(c => c.handle), ...state.contacts.keys()]);
  const learned = peer => { const h = state.handles.get(peer); return h && !claimed.has(h) ? h : null; };
  const list = state.convs.map(c => ({ handle: c.handle || learned(c.peer), peer: c.peer, conv: c }));
  const seen = new Set(list.map(e => e.handle));
  for (const c of state.contacts.values()) {
    if (!seen.has(c.handle)) list.push({ handle: c.handle, peer: c.key, conv: null });
  }
  return list;
}

function previewOf(conv) {
  const peer = conv.peer;
  if (state.typing.has(peer)) return { text: 'typing…', cls: 'typing' };
  const last = conv.last;
  if (!last) return { text: 'No messages yet', cls: 'muted' };
  const you = last.direction === 'outgoing' ? 'You: ' : '';
  // The last stored message may be an edit, a reaction, …: say what happened.
  const did = {
    'kez.reaction': 'reacted to a message', 'kez.edit': 'edited a message', 'kez.delete': 'deleted a message',
    'kez.profile': 'changed their profile', 'kez.timer': 'changed disappearing messages', 'kez.receipt': 'read your messages',
  }[last.content_type];
  if (did) return { text: `${last.direction === 'outgoing' ? 'You' : ctx.nameOf(conv.handle || state.handles.get(conv.peer) || '')} ${did}`.trim(), cls: 'muted' };
  if (last.content_type === 'file-offer') {
    const m = /^offers the file (.*) \(/s.exec(last.text || '');
    return { text: `${you}File: ${m ? m[1] : 'a file'}` };
  }
  return { text: you + (last.text || '') };
}

function renderList() {
  const ul = $('conv-list');
  // The list is rebuilt on every change: keep the keyboard focus on the same conversation.
  const focused = document.activeElement?.closest?.('.conv')?.dataset.handle;
  const items = entries();
  const filter = ($('list-filter')?.value || '').trim().toLowerCase();
  const shown = filter ? items.filter(e => (ctx.nameOf(e.handle) + ' ' + (e.handle || e.peer)).toLowerCase().includes(filter)) : items;
  fill(ul, shown.map(e => {
    // Someone not in the contacts whose handle this page has not seen: known by key only.
    // After a key change the old identity's conversation stays, without a handle: it is named
    // after the handle it had, marked, so it is not taken for the new one.
    const old = !e.handle && state.handles.get(e.peer);
    const name = e.handle ? ctx.nameOf(e.handle) : old ? `${ctx.short(old)} (previous key)` : `Unknown ${String(e.peer).slice(8, 16)}…`;
    const unread = e.conv?.unread || 0;
    const pv = e.conv ? previewOf(e.conv) : { text: state.typing.has(e.peer) ? 'typing…' : 'New contact', cls: 'muted' };
    const presence = state.presence.get(e.handle);
    const current = !!e.handle && e.handle === state.open;
    const label = `${inline(name)}, ${e.handle ? inline(ctx.short(e.handle)) : 'not in your contacts'}${unread ? `, ${unread} unread` : ''}`;
    return el('li', {},
      el('button', {
        type: 'button', class: ['conv', current && 'current', unread && 'has-unread'],
        'aria-current': current ? 'true' : null, 'aria-label': label,
        dataset: { handle: e.handle || '' },
        onclick: () => e.handle ? openConversation(e.handle) : toast('This person is not in your contacts and kez-chat has not told this page their handle; their next message will.'),
      },
        el('span', { class: ['avatar', hueClass(e.peer || e.handle)], 'aria-hidden': 'true' }, initial(name),
          presence && el('span', { class: ['presence', presence] })),
        el('span', { class: 'conv-main' },
          el('span', { class: 'conv-top' },
            el('span', { class: 'conv-name' }, inline(name)),
            e.conv?.last && el('time', { class: 'conv-time', datetime: new Date(e.conv.last.time * 1000).toISOString() }, fmtTime(e.conv.last.time))),
          el('span', { class: 'conv-bottom' },
            el('span', { class: ['conv-preview', pv.cls] }, inline(pv.text)),
            unread ? el('span', { class: 'badge', 'aria-hidden': 'true' }, String(unread)) : null),
          e.conv && !e.conv.in_contacts && el('span', { class: 'tag warn' }, 'not in contacts'))));
  }));
  if (focused) ul.querySelector(`.conv[data-handle="${CSS.escape(focused)}"]`)?.focus();
  $('list-empty').hidden = items.length > 0;
  const total = state.convs.reduce((n, c) => n + (c.unread || 0), 0);
  document.title = total ? `(${total}) kez-chat` : 'kez-chat';
}

function renderMe() {
  const name = ctx.myName();
  fill($('me'),
    el('span', { class: ['avatar', 'small', hueClass(state.me)], 'aria-hidden': 'true' }, initial(ctx.short(state.me))),
    el('span', { class: 'me-handle', title: inline(state.me) }, inline(name || ctx.short(state.me))));
}

// ---------------------------------------------------------------- navigation

/** Opens a conversation (by handle). On a narrow window the chat replaces the list. */
function openConversation(handle, { focus = true, highlight = null } = {}) {
  state.open = handle;
  document.body.classList.add('chat-open');
  if (location.hash !== `#${encodeURIComponent(handle)}`) history.replaceState(null, '', `#${encodeURIComponent(handle)}`);
  renderList();
  chat.open(handle, { focus, highlight });
}

function showList() {
  document.body.classList.remove('chat-open');
  const cur = document.querySelector('.conv.current') || document.querySelector('.conv');
  (cur || $('new-chat')).focus();
}

function stepConversation(delta) {
  const list = entries().filter(e => e.handle);
  if (!list.length) return;
  const i = list.findIndex(e => e.handle === state.open);
  const next = list[(i + delta + list.length) % list.length] || list[0];
  openConversation(next.handle);
}

// ---------------------------------------------------------------- help and shortcuts

const SHORTCUTS = [
  ['Ctrl+K', 'Search messages, jump to a conversation'],
  ['Alt+↑ / Alt+↓', 'Previous / next conversation'],
  ['Alt+N', 'New conversation (add a contact)'],
  ['Alt+T', 'Dark / light theme'],
  ['Enter', 'Send the message'],
  ['Shift+Enter', 'New line in the message'],
  ['↑ in an empty message box', 'Edit your last message'],
  ['Esc', 'Close a dialog or menu; stop replying or editing'],
  ['Enter or Shift+F10 on a message', 'Message actions: react, reply, edit, delete'],
  ['?', 'This help'],
];

function helpDialog() {
  openDialog('Keyboard shortcuts', () => [
    el('table', { class: 'shortcuts' },
      el('thead', {}, el('tr', {}, el('th', { scope: 'col' }, 'Keys'), el('th', { scope: 'col' }, 'Does'))),
      el('tbody', {}, SHORTCUTS.map(([k, d]) => el('tr', {}, el('td', {}, el('kbd', {}, k)), el('td', {}, d))))),
    el('p', { class: 'hint' }, 'Messages are end-to-end encrypted by the kez-chat service on this computer; this page talks only to it.'),
  ]);
}

document.addEventListener('keydown', e => {
  if (document.body.dataset.screen !== 'app') return;
  const inDialog = !!document.querySelector('dialog[open]');
  const typingInField = e.target.closest?.('input, textarea, select, [contenteditable]');
  if ((e.ctrlKey || e.metaKey) && !e.altKey && e.key.toLowerCase() === 'k') {
    e.preventDefault();
    if (!inDialog) searchDialog(ctx);
  } else if (e.altKey && !e.ctrlKey && (e.key === 'ArrowUp' || e.key === 'ArrowDown') && !inDialog) {
    e.preventDefault();
    stepConversation(e.key === 'ArrowUp' ? -1 : 1);
  } else if (e.altKey && !e.ctrlKey && e.code === 'KeyN' && !inDialog) {
    e.preventDefault();
    addContactDialog(ctx);
  } else if (e.altKey && !e.ctrlKey && e.code === 'KeyT') {
    e.preventDefault();
    toggleTheme();
  } else if ((e.key === '?' && !typingInField || e.key === 'F1') && !inDialog) {
    e.preventDefault();
    helpDialog();
  }
});

// ---------------------------------------------------------------- menu

function menuItems() {
  return [
    ['Files offered to me', () => filesDialog(ctx, 'offered')],
    ['My shared files', () => filesDialog(ctx, 'shared')],
    ['Browse someone’s files', () => browseDialog(ctx, null)],
    ['Devices', () => devicesDialog(ctx)],
    ['Paper key', () => paperKeyDialog(ctx)],
    ['Settings and name', () => settingsDialog(ctx)],
    ['Keyboard shortcuts', helpDialog],
  ];
}

// ---------------------------------------------------------------- start

function start() {
  applyTheme(ctx.theme());
  matchMedia('(prefers-color-scheme: dark)').addEventListener('change', () => applyTheme(ctx.theme()));
  fill($('search-btn'), icon('search'));
  fill($('new-chat'), icon('plus'));
  fill($('main-menu'), icon('menu'));
  $('theme-toggle').addEventListener('click', toggleTheme);
  $('new-chat').addEventListener('click', () => addContactDialog(ctx));
  $('search-btn').addEventListener('click', () => searchDialog(ctx));
  $('main-menu').addEventListener('click', e => popupMenu(e.currentTarget, menuItems()));
  $('list-filter').addEventListener('input', renderList);
  $('list-filter').addEventListener('keydown', e => {
    if (e.key === 'Enter') { const first = document.querySelector('.conv'); if (first) first.click(); }
  });
  $('empty-add').addEventListener('click', () => addContactDialog(ctx));
  // Arrow keys move between conversations in the list (one tab stop for the whole list).
  $('conv-list').addEventListener('keydown', e => {
    if (e.key !== 'ArrowDown' && e.key !== 'ArrowUp') return;
    const btns = [...document.querySelectorAll('.conv')];
    const i = btns.indexOf(document.activeElement);
    if (i < 0) return;
    e.preventDefault();
    btns[Math.max(0, Math.min(btns.length - 1, i + (e.key === 'ArrowDown' ? 1 : -1)))].focus();
  });
  chat = new ChatView(ctx, $('chat'));
  const fromHash = decodeURIComponent(location.hash.slice(1));
  if (fromHash.startsWith('@')) state.open = fromHash;
  api.connect();
}

start();
