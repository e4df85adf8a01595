// Drawing: everything the page shows of the state: the layers grid, the unit pane, the predictions,
// the receptive-field box, the settings' controls, the status line and the messages.

import { $, el, fmt, setChildren, setHidden, setText } from './dom.js';
import { GridView, drawMap, drawRgb, drawStrip } from './grid.js';
import { OFF, isLive } from './state.js';

/** Live results redraw the text panes (status line, predictions, the unit's figures, the backprop
 * view's note) together, at most this often (ms): each redraw lays out and paints text, which costs
 * more to draw than the whole grid (and makes Chromium hit-test the mouse position again), so they
 * share one layout and paint instead of one each. */
const TEXT_MS = 250;
/** The backprop note is never rewritten sooner than this after the last time (ms), but for another view. */
const NOTE_GAP = 0.8 * TEXT_MS;

/** The status line of a frozen input (no frame rate: none is drawn). */
export const FROZEN_STATUS = 'frozen (f or Unfreeze to go on)';

export class Panes {
  /** app: {state, figures, sources, atlas} (see main.js). */
  constructor(app) {
    this.app = app;
    this.state = app.state;
    this.grid = new GridView($('grid'), $('grid-cursor'));
    this.offGrid = new GridView(document.createElement('canvas'), null);
    // what was drawn last, so that unchanged parts are not redrawn on every frame
    this.highlightKey = null;
    this.pinKey = null;
    this.rfKey = null;
    this.predKey = null;
    this.unitStatsUnit = null;
    this.textAt = 0; // when the text panes were last redrawn for a live result
    this.textFor = null; // the result textDue() last decided for, and what it decided
    this.textNow = true;
    this.errorTimer = null;
    this.note = ''; // the backprop view's note: the newest, when and for what it was last written, its timer
    this.noteAt = -Infinity;
    this.noteWhat = null;
    this.noteTimer = null;
    this.statusFrozen = false; // whether the status line last written was the frozen one
    this.stripKey = null;
  }

  // -- the connection ----------------------------------------------------------------------------------
  connState(state, reason) {
    const status = $('status');
    if (state === 'open') status.textContent = 'connected';
    else if (state === 'refused') {
      status.textContent = `refused${reason ? `: ${reason}` : ''} — retrying`;
      this.showError('the server refused the connection: it serves too many pages, or it was restarted (then open the new URL it printed)');
    }
    else status.textContent = 'disconnected — reconnecting';
  }

  hello(m) {
    $('model-name').textContent = `${m.model.name} · ${m.model.input_size.join('×')}${m.model.untrained ? ` · ${m.model.weights}: untrained` : ''}`;
  }

  ready() {
    $('status').textContent = 'connected — choose an input';
  }

  // -- results -----------------------------------------------------------------------------------------
  /** Draw a frame result: the grid, the unit's map, its figures, the predictions, the receptive field. */
  frame(h, blobs) {
    const lut = this.state.luts[this.state.colormap];
    this.redrawGrid();
    if (blobs.unit) {
      drawMap($('unit-map'), h.unit_shape[0], h.unit_shape[1], blobs.unit, lut);
      this.app.figures.unitMapDrawn(h.unit, true);
      setHidden($('unit-map'), false);
      this.drawPin(h);
    } else setHidden($('unit-map'), true);
    this.showUnitStats(h);
    // (the first frame of a newly selected layer comes without them: the list shown stays)
    if (h.predictions && this.textDue(h)) this.showPredictions(h.predictions);
    this.showRf(h);
    this.showQueryBox(h);
  }

  /** Draw the last frame's tiles (activations, or synthesized images in pattern mode). */
  redrawGrid() {
    const st = this.state;
    const h = st.lastHeader;
    if (!h) return;
    let drawn = 0;
    if (st.pattern) {
      // units without a synthesized image show their activations, drawn off screen first
      this.offGrid.draw(h.grid.shape, st.lastBlobs.grid, st.luts[st.colormap]);
      drawn = this.app.atlas.drawPattern(this.grid, h, this.offGrid);
    }
    if (!drawn) this.grid.draw(h.grid.shape, st.lastBlobs.grid, st.luts[st.colormap]);
    this.app.figures.patternTiles = drawn || 0;
    this.drawStrip(h, st.lastBlobs);
    const unit = st.settings?.layer === h.layer ? st.settings.unit : h.unit;
    const key = `${unit}/${this.grid.layout.width}x${this.grid.layout.height}/${this.grid.canvas.style.width}`;
    if (key !== this.highlightKey) {
      this.highlightKey = key;
      this.grid.highlight(unit);
    }
  }

