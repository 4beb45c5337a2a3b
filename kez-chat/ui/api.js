// The gateway connection: one WebSocket, CLI runs multiplexed over it by id, uploads over HTTP.
// (See the contract: every run is `kez-chat <args>`, its §12 frames come back tagged with our id.)

/** A run that failed: `code` is the CLI's exit code (or a refusal code), `message` for people. */
export class RunError extends Error {
  constructor(code, message, err = '') {
    super(message || `failed (exit code ${code})`);
    this.code = code;
    this.err = err;
  }
}

/** One running command: `frames` are delivered to the handlers, `done` settles at its end. */
class Run {
  constructor(api, id, args, handlers) {
    this.api = api;
    this.id = id;
    this.args = args;
    this.handlers = handlers;
    this.out = '';
    this.err = '';
    this.done = new Promise((resolve, reject) => { this.resolve = resolve; this.reject = reject; });
    // Unhandled rejections of runs nobody awaits (e.g. listen) must not litter the console.
    this.done.catch(() => {});
  }

  frame(f) {
    const h = this.handlers;
    if ('out' in f) { this.out += f.out; h.onOut?.(f.out, this); }
    else if ('err' in f) { this.err += f.err; h.onErr?.(f.err, this); }
    else if ('read' in f) h.onRead?.(f.read, this);
    else if ('progress' in f) h.onProgress?.(f.progress, this);
    else if ('exit' in f) this.finish(f.exit.code, f.exit.message);
    else if ('refused' in f) this.finish(f.refused.code, f.refused.message);
  }

  finish(code, message) {
    this.api.runs.delete(this.id);
    if (code === 0) this.resolve({ out: this.out, err: this.err, download: this.download });
    else this.reject(new RunError(code, message || lastLine(this.err), this.err));
  }

  /** Answers a `read` frame (`null`: end of input). */
  input(line) { this.api.send({ id: this.id, input: line }); }
  /** Like Ctrl-C. */
  cancel() { this.api.send({ id: this.id, cancel: true }); }
}

function lastLine(text) {
  const lines = String(text).trim().split('\n');
  return lines[lines.length - 1] || '';
}

export class Api extends EventTarget {
  constructor() {
    super();
    this.runs = new Map();
    this.nextId = 1;
    this.ws = null;
    this.hello = null;
    this.state = 'connecting';
    this.backoff = 500;
    this.queue = [];
  }

  /** The gateway's base URL: the page's own (`http://127.0.0.1:PORT/TOKEN/`). */
  base() { return new URL('./', location.href); }

  connect() {
    const url = new URL('ws', this.base());
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    this.setState('connecting');
    const ws = new WebSocket(url);
    this.ws = ws;
    ws.onmessage = ev => this.onMessage(ev.data);
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.hello = null;
      // Runs of the lost socket are gone with it (the gateway cancels them).
      for (const run of this.runs.values()) run.finish('disconnected', 'the connection to kez-chat ui was lost');
      this.runs.clear();
      this.setState('offline');
      // Back off so a gateway that is down is not hammered; the banner shows when we retry.
      const wait = this.backoff;
      this.backoff = Math.min(this.backoff * 2, 15000);
      this.retryAt = Date.now() + wait;
      this.dispatchEvent(new CustomEvent('retry', { detail: wait }));
      this.retryTimer = setTimeout(() => this.connect(), wait);
    };
  }

  /** Reconnects now (the "retry" button, or after registering: a new hello). */
  reconnect() {
    clearTimeout(this.retryTimer);
    if (this.ws) { const ws = this.ws; this.ws = null; ws.onclose = null; ws.close(); this.onLost(); }
    this.connect();
  }

  onLost() {
    for (const run of this.runs.values()) run.finish('disconnected', 'the connection to kez-chat ui was lost');
    this.runs.clear();
  }

  setState(state) {
    this.state = state;
    this.dispatchEvent(new CustomEvent('state', { detail: state }));
  }

  onMessage(data) {
    let msg;
    try { msg = JSON.parse(data); } catch { return; }
    if (msg.hello) {
      this.hello = msg.hello;
      this.backoff = 500;
      this.setState('online');
      const queued = this.queue.splice(0);
      for (const q of queued) this.send(q);
      this.dispatchEvent(new CustomEvent('hello', { detail: msg.hello }));
      return;
    }
    const run = this.runs.get(msg.id);
    if (!run) return;
    if (msg.download) { run.download = msg.download; run.handlers.onDownload?.(msg.download, run); }
    if (msg.frame) run.frame(msg.frame);
  }

  send(obj) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN && this.hello) this.ws.send(JSON.stringify(obj));
    else if (obj.run) this.queue.push(obj);
  }

  /** Starts `kez-chat <args>`; returns the Run (await `run.done`). */
  start(args, handlers = {}) {
    const id = this.nextId++;
    const run = new Run(this, id, args, handlers);
    this.runs.set(id, run);
    if (!this.ws || this.state !== 'online') {
      // Not connected: fail at once rather than leave the user waiting on a dead socket.
      queueMicrotask(() => run.finish('disconnected', 'not connected to kez-chat ui'));
      return run;
    }
    this.send({ id, run: args });
    return run;
  }

  /** Runs a `--json` command and parses its output. */
  async json(args, handlers) {
    const { out } = await this.start(args, handlers).done;
    const text = out.trim();
    return text === '' ? null : JSON.parse(text);
  }

  /** Runs a command for its text output. */
  async text(args, handlers) {
    return (await this.start(args, handlers).done).out;
  }

  /** Uploads a File to the gateway's stage: `upload:u-…` for share/publish/name --avatar.
   * XMLHttpRequest rather than fetch because only it reports upload progress. */
  upload(file, onProgress) {
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open('POST', new URL(`upload?name=${encodeURIComponent(file.name)}`, this.base()));
      xhr.setRequestHeader('Content-Type', 'application/octet-stream');
      xhr.upload.onprogress = e => onProgress?.(e.loaded, e.total || file.size);
      xhr.onload = () => {
        let body = null;
        try { body = JSON.parse(xhr.responseText); } catch { /* not JSON */ }
        if (xhr.status === 200 && body?.upload) resolve(`upload:${body.upload}`);
        else reject(new RunError(body?.error?.code || xhr.status, body?.error?.message || `upload failed (HTTP ${xhr.status})`));
      };
      xhr.onerror = () => reject(new RunError('network', 'upload failed: the connection to kez-chat ui was lost'));
      xhr.send(file);
    });
  }

  /** Fetches what a `download` run staged: the browser saves it (an <a download> click). */
  save(download) {
    const a = document.createElement('a');
    a.href = new URL(download.url, this.base()).href;
    a.download = download.name || '';
    a.rel = 'noopener';
    a.hidden = true;
    document.body.append(a);
    a.click();
    a.remove();
  }
}
