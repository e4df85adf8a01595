// The page's conversation with the server over its WebSocket (net.js): hello, the settings round
// trip, and each result routed to the state, the figures and the panes.

import { Connection } from './net.js';
import { lut32 } from './grid.js';
import { isLive } from './state.js';

/** A draw that waits for the next result (withNextResult) waits at most this long (ms). */
const WAIT_MS = 250;

export class Link {
  /** app: {state, figures, panes, controls, sources, atlas, showError(msg)} (see main.js). */
  constructor(app) {
    this.app = app;
    this.state = app.state;
    this.conn = new Connection(app.state.token, { onMessage: (m) => this.onMessage(m), onState: (s, r) => app.panes.connState(s, r) });
    this.waiting = new Map(); // key -> {draw, timer}: the draws waiting for the next result
  }

  /** Run ``draw(h)`` right after the next result is drawn (``h``: that result's header), so that both
   * take one redraw of the page: whatever is drawn on its own is one more frame for the browser to lay
   * out, paint and composite. Alone (``h`` null) if no result comes within about 1.5 frame times (at
   * most WAIT_MS), and at once for a still or frozen input. One waiting draw per ``key``: a newer
   * one replaces it. */
  withNextResult(key, draw) {
    const { sources, figures } = this.app;
    clearTimeout(this.waiting.get(key)?.timer);
    this.waiting.delete(key);
    if (!sources.streaming) {
      draw(null);
      return;
    }
    const wait = Math.min(WAIT_MS, 1500 / Math.max(figures.fps || 0, 6));
    const timer = setTimeout(() => {
      this.waiting.delete(key);
      draw(null);
    }, wait);
    this.waiting.set(key, { draw, timer });
  }

  connect() {
    this.conn.connect();
  }

  onMessage(m) {
    const app = this.app;
    if (m.header) {
      const h = m.header;
      if (h.type === 'frame') this.onFrame(h, m.blobs);
      else if (h.type === 'backprop') this.onBackprop(h, m.blobs);
      else if (h.type === 'input') this.onInput(h, m.blobs);
      return;
    }
    switch (m.type) {
      case 'hello': this.onHello(m); break;
      case 'settings': this.applySettings(m.settings, m.req); break;
      case 'rf':
        this.state.geometry.set(m.layer, m);
        if (this.state.lastHeader && this.state.lastHeader.layer === m.layer) app.panes.showRf(this.state.lastHeader);
        break;
      case 'error':
        if (m.scope === 'frame') app.sources.onFailed(m.seq);
        app.showError(m.message);
        break;
      case 'synthesis': app.atlas.onSynthesis(m); break;
      case 'mining': app.atlas.onMining(m); break;
      case 'summary': this.withNextResult('summary', () => app.summary.show(m)); break;
      default: break;
    }
  }

  /** The server describes the model and what it offers; after a reconnect, what was shown is asked for again. */
  onHello(m) {
    const { state, figures, panes, controls, sources, atlas } = this.app;
    const first = state.info === null;
    state.info = m;
    state.sessionId = m.session;
    sources.setSize(m.model.input_size, m.model.crop_pct);
    panes.hello(m);
    state.luts = Object.fromEntries(Object.entries(m.colormaps).map(([k, v]) => [k, lut32(v)]));
    controls.build(m);
    atlas.configure(m.atlas, m.synthesis, m.mining);
    this.app.summary.hello(m);
    state.settings = { ...m.default_settings };
    panes.fillLayers();
    // the URL's layer and unit win on the first connection; after a reconnect, keep what was shown
    const want = {};
    if (first && state.urlLayer) want.layer = state.urlLayer;
    if (first && state.urlUnit !== null && /^\d+$/.test(state.urlUnit)) want.unit = Number(state.urlUnit);
    if (!first && state.prevSettings) Object.assign(want, state.prevSettings);
    this.sendSettings(want);
    figures.ready = true;
    panes.ready();
    if (!first && sources.mode === 'sample') sources.sample(sources.name);
  }

  onFrame(h, blobs) {
    const { state, figures, panes, sources } = this.app;
    const live = isLive(h.source);
    // the next camera frame goes out first: the server computes it while this one is drawn
    const sent = live ? sources.onResult(h.seq, h.ms) : null;
    // the input canvas shows the frame these activations are of (not the newer one already sent)
    if (sent?.image) {
      sources.showInput(sent.image);
      figures.inputSeq = h.seq;
    }
    state.lastHeader = h;
    state.lastBlobs = blobs;
    panes.frame(h, blobs);
    const t = performance.now();
    figures.frameDrawn(h, t, sent ? t - sent.born : null, live, sources);
    figures.lastGrid = blobs.grid ?? null;
    panes.showStatus(h, figures.fps);
    const waiting = [...this.waiting.values()];
    this.waiting.clear();
    for (const w of waiting) {
      clearTimeout(w.timer);
      w.draw(h);
    }
  }

  onBackprop(h, blobs) {
    this.withNextResult('backprop', (result) => {
      this.app.panes.backprop(h, blobs, result);
      this.app.figures.backpropsDrawn[result ? 'withResult' : 'alone']++;
    });
    this.app.figures.backprops++;
    this.app.figures.lastBackprop = h;
  }

  async onInput(h, blobs) {
    await this.app.panes.input(h, blobs);
    this.app.figures.inputs++;
  }

  /** Send a settings change; it is applied here at once and confirmed (or corrected) by the server. */
  sendSettings(partial) {
    const msg = this.state.propose(partial);
    if (msg) this.conn.send(msg);
    // another unit of the layer shown: drawn now from the grid the page has (the server's map follows)
    if (msg && 'unit' in partial && !('layer' in partial)) this.app.panes.previewUnit(this.state.settings.unit);
  }

  /** The server's settings (an answer to an older request than the last one sent is ignored). */
  applySettings(s, req) {
    if (!this.state.confirm(s, req)) return;
    this.app.panes.settings(s);
    this.app.atlas.show(s.layer, s.unit);
  }
}