  /** A unit of the layer shown was selected: draw its map at once from the last frame's grid, the
   * server's exact map replaces it with the next result (a redraw from the frame's forward pass, a
   * few milliseconds later). The unit's tile is stretched to its own range, as the server's map is
   * (channel normalization); only where the grid is an affine image of the activations (a
   * normalization of hello's affine_normalizations, no gain or gamma, no diff view, no pooling) and the
   * unit is a channel map. */
  previewUnit(unit) {
    const st = this.state;
    const h = st.lastHeader, grid = st.lastBlobs?.grid, s = st.settings;
    if (!h || !grid || !s || !h.unit_shape || h.layer !== s.layer || s.token) return;
    if (h.grid.factor !== 1 || h.grid.diff || h.grid.shape.length !== 3) return;
    if (!st.info.affine_normalizations.includes(s.normalize) || s.gain !== 1 || s.gamma !== 1) return;
    const [n, th, tw] = h.grid.shape;
    if (!(unit >= 0 && unit < n) || th !== h.unit_shape[0] || tw !== h.unit_shape[1]) return;
    const tile = grid.subarray(unit * th * tw, (unit + 1) * th * tw);
    let lo = 255, hi = 0;
    for (const v of tile) {
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
    const out = new Uint8Array(th * tw);
    if (hi > lo) for (let i = 0; i < out.length; i++) out[i] = Math.round(((tile[i] - lo) * 255) / (hi - lo));
    drawMap($('unit-map'), th, tw, out, st.luts[st.colormap]);
    this.grid.highlight(unit);
    this.app.figures.unitMapDrawn(unit, false);
  }

  /** The prefix strip under the grid (a token layer's prefix tokens; an attention layer's prefix keys),
   * on the grid's colour scale, as wide as the grid; hidden for layers without prefix tokens. */
  drawStrip(h, blobs) {
    const wrap = $('strip-wrap');
    if (!h.prefix || !blobs.prefix) {
      setHidden(wrap, true);
      this.app.figures.strip = null;
      return;
    }
    const [rows, cols] = h.prefix.shape;
    const names = h.prefix.names;
    const key = names.join(' ');
    if (key !== this.stripKey || wrap.hidden) {
      this.stripKey = key;
      setChildren($('strip-labels'), ...names.map((n) => el('div', {}, n)));
      setHidden(wrap, false);
    }
    const width = this.grid.canvas.clientWidth - $('strip-labels').offsetWidth - 4;
    drawStrip($('strip'), rows, cols, blobs.prefix, this.state.luts[this.state.colormap], width);
    this.app.figures.strip = { names, shape: [rows, cols] };
  }

  /** The query control of an attention layer: its prefix tokens and "patch under the cursor". */
  showQuery(s) {
    const info = this.state.layerInfo(s.layer);
    const wrap = $('query-wrap');
    if (!info || info.layout !== 'attention') {
      setHidden(wrap, true);
      return;
    }
    setHidden(wrap, false);
    const sel = $('query-mode');
    const want = [...info.prefix, 'cursor'];
    if ([...sel.options].map((o) => o.value).join(' ') !== want.join(' ')) {
      setChildren(sel, ...info.prefix.map((n) => el('option', { value: n }, n === 'cls' ? 'class token' : n)),
        el('option', { value: 'cursor' }, 'patch under the cursor'));
    }
    const q = s.query;
    sel.value = Array.isArray(q) || this.state.queryCursor ? 'cursor' : q ?? info.prefix[0] ?? 'cursor';
    $('query-note').textContent = Array.isArray(q) ? `patch ${q.join(',')} (move over the input)` : this.state.queryCursor ? 'move over the input' : '';
  }

  /** Draw a backprop view (``h``, ``blobs``), with result ``result`` (Link.withNextResult) or alone
   * (null). Its note (what it shows, and its time) is written at once when what it shows changed;
   * else at most every TEXT_MS (never within NOTE_GAP of the last), with a result on the text panes'
   * clock (one layout for all the text), and the newest one last. */
  backprop(h, blobs, result) {
    if (blobs.rgb) drawRgb($('backprop'), h.h, h.w, blobs.rgb);
    const scale = h.percentile >= 100 ? 'max' : `p${h.percentile}`;
    const what = `${h.mode} · ${h.filter} · ${scale} · ${h.layer}:${h.unit}${h.token ? `@${h.token}` : ''}`;
    this.note = `${what} · ${fmt(h.ms, 0)} ms${h.weak ? ` · ${h.weak}` : ''}`;
    clearTimeout(this.noteTimer);
    const since = performance.now() - this.noteAt;
    if (what !== this.noteWhat || (result ? this.textDue(result) && since >= NOTE_GAP : since >= TEXT_MS)) this.writeNote();
    // with results coming, the next tick writes it; the timer only if none comes
    else this.noteTimer = setTimeout(() => this.writeNote(), (result ? 2 : 1) * TEXT_MS - since);
    this.noteWhat = what;
  }

  writeNote() {
    clearTimeout(this.noteTimer);
    this.noteAt = performance.now();
    setText($('backprop-note'), this.note);
  }

  async input(h, blobs) {
    const sources = this.app.sources;
    await sources.drawStill(blobs.jpeg);
    const where = h.index !== undefined ? ` · frame ${h.index + 1}/${sources.server?.frames ?? '?'}` : '';
    $('input-label').textContent = `${h.source}: ${h.name ?? ''}${where}`;
  }

  // -- settings ----------------------------------------------------------------------------------------
  /** Show the settings in the controls, the unit's title and the URL (which keeps layer and unit). */
  settings(s) {
    const st = this.state;
    $('layer-select').value = s.layer;
    if ($('layer-select').value !== s.layer) this.fillLayers();
    $('normalize').value = s.normalize;
    $('gain').value = Math.log2(s.gain);
    $('gain-out').textContent = `×${fmt(s.gain, s.gain < 10 ? 2 : 0)}`;
    $('gamma').value = s.gamma;
    $('gamma-out').textContent = fmt(s.gamma, 2);
    $('diff').checked = s.diff;
    $('backprop-mode').value = s.backprop;
    $('backprop-filter').value = s.filter;
    $('backprop-raw').checked = this.app.controls?.isRawBackprop() ?? false;
    setHidden($('backprop-wrap'), s.backprop === OFF);
    if (document.activeElement !== $('unit-input')) $('unit-input').value = s.unit;
    const info = st.layerInfo();
    $('unit-input').max = info ? info.shape[0] - 1 : 0;
    const label = st.unitLabel(s.unit);
    setChildren($('unit-title'), `${s.layer} : ${s.unit}${s.token ? `@${s.token}` : ''}`, label ? el('span', { className: 'class-label' }, ` — ${label}`) : null);
    this.grid.highlight(s.unit);
    this.showQuery(s);
    const url = new URL(location.href);
    url.searchParams.set('layer', s.layer);
    url.searchParams.set('unit', String(s.unit));
    history.replaceState(null, '', url);
  }

  fillLayers() {
    const sel = $('layer-select');
    setChildren(sel, ...this.state.layerList().map((l) => el('option', { value: l.name }, `${l.name}  (${l.type}, ${l.shape.join('×')})`)));
    if (this.state.settings) sel.value = this.state.settings.layer;
  }

  // -- panes -------------------------------------------------------------------------------------------
  /** Whether the text panes are redrawn with result ``h``: always for a still input, every TEXT_MS for
   * live ones (decided once per result, for all of them). */
  textDue(h) {
    if (this.textFor !== h) {
      const now = performance.now();
      this.textFor = h;
      this.textNow = !isLive(h.source) || now - this.textAt >= TEXT_MS;
      if (this.textNow) this.textAt = now;
    }
    return this.textNow;
  }

  /** The top-5 list (redrawn only when it changed). */
  showPredictions(preds) {
    const key = preds.map((p) => `${p.index}:${(p.probability * 100).toFixed(1)}`).join(' ');
    if (key === this.predKey) return;
    this.predKey = key;
    const items = preds.map((p) =>
      el('li', { title: p.label }, el('span', { className: 'bar', style: { width: `${Math.max(1, p.probability * 100)}%` } }),
        el('span', { className: 'prob' }, `${(p.probability * 100).toFixed(1)}%`), el('span', { className: 'label' }, p.label)),
    );
    setChildren($('predictions'), ...items);
  }

  /** The unit's figures under its map: at once for another unit, else with the other text panes. */
  showUnitStats(h) {
    if (!this.textDue(h) && h.unit === this.unitStatsUnit) return;
    this.unitStatsUnit = h.unit;
    const s = h.unit_stats || {};
    const parts = [`max ${fmt(s.max)}`, `mean ${fmt(s.mean)}`];
    if (s.argmax) parts.push(`strongest at ${s.argmax.join(',')}`);
    if (s.value !== undefined) parts.push(`at pin ${fmt(s.value)}`);
    if (h.query) parts.push(`query ${h.query}`);
    if (s.prefix && h.prefix) parts.push(h.prefix.names.map((n, i) => `${n} ${fmt(s.prefix[i])}`).join(' · '));
    if (h.unit_label) parts.push(h.unit_label);
    setText($('unit-stats'), parts.join(' · '));
  }

  drawPin(h) {
    const pin = $('unit-pin');
    const pos = this.state.settings?.position;
    if (!pos || !h.unit_shape) {
      setHidden(pin, true);
      this.pinKey = null;
      return;
    }
    const key = `${pos}/${h.unit_shape}`;
    if (key === this.pinKey) return;
    this.pinKey = key;
    const c = $('unit-map');
    const [mh, mw] = h.unit_shape;
    Object.assign(pin.style, {
      left: `${c.offsetLeft + (pos[1] / mw) * c.clientWidth}px`, top: `${c.offsetTop + (pos[0] / mh) * c.clientHeight}px`,
      width: `${c.clientWidth / mw}px`, height: `${c.clientHeight / mh}px`,
    });
    setHidden(pin, false);
  }

  /** Box the receptive field of the pinned position (or of the unit's strongest one) on the input. */
  showRf(h) {
    const st = this.state;
    const box = $('rf-box');
    const g = st.geometry.get(h.layer);
    const pos = (st.settings?.layer === h.layer && st.settings.position) || h.unit_stats?.argmax;
    if (!g || !pos || !g.output_size) {
      setHidden(box, true);
      return;
    }
    const [y, x] = pos;
    const rf = [g.rows.lo[y], g.cols.lo[x], g.rows.hi[y] + 1, g.cols.hi[x] + 1];
    if (rf.some((v) => v === undefined)) {
      setHidden(box, true);
      return;
    }
    const key = rf.join(',');
    if (key === this.rfKey && !box.hidden) return;
    this.rfKey = key;
    const c = $('input-canvas');
    const [ih, iw] = g.input_size;
    const sx = c.clientWidth / iw, sy = c.clientHeight / ih;
    const [y0, x0, y1, x1] = rf;
    Object.assign(box.style, { left: `${c.offsetLeft + x0 * sx}px`, top: `${c.offsetTop + y0 * sy}px`, width: `${(x1 - x0) * sx}px`, height: `${(y1 - y0) * sy}px` });
    setHidden(box, false);
    this.app.figures.rf = rf;
  }

  /** Box an attention layer's query patch on the input (its patch of the layer's grid); hidden for
   * prefix-token queries and other layers. */
  showQueryBox(h) {
    const box = $('query-box');
    const info = this.state.layerInfo(h.layer);
    const m = /^(\d+),(\d+)$/.exec(h.query ?? '');
    if (!m || !info || info.layout !== 'attention' || info.shape.length !== 3) {
      setHidden(box, true);
      this.app.figures.queryBox = null;
      return;
    }
    const [, gh, gw] = info.shape;
    const [ih, iw] = this.state.info.model.input_size;
    const [y, x] = [Number(m[1]), Number(m[2])];
    const rect = [(y * ih) / gh, (x * iw) / gw, ((y + 1) * ih) / gh, ((x + 1) * iw) / gw];
    const c = $('input-canvas');
    const sx = c.clientWidth / iw, sy = c.clientHeight / ih;
    Object.assign(box.style, {
      left: `${c.offsetLeft + rect[1] * sx}px`, top: `${c.offsetTop + rect[0] * sy}px`,
      width: `${(rect[3] - rect[1]) * sx}px`, height: `${(rect[2] - rect[0]) * sy}px`,
    });
    setHidden(box, false);
    this.app.figures.queryBox = rect;
  }

  /** The status line (with the other text panes: textDue). */
  showStatus(h, fps) {
    // frozen: no frame rate (none is drawn; the last one would stand there, stale), the rest as ever;
    // a change of frozen is written with the first result after it, not at the text panes' next tick
    const frozen = this.app.sources.frozen;
    if (!this.textDue(h) && frozen === this.statusFrozen) return;
    this.statusFrozen = frozen;
    const st = h.stats;
    const figures = this.app.figures;
    const parts = frozen ? [FROZEN_STATUS] : [`${fmt(fps, 1)} frames/s`];
    if (figures.latencies.length && !frozen) parts.push(`p95 ${fmt(figures.p95, 0)} ms`);
    parts.push(`server ${fmt(h.ms, 0)} ms`, `dropped ${st.dropped}`, `skipped ${this.app.sources.skipped}`);
    if (st.errors) parts.push(`errors ${st.errors}`);
    setText($('status'), parts.join(' · '));
  }

  showError(message, sticky = false) {
    const box = $('message');
    $('message-text').textContent = message;
    setHidden(box, false);
    this.app.figures.errors.push(message);
    clearTimeout(this.errorTimer);
    if (!sticky) this.errorTimer = setTimeout(() => setHidden(box, true), 8000);
  }

  /** The video's play button follows its state: {paused, ended}. */
  videoState(v) {
    $('video-play').textContent = v.paused || v.ended ? 'Play' : 'Pause';
  }

  /** The window changed size: refit the grid and redraw what depends on the layout. */
  resize() {
    this.grid.fit();
    this.highlightKey = null;
    this.rfKey = null;
    this.pinKey = null;
    this.redrawGrid();
  }
}
