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

  fill(root,
    el('section', { class: 'welcome', 'aria-labelledby': 'welcome-title' },
      el('div', { class: 'welcome-card' },
        el('div', { class: 'brand' }, el('img', { src: 'icon.svg', alt: '', width: '48', height: '48' }), el('span', {}, 'kez-chat')),
        el('h1', { id: 'welcome-title' }, 'Welcome'),
        el('p', { id: 'reg-help' }, 'End-to-end encrypted chat. Your key never leaves this computer; your server only sees who talks to whom.'),
        form, stage)));
  nameInput.focus();
}
