// A lying (or compromised) server for the key-change step of two_users.mjs: rewrites a handle's
// record in the registry's `kez_handles` bucket so that it names another identity's key, as
// tests/tests/cli.rs does from Rust. It speaks the NATS client protocol over one TCP connection
// as the server's own NATS user (its nkey seed, `server.nk` in the server's keys directory), so
// the scenario needs no NATS library: only node's net and crypto.

import net from 'node:net';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import crypto from 'node:crypto';

const B32 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567';

function base32Decode(text) {
  let bits = 0, value = 0;
  const out = [];
  for (const c of text) {
    const v = B32.indexOf(c);
    if (v < 0) throw new Error(`not base32: ${c}`);
    value = (value << 5) | v;
    bits += 5;
    if (bits >= 8) { out.push((value >>> (bits - 8)) & 255); bits -= 8; }
  }
  return Buffer.from(out);
}

function base32Encode(bytes) {
  let bits = 0, value = 0, out = '';
  for (const b of bytes) {
    value = (value << 8) | b;
    bits += 8;
    while (bits >= 5) { out += B32[(value >>> (bits - 5)) & 31]; bits -= 5; }
  }
  if (bits > 0) out += B32[(value << (5 - bits)) & 31];
  return out;
}

/** CRC-16/XMODEM, as nkeys append it (little-endian). */
function crc16(bytes) {
  let crc = 0;
  for (const b of bytes) {
    crc ^= b << 8;
    for (let i = 0; i < 8; i++) crc = crc & 0x8000 ? ((crc << 1) ^ 0x1021) & 0xffff : (crc << 1) & 0xffff;
  }
  return crc;
}

/** The ed25519 key of a user nkey seed (`SU…`) and its public nkey (`U…`). */
function userKey(seedText) {
  const raw = base32Decode(seedText.trim());
  const seed = raw.subarray(2, 34);
  const privateKey = crypto.createPrivateKey({
    key: Buffer.concat([Buffer.from('302e020100300506032b657004220420', 'hex'), seed]),
    format: 'der',
    type: 'pkcs8',
  });
  const pub = crypto.createPublicKey(privateKey).export({ format: 'der', type: 'spki' }).subarray(-32);
  const body = Buffer.concat([Buffer.from([20 << 3]), pub]);
  const crc = crc16(body);
  return { privateKey, nkey: base32Encode(Buffer.concat([body, Buffer.from([crc & 255, crc >> 8])])) };
}

/** A minimal NATS connection: CONNECT with the nkey's signature of the nonce, request/reply. */
async function connect(url, { privateKey, nkey }) {
  const { hostname, port } = new URL(url);
  const sock = net.connect(Number(port), hostname);
  let buf = Buffer.alloc(0);
  let sid = 0;
  const subs = new Map();
  const pongs = [];
  let failed = null;
  sock.on('data', data => {
    buf = Buffer.concat([buf, data]);
    for (;;) {
      const nl = buf.indexOf('\r\n');
      if (nl < 0) return;
      const line = buf.subarray(0, nl).toString();
      if (line.startsWith('MSG ')) {
        const parts = line.split(' ');
        const len = Number(parts[parts.length - 1]);
        if (buf.length < nl + 2 + len + 2) return;
        const payload = buf.subarray(nl + 2, nl + 2 + len);
        buf = buf.subarray(nl + 4 + len);
        subs.get(parts[2])?.(payload);
        continue;
      }
      buf = buf.subarray(nl + 2);
      if (line.startsWith('INFO ')) {
        const info = JSON.parse(line.slice(5));
        if (!info.nonce) continue; // a later INFO (cluster changes)
        const sig = crypto.sign(null, Buffer.from(info.nonce), privateKey).toString('base64url');
        sock.write(`CONNECT ${JSON.stringify({ nkey, sig, verbose: false, pedantic: false, protocol: 1 })}\r\nPING\r\n`);
      } else if (line === 'PING') sock.write('PONG\r\n');
      else if (line === 'PONG') pongs.shift()?.resolve();
      else if (line.startsWith('-ERR')) { failed = new Error(`NATS: ${line}`); for (const p of pongs.splice(0)) p.reject(failed); }
    }
  });
  await new Promise((resolve, reject) => { pongs.push({ resolve, reject }); sock.once('error', reject); });
  const request = (subject, body) => new Promise((resolve, reject) => {
    if (failed) return reject(failed);
    const id = String(++sid);
    const inbox = `_INBOX.lie.${crypto.randomBytes(8).toString('hex')}`;
    const timer = setTimeout(() => reject(new Error(`no answer on ${subject}`)), 10_000);
    subs.set(id, payload => { clearTimeout(timer); subs.delete(id); resolve(JSON.parse(payload.toString())); });
    const bytes = Buffer.from(body);
    sock.write(`SUB ${inbox} ${id}\r\nUNSUB ${id} 1\r\nPUB ${subject} ${inbox} ${bytes.length}\r\n`);
    sock.write(Buffer.concat([bytes, Buffer.from('\r\n')]));
  });
  return { request, close: () => sock.end() };
}

/**
 * Makes the server's registry say that handle `name` (e.g. `bob`) has the key registered for
 * `impostor` (e.g. `mallory`, whose own chain verifies): what a lying server, or a new account
 * under the same name, looks like to bob's contacts. Answers the key it now names.
 */
export async function lieAboutHandle(natsUrl, keysDir, name, impostor) {
  const conn = await connect(natsUrl, userKey(readFileSync(join(keysDir, 'server.nk'), 'utf8')));
  try {
    const get = async handle => {
      const answer = await conn.request('$JS.API.STREAM.MSG.GET.KV_kez_handles', JSON.stringify({ last_by_subj: `$KV.kez_handles.${handle}` }));
      if (!answer.message) throw new Error(`no handle record for ${handle}: ${JSON.stringify(answer)}`);
      return JSON.parse(Buffer.from(answer.message.data, 'base64').toString());
    };
    const record = await get(name);
    const key = (await get(impostor)).key;
    const ack = await conn.request(`$KV.kez_handles.${name}`, JSON.stringify({ ...record, key }));
    if (!ack.seq) throw new Error(`the record was not stored: ${JSON.stringify(ack)}`);
    return key;
  } finally {
    conn.close();
  }
}
