// Building DOM safely, and showing peer-controlled text.
//
// Everything a peer controls (message text, names, handles, file names, claims, error messages)
// reaches the page only through text nodes (`el` turns strings into text nodes; `safeText`
// builds nodes for a body). No module of this UI uses innerHTML or its relatives: the CSP has no
// 'unsafe-inline' either, so even a mistake could not run a script.

// Characters shown as a visible escape instead of themselves, as the CLI does (display.rs):
// C0/C1 controls and DEL, bidirectional embeddings/overrides/isolates/marks (a U+202E can make
// "exe.txt" look like "txt.exe"), and the Unicode line/paragraph separators.
const HIDDEN = /[\u0000-\u0009\u000b-\u001f\u007f-\u009f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]/u;
const HIDDEN_G = new RegExp(HIDDEN.source, 'gu');
const HIDDEN_OR_NL_G = /[\u0000-\u001f\u007f-\u009f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]/gu;

/** `U+202E` for a character. */
export function codePoint(c) {
  return 'U+' + c.codePointAt(0).toString(16).toUpperCase().padStart(4, '0');
}

/** A one-line string with every hidden character (and line break) written as `<U+XXXX>`:
 * for places that take a plain string (title, aria-label, notifications, input values). */
export function inline(text) {
  return String(text ?? '').replace(HIDDEN_OR_NL_G, c => `<${codePoint(c)}>`);
}

/** A body as a fragment: text nodes, line breaks kept (the CSS keeps them with pre-wrap), every
 * hidden character as a marked `<U+XXXX>` span so it is visibly not part of the text. */
export function safeText(text, { multiline = true } = {}) {
  const frag = document.createDocumentFragment();
  const re = multiline ? HIDDEN_G : HIDDEN_OR_NL_G;
  const s = String(text ?? '');
  let last = 0;
  for (const m of s.matchAll(re)) {
    if (m.index > last) frag.append(document.createTextNode(s.slice(last, m.index)));
    const esc = document.createElement('span');
    esc.className = 'esc';
    esc.title = 'a hidden character the sender put here';
    esc.textContent = `<${codePoint(m[0])}>`;
    frag.append(esc);
    last = m.index + m[0].length;
  }
  if (last < s.length) frag.append(document.createTextNode(s.slice(last)));
  return frag;
}

/**
 * `el('button', {class: 'x', onclick: f, 'aria-label': 'Close'}, 'text', childNode)`.
 * Strings among the children become text nodes through `safeText` (so they are escaped too);
 * attributes are set with setAttribute (never `style`: the CSP forbids inline styles, we use
 * classes), `on*` keys add listeners, and `null`/`false` children and attributes are skipped.
 */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') node.addEventListener(k.slice(2), v);
    else if (k === 'class') node.className = Array.isArray(v) ? v.filter(Boolean).join(' ') : v;
    else if (k === 'dataset') Object.assign(node.dataset, v);
    else if (k === 'value') node.value = v;
    else if (k === 'checked' || k === 'disabled' || k === 'hidden' || k === 'selected') {
      node[k] = !!v;
      // The default too, so that form.reset() comes back to it.
      if (k === 'checked') node.defaultChecked = !!v;
      if (k === 'selected') node.defaultSelected = !!v;
    }
    else node.setAttribute(k, v === true ? '' : String(v));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    node.append(typeof c === 'string' || typeof c === 'number' ? safeText(String(c)) : c);
  }
}

/** Replaces a node's children. */
export function fill(node, ...children) {
  node.replaceChildren();
  append(node, children);
  return node;
}

/** `@bob` for `@bob@kez.localhost` when the domain is our own (as the CLI shows handles). */
export function shortHandle(handle, myDomain) {
  const h = String(handle ?? '');
  if (myDomain && h.endsWith('@' + myDomain) && h.indexOf('@', 1) === h.length - myDomain.length - 1) {
    return h.slice(0, h.length - myDomain.length - 1);
  }
  return h;
}

/** `1.4 MiB`. */
export function fmtSize(n) {
  n = Number(n) || 0;
  if (n < 1024) return `${n} B`;
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  let u = -1;
  do { n /= 1024; u++; } while (n >= 1024 && u < units.length - 1);
  return `${n.toFixed(n < 10 ? 1 : 0)} ${units[u]}`;
}

/** A message time (Unix seconds): `14:05` today, `Mon 14:05` this week, else `3 Dec`. */
export function fmtTime(secs, { long = false } = {}) {
  const d = new Date(Number(secs) * 1000);
  if (long) return d.toLocaleString();
  const now = new Date();
  const hm = d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  if (d.toDateString() === now.toDateString()) return hm;
  if (now - d < 6 * 86400e3) return `${d.toLocaleDateString([], { weekday: 'short' })} ${hm}`;
  return d.toLocaleDateString([], { day: 'numeric', month: 'short' });
}

/** A day heading for the message list. */
export function fmtDay(secs) {
  const d = new Date(Number(secs) * 1000);
  const now = new Date();
  if (d.toDateString() === now.toDateString()) return 'Today';
  const y = new Date(now); y.setDate(now.getDate() - 1);
  if (d.toDateString() === y.toDateString()) return 'Yesterday';
  return d.toLocaleDateString([], { weekday: 'long', day: 'numeric', month: 'long', year: 'numeric' });
}

/** The first letter of a name, for an avatar. */
export function initial(name) {
  const m = String(name ?? '').replace(/^@/, '').match(/\p{L}|\p{N}/u);
  return m ? m[0].toUpperCase() : '?';
}

/** A stable hue class (0–7) for a key or handle, so each person keeps a colour. */
export function hueClass(seed) {
  let h = 0;
  for (const c of String(seed ?? '')) h = (h * 31 + c.codePointAt(0)) >>> 0;
  return `hue-${h % 8}`;
}
