// The first screen of an unregistered home: choose a name and a server, then the paper key
// (the CLI's own text block) and one of its words typed back. It is `kez-chat register` run
// interactively: its `err` lines are shown as they are, each `read` frame gets an input.
import { el, fill } from './text.js';
import { interactivePanel } from './dialogs.js';

export function showRegister(ctx, root) {
  const { api } = ctx;
  const hello = api.hello || {};
  const nameInput = el('input', { id: 'reg-name', name: 'name', class: 'input', required: true, autocomplete: 'username', spellcheck: 'false', placeholder: 'alice', pattern: '@?[A-Za-z][A-Za-z0-9_]{1,31}' });
  const serverInput = el('input', { id: 'reg-server', name: 'server', class: 'input', required: !hello.server, spellcheck: 'false', placeholder: 'tls://kez.lat:4222', value: hello.server || '' });
  const submit = el('button', { type: 'submit', class: 'btn primary' }, 'Create my account');
  const stage = el('div', { class: 'register-stage' });
  const form = el('form', { class: 'stack', 'aria-describedby': 'reg-help' },
    el('div', { class: 'field' }, el('label', { for: 'reg-name' }, 'Your name'),
      nameInput, el('p', { class: 'hint' }, 'Your handle will be @name on the server: 2 to 32 letters, digits and _, starting with a letter.')),
    el('div', { class: 'field' }, el('label', { for: 'reg-server' }, 'Server'),
      serverInput, el('p', { class: 'hint' }, hello.server ? 'The server kez-chat ui was started with.' : 'The NATS URL of your home server.')),
    el('div', { class: 'actions' }, submit));

  form.addEventListener('submit', e => {
    e.preventDefault();
    const name = nameInput.value.trim();
    const server = serverInput.value.trim();
    const args = ['register'];
    // The gateway's own --server needs no repeating; another one goes before `register`.
    if (server && server !== hello.server) args.unshift('--server', server);
    args.push('--', name);
    form.hidden = true;
    root.querySelector('.welcome-card').classList.add('wide');
    ctx.registering = true;
    const panel = interactivePanel(api, args, {
      foldLog: true,
      onExit: r => {
        if (r.ok) {
          fill(stage,
            el('h2', { tabindex: '-1', id: 'reg-done' }, 'You are registered'),
            el('p', {}, 'Your paper key is now one of your devices. Keep the paper somewhere safe.'),
            panel.node,
            el('div', { class: 'actions' }, el('button', { type: 'button', class: 'btn primary', id: 'reg-continue', onclick: () => ctx.afterRegister() }, 'Start chatting')));
          stage.querySelector('#reg-continue').focus();
        } else {
          // A paper key not confirmed still leaves the home registered (without a paper key):
          // "Continue" goes on if so, "Try again" starts over (registering again is harmless).
          stage.append(el('p', { class: 'hint' }, 'If you were registered anyway, you can make a paper key later (menu → Paper key).'),
            el('div', { class: 'actions' },
              el('button', { type: 'button', class: 'btn', onclick: () => { ctx.registering = false; showRegister(ctx, root); } }, 'Try again'),
              el('button', { type: 'button', class: 'btn primary', onclick: () => ctx.afterRegister() }, 'Continue')));
        }
      },
    });
    fill(stage,
      el('h2', {}, 'Your paper key'),
      el('p', { class: 'hint' }, 'Write the words down in order. You will be asked for one of them.'),
      panel.node);
  });

  // Someone who has an identity already: this home joins it as a new device (`device join`,
  // approved on another device), or recovers it from the paper key (`recover`, the 24 words).
  const other = (mode) => {
    const handleInput = el('input', { id: 'other-handle', class: 'input', required: true, spellcheck: 'false', placeholder: '@alice' });
    const otherForm = el('form', { class: 'stack' },
      el('h2', {}, mode === 'join' ? 'Join as a new device' : 'Recover with your paper key'),
      el('p', { class: 'hint' }, mode === 'join'
        ? 'This shows a pairing request. On one of your devices, add it (Devices → Add a device, or `kez-chat device add`).'
        : 'You will type the 24 words of your paper key. They are used once and never stored.'),
      el('div', { class: 'field' }, el('label', { for: 'other-handle' }, 'Your handle'), handleInput),
      el('div', { class: 'actions' },
        el('button', { type: 'button', class: 'btn', onclick: () => showRegister(ctx, root) }, 'Back'),
        el('button', { type: 'submit', class: 'btn primary' }, mode === 'join' ? 'Show the pairing request' : 'Recover')));
    otherForm.addEventListener('submit', e => {
      e.preventDefault();
      let handle = handleInput.value.trim();
      if (!handle.startsWith('@')) handle = `@${handle}`;
      const server = serverInput.value.trim();
      const args = mode === 'join' ? ['device', 'join', '--', handle] : ['recover', '--', handle];
      if (server && server !== hello.server) args.unshift('--server', server);
      ctx.registering = true;
      root.querySelector('.welcome-card').classList.add('wide');
      const panel = interactivePanel(api, args, {
        secretInput: mode === 'recover',
        copyOut: mode === 'join',
        onExit: r => {
          stage.append(el('div', { class: 'actions' },
            el('button', { type: 'button', class: 'btn', onclick: () => { ctx.registering = false; showRegister(ctx, root); } }, 'Back'),
            r.ok ? el('button', { type: 'button', class: 'btn primary', id: 'reg-continue', onclick: () => ctx.afterRegister() }, 'Start chatting') : null));
          stage.querySelector('#reg-continue')?.focus();
        },
      });
      fill(stage, el('h2', {}, mode === 'join' ? 'Pairing request' : 'Your paper key'), panel.node);
    });
    form.hidden = true;
    alt.hidden = true;
    fill(stage, otherForm);
    handleInput.focus();
  };
  const alt = el('p', { class: 'hint alt-ways' }, 'Already use kez-chat? ',
    el('button', { type: 'button', class: 'link-btn', onclick: () => other('join') }, 'Join as a new device'), ' or ',
    el('button', { type: 'button', class: 'link-btn', onclick: () => other('recover') }, 'recover with your paper key'), '.');
  // The server field serves every way in; it stays in the form for the first.
  form.addEventListener('submit', () => { alt.hidden = true; });

  fill(root,
    el('section', { class: 'welcome', 'aria-labelledby': 'welcome-title' },
      el('div', { class: 'welcome-card' },
        el('div', { class: 'brand' }, el('img', { src: 'icon.svg', alt: '', width: '48', height: '48' }), el('span', {}, 'kez-chat')),
        el('h1', { id: 'welcome-title' }, 'Welcome'),
        el('p', { id: 'reg-help' }, 'End-to-end encrypted chat. Your key never leaves this computer; your server only sees who talks to whom.'),
        form, alt, stage)));
  nameInput.focus();
}
