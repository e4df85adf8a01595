// The WebSocket to the server: binary messages are [u32 header length][JSON header][payloads].

const enc = new TextEncoder();
const dec = new TextDecoder();

/** Pack a header object and one payload (ArrayBuffer/TypedArray) into a binary message. */
export function pack(header, payload) {
  const h = enc.encode(JSON.stringify(header));
  const body = payload ? new Uint8Array(payload.buffer ?? payload, payload.byteOffset ?? 0, payload.byteLength) : new Uint8Array(0);
  const out = new Uint8Array(4 + h.length + body.length);
  new DataView(out.buffer).setUint32(0, h.length, true);
  out.set(h, 4);
  out.set(body, 4 + h.length);
  return out;
}

/** Unpack a binary message: {header, blobs: {name: Uint8Array}}. */
export function unpack(buffer) {
  const n = new DataView(buffer).getUint32(0, true);
  const header = JSON.parse(dec.decode(new Uint8Array(buffer, 4, n)));
  const base = 4 + n;
  const blobs = {};
  for (const [name, off, len] of header.blobs || []) blobs[name] = new Uint8Array(buffer, base + off, len);
  return { header, blobs };
}

/**
 * A connection that reconnects with backoff. onMessage(msg) gets parsed text messages (objects)
 * and unpacked binary messages ({header, blobs}); onState(state) gets 'open' | 'closed' | 'refused'.
 */
export class Connection {
  constructor(token, { onMessage, onState }) {
    this.token = token;
    this.onMessage = onMessage;
    this.onState = onState;
    this.ws = null;
    this.retry = 0;
    this.stopped = false;
  }

  connect() {
    const proto = location.protocol === 'https:' ? 'wss' : 'ws';
    const ws = new WebSocket(`${proto}://${location.host}/ws?token=${encodeURIComponent(this.token)}`);
    ws.binaryType = 'arraybuffer';
    this.ws = ws;
    let opened = false;
    ws.onopen = () => {
      opened = true;
      this.retry = 0;
      this.onState('open');
    };
    ws.onmessage = (ev) => {
      if (typeof ev.data === 'string') this.onMessage(JSON.parse(ev.data));
      else this.onMessage(unpack(ev.data));
    };
    ws.onclose = (ev) => {
      this.ws = null;
      if (this.stopped) return;
      // refused before opening: wrong token, foreign origin, or too many pages
      this.onState(opened ? 'closed' : 'refused', ev.reason || '');
      const delay = Math.min(10000, 500 * 2 ** this.retry++);
      setTimeout(() => this.connect(), delay);
    };
  }

  get open() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  /** Bytes queued in the browser but not yet sent (to avoid piling frames onto a slow link). */
  get buffered() {
    return this.ws ? this.ws.bufferedAmount : 0;
  }

  send(obj) {
    if (this.open) this.ws.send(JSON.stringify(obj));
  }

  sendBinary(header, payload) {
    if (!this.open) return false;
    this.ws.send(pack(header, payload));
    return true;
  }
}
