// Modal dialogs: a <dialog> opened with showModal() (the browser traps focus in it and Esc
// closes it), focus returned to where it was on close, and the dialogs many views share:
// confirm, an interactive CLI run (register's paper key, paperkey, device add), and messages.
import { el, fill, inline } from './text.js';
import { icon } from './icons.js';

let seq = 0;

/**
 * Opens a modal dialog. `build(dialog, close)` returns its body nodes. Returns {dialog, close,
 * closed} where `closed` resolves with the value passed to close() (undefined on Esc).
 */
export function openDialog(title, build, { wide = false, className = '' } = {}) {
  const opener = document.activeElement;
  const id = `dlg-${++seq}`;
  let result;
  const dialog = el('dialog', { class: ['dialog', wide && 'wide', className], 'aria-labelledby': `${id}-title` });
  const close = value => { result = value; if (dialog.open) dialog.close(); };
  const head = el('header', { class: 'dialog-head' },
    el('h2', { id: `${id}-title` }, title),
    el('button', { class: 'icon-btn', type: 'button', 'aria-label': 'Close', title: 'Close (Esc)', onclick: () => close() }, icon('close')));
  const body = el('div', { class: 'dialog-body' });
  dialog.append(head, body);
  document.body.append(dialog);
  const closed = new Promise(resolve => {
    dialog.addEventListener('close', () => {
      dialog.remove();
      // Back to the control that opened it, so keyboard users keep their place.
      if (opener && opener.isConnected && typeof opener.focus === 'function') opener.focus();
      resolve(result);
    });
  });
  fill(body, build(dialog, close, body));
  dialog.showModal();
  // Focus the first field, else the first button of the body, else the close button.
  const first = body.querySelector('[autofocus], input:not([type=hidden]), textarea, select') || body.querySelector('button') || head.querySelector('button');
  first?.focus();
  return { dialog, close, closed, body };
}

/** Asks a yes/no question; resolves true only on the confirm button. */
export function confirmDialog(title, text, { confirm = 'OK', danger = false, check = null } = {}) {
  const { closed } = openDialog(title, (dialog, close) => {
    const ok = el('button', { type: 'submit', class: ['btn', danger ? 'danger' : 'primary'], disabled: !!check }, confirm);
    const box = check && el('input', { type: 'checkbox', id: `${dialog.getAttribute('aria-labelledby')}-check`, onchange: e => { ok.disabled = !e.target.checked; } });
    return el('form', { class: 'stack', onsubmit: e => { e.preventDefault(); close(true); } },
      Array.isArray(text) ? text : el('p', {}, text),
      check && el('p', { class: 'check-row' }, box, el('label', { for: box.id }, check)),
      el('div', { class: 'actions' },
        el('button', { type: 'button', class: 'btn', onclick: () => close(false) }, 'Cancel'),
        ok));
  });
  return closed.then(v => v === true);
}

/** A dialog that shows text (an error, a result). */
export function messageDialog(title, text) {
  return openDialog(title, (d, close) => [
    Array.isArray(text) ? text : el('p', { class: 'prewrap' }, text),
    el('div', { class: 'actions' }, el('button', { type: 'button', class: 'btn primary', onclick: () => close() }, 'OK')),
  ]).closed;
}

/**
 * Runs an interactive command in a panel: `out` text as it comes (the paper key block is a
 * fixed-width <pre>), `err` lines as status text, and for each `read` frame an input labelled
 * with the prompt the command just wrote. Resolves {ok, out, err, error} at the end.
 * Used inside a dialog (paperkey, device add) and by the register screen.
 */
export function interactivePanel(api, args, { onExit, secretInput = false, foldLog = false, copyOut = false } = {}) {
  const outPre = el('pre', { class: ['run-out', copyOut && 'wrap'], hidden: true, tabindex: '0', 'aria-label': 'Output' });
  // The command's status lines, folded away (the prompt and the result are what matter); a
  // line that answers a wrong input ("That is not word 7.") is also shown by the prompt.
  const errLog = el('div', { class: 'run-log' });
  const lastLine = el('p', { class: 'run-last', 'aria-live': 'polite' });
  // Folded only where the lines are routine (registering); elsewhere they carry what the user
  // must check (a new device's fingerprint), so they stay in view.
  const logBox = foldLog ? el('details', { class: 'run-details' }, el('summary', {}, 'Details'), errLog) : errLog;
  const copyBtn = copyOut ? el('button', { type: 'button', class: 'btn small', hidden: true, onclick: () =>
    navigator.clipboard?.writeText(outPre.textContent.trim()).then(() => toast('Copied'), () => toast('Could not copy: select the text instead', { error: true })) }, 'Copy') : null;
  const inputId = `run-input-${++seq}`;
  const promptLabel = el('label', { for: inputId }, 'Answer');
  const input = el('input', { id: inputId, type: secretInput ? 'password' : 'text', autocomplete: 'off', spellcheck: 'false', class: 'input' });
  const sendBtn = el('button', { type: 'submit', class: 'btn primary' }, 'Send');
  const form = el('form', { class: 'run-input', hidden: true }, promptLabel, el('div', { class: 'row' }, input, sendBtn));
  const status = el('p', { class: 'run-status', role: 'status' }, 'Working…');
  const cancelBtn = el('button', { type: 'button', class: 'btn' }, 'Cancel');
  let lastErr = '';
  let errBuf = '';
  let outBuf = '';

  const run = api.start(args, {
    onOut: text => {
      outPre.hidden = false;
      if (copyBtn) copyBtn.hidden = false;
      outBuf += text;
      const lines = outBuf.split('\n');
      outBuf = lines.pop();
      for (const line of lines) outPre.append(outLine(line));
    },
    onErr: text => {
      // Whole lines go to the log; a partial line (a prompt without a line end) is the prompt.
      errBuf += text;
      const lines = errBuf.split('\n');
      errBuf = lines.pop();
      for (const line of lines) {
        if (!line.trim()) continue;
        errLog.append(el('p', { class: /[\u2580-\u259f]/.test(line) ? 'blocks' : null }, line));
        lastErr = line;
        fill(lastLine, line);
      }
      errLog.scrollTop = errLog.scrollHeight;
      if (errBuf.trim()) lastErr = errBuf;
    },
    onRead: () => {
      const prompt = (errBuf.trim() || lastErr || 'The command asks for a line').trim();
      errBuf = '';
      fill(promptLabel, prompt);
      form.hidden = false;
      input.value = '';
      input.disabled = false;
      sendBtn.disabled = false;
      status.textContent = 'Waiting for your answer';
      input.focus();
    },
    onProgress: p => { status.textContent = p.total ? `${p.what}: ${Math.round(100 * p.done / p.total)}%` : `${p.what}…`; },
  });
  form.addEventListener('submit', e => {
    e.preventDefault();
    const line = input.value;
    if (!secretInput) errLog.append(el('p', { class: 'run-answer' }, `› ${line}`));
    run.input(line);
    input.value = '';
    form.hidden = true;
    status.textContent = 'Working…';
  });
  cancelBtn.addEventListener('click', () => run.cancel());
  const flushOut = () => { if (outBuf) { outPre.append(outLine(outBuf)); outBuf = ''; } };
  run.done.then(flushOut, flushOut);
  const done = run.done.then(
    r => { status.textContent = 'Done.'; fill(lastLine); form.hidden = true; cancelBtn.hidden = true; return { ok: true, ...r }; },
    error => {
      if (errBuf.trim()) errLog.append(el('p', {}, errBuf));
      fill(lastLine);
      status.textContent = '';
      status.append(el('strong', { class: 'error-text' }, inline(error.message)));
      form.hidden = true;
      cancelBtn.hidden = true;
      return { ok: false, error, out: run.out, err: run.err };
    });
  done.then(r => onExit?.(r));
  const node = el('div', { class: 'run-panel' }, outPre, copyBtn, foldLog ? lastLine : null, form, logBox, el('div', { class: 'row run-foot' }, status, cancelBtn));
  return { node, run, done, input };
}

/**
 * One line of a command's text output. A row of the paper key's grid (`  1 witness    2 little
 * …`) becomes one cell per word, which wrap as whole cells on a narrow window (the text is the
 * CLI's, space for space); any other line stays a plain text line.
 */
function outLine(line) {
  const cells = line.match(/\s*\d+ \S+\s*/g);
  if (!cells || cells.join('') !== line || cells.length < 2) return document.createTextNode(`${line}\n`);
  return el('span', { class: 'grid-line' }, cells.map(c => el('span', { class: 'grid-cell' }, c)));
}

/** An interactive command in its own dialog. */
export function runDialog(api, title, args, intro) {
  let panel;
  const d = openDialog(title, (dialog, close) => {
    panel = interactivePanel(api, args);
    const closeBtn = el('button', { type: 'button', class: 'btn primary', hidden: true, onclick: () => close() }, 'Close');
    panel.done.then(() => { closeBtn.hidden = false; closeBtn.focus(); });
    return [intro && el('p', {}, intro), panel.node, el('div', { class: 'actions' }, closeBtn)];
  }, { wide: true });
  // Closing the dialog while the command still runs stops it (Ctrl-C), never leaves it hanging.
  d.closed.then(() => { if (panel.run.api.runs.has(panel.run.id)) panel.run.cancel(); });
  return panel.done;
}

/** A short-lived notice at the bottom of the window (role=status, read by screen readers). */
export function toast(text, { error = false, timeout = 5000 } = {}) {
  let host = document.getElementById('toasts');
  if (!host) {
    host = el('div', { id: 'toasts', class: 'toasts', role: 'status', 'aria-live': 'polite' });
    document.body.append(host);
  }
  const t = el('div', { class: ['toast', error && 'error'] }, el('span', {}, inline(text)),
    el('button', { type: 'button', class: 'icon-btn', 'aria-label': 'Dismiss', onclick: () => t.remove() }, icon('close', { size: 16 })));
  host.append(t);
  while (host.children.length > 3) host.firstChild.remove();
  setTimeout(() => t.remove(), error ? timeout * 2 : timeout);
}

/** A menu button with a popup list: arrow keys move, Esc closes and returns focus. */
export function popupMenu(button, items, { className = '' } = {}) {
  const close = () => { menu.remove(); button.setAttribute('aria-expanded', 'false'); document.removeEventListener('pointerdown', outside, true); };
  const outside = e => { if (!menu.contains(e.target) && e.target !== button) close(); };
  const menu = el('div', { class: ['menu', className], role: 'menu', 'aria-label': button.getAttribute('aria-label') || 'Menu' },
    items.map(([label, action, extra = {}]) => el('button', {
      type: 'button', role: 'menuitem', tabindex: '-1', class: extra.class, 'aria-label': extra.label || null,
      onclick: () => { close(); button.focus(); action(); },
    }, label)));
  menu.addEventListener('keydown', e => {
    const btns = [...menu.querySelectorAll('[role=menuitem]')];
    const i = btns.indexOf(document.activeElement);
    if (e.key === 'ArrowDown' || e.key === 'ArrowRight') { e.preventDefault(); btns[(i + 1) % btns.length].focus(); }
    else if (e.key === 'ArrowUp' || e.key === 'ArrowLeft') { e.preventDefault(); btns[(i - 1 + btns.length) % btns.length].focus(); }
    else if (e.key === 'Home') { e.preventDefault(); btns[0].focus(); }
    else if (e.key === 'End') { e.preventDefault(); btns[btns.length - 1].focus(); }
    else if (e.key === 'Escape') { e.preventDefault(); e.stopPropagation(); close(); button.focus(); }
    else if (e.key === 'Tab') close();
  });
  button.setAttribute('aria-expanded', 'true');
  // Placed under (or above, near the bottom) its button, in the layer of the button's container.
  const host = button.closest('dialog') || document.body;
  host.append(menu);
  const r = button.getBoundingClientRect();
  const mw = menu.offsetWidth, mh = menu.offsetHeight;
  let left = Math.min(Math.max(8, r.right - mw), innerWidth - mw - 8);
  let top = r.bottom + 4;
  if (top + mh > innerHeight - 8) top = Math.max(8, r.top - mh - 4);
  menu.style.left = `${left}px`;
  menu.style.top = `${top}px`;
  document.addEventListener('pointerdown', outside, true);
  menu.querySelector('[role=menuitem]')?.focus();
  return close;
}

