// The live toolbox page: wires the connection, the inputs, the panes and the keyboard together.

import { $, el, fmt, percentile, setChildren } from './dom.js';
import { GridView, drawMap, drawRgb, gridShape, lut32 } from './grid.js';
import { installKeys, renderHelp } from './keys.js';
import { Connection } from './net.js';
import { Sources } from './sources.js';
import { AtlasPane } from './atlas.js';

const BACKPROP_MODES = ['off', 'gradient', 'deconv', 'guided'];
const NORMALIZE = ['layer', 'channel', 'none'];
const GAMMAS = [1, 0.7, 0.5, 0.35, 1.5];
const GAINS = [1, 2, 4, 8, 16];

class App {
  constructor() {
    const params = new URLSearchParams(location.search);
    this.token = params.get('token') || '';
    this.urlLayer = params.get('layer');
    this.urlUnit = params.get('unit');
    this.info = null;
    this.sessionId = null;
    this.settings = null;
    this.colormap = 'gray';
    this.showAllLayers = false;
    this.pattern = false;
    this.lastBackprop = 'gradient';
    this.lastHeader = null;
    this.geometry = new Map();
    this.resultTimes = [];
    this.latencies = [];
    // what the tests and the benchmark read
    this.stats = (window.deepvis = {
      ready: false, frames: 0, liveFrames: 0, backprops: 0, errors: [], fps: 0, p95: NaN,
      latencies: this.latencies, last: null, predictions: [], sessionDropped: 0, skipped: 0,
      videoEnded: false, inputs: 0, latencyCount: 0, cameraFrames: 0,
    });

    this.conn = new Connection(this.token, { onMessage: (m) => this.onMessage(m), onState: (s, r) => this.onConnState(s, r) });
    this.grid = new GridView($('grid'), $('grid-cursor'));
    this.offGrid = new GridView(document.createElement('canvas'), null);
    this.sources = new Sources(this, $('video'), $('input-canvas'));
    this.atlas = new AtlasPane(this, $('atlas-pane'));
    this.bindControls();
    installKeys(this.actions());
    renderHelp($('help-table'));
    if (!this.token) {
      this.showError('this page needs the URL that deepvis serve printed (it ends with ?token=...)', true);
      return;
    }
    this.conn.connect();
  }

  session() {
    return this.sessionId;
  }

  // -- messages --------------------------------------------------------------------------------------
  onConnState(state, reason) {
    const status = $('status');
    if (state === 'open') status.textContent = 'connected';
    else if (state === 'refused') {
      status.textContent = `refused${reason ? `: ${reason}` : ''} — retrying`;
      this.showError('the server refused the connection: it serves too many pages, or it was restarted (then open the new URL it printed)');
    }
    else status.textContent = 'disconnected — reconnecting';
  }

  onMessage(m) {
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
        this.geometry.set(m.layer, m);
        if (this.lastHeader && this.lastHeader.layer === m.layer) this.showRf(this.lastHeader);
        break;
      case 'error':
        if (m.scope === 'frame') this.sources.onFailed(m.seq);
        this.showError(m.message);
        break;
      case 'synthesis': this.atlas.onSynthesis(m); break;
      default: break;
    }
  }

  onHello(m) {
    const first = this.info === null;
    this.info = m;
    this.sessionId = m.session;
    this.sources.setSize(m.model.input_size, m.model.crop_pct);
    $('model-name').textContent = `${m.model.name} · ${m.model.input_size.join('×')}`;
    this.luts = Object.fromEntries(Object.entries(m.colormaps).map(([k, v]) => [k, lut32(v)]));
    setChildren($('colormap'), ...Object.keys(m.colormaps).map((n) => el('option', { value: n }, n)));
    $('colormap').value = this.colormap;
    setChildren($('sample-select'), el('option', { value: '' }, 'sample photo…'), ...m.samples.map((n) => el('option', { value: n }, n)));
    const filters = m.backprop.filters;
    setChildren($('backprop-filter'), ...filters.map((f) => el('option', { value: f }, f)));
    $('backprop-mode').disabled = !m.backprop.available;
    $('backprop-note').textContent = m.backprop.available ? '' : 'backprop views are not available on this server';
    this.atlas.configure(m.atlas, m.synthesis);
    this.settings = { ...m.default_settings };
    this.fillLayers();
    // the URL's layer and unit win on the first connection; after a reconnect, keep what was shown
    const want = {};
    if (first && this.urlLayer) want.layer = this.urlLayer;
    if (first && this.urlUnit !== null && /^\d+$/.test(this.urlUnit)) want.unit = Number(this.urlUnit);
    if (!first && this.prevSettings) Object.assign(want, this.prevSettings);
    this.sendSettings(want);
    this.stats.ready = true;
    $('status').textContent = 'connected — choose an input';
    if (!first && this.sources.mode === 'sample') this.sources.sample(this.sources.name);
  }

  onFrame(h, blobs) {
    const t = performance.now();
    const lut = this.luts[this.colormap];
    this.lastHeader = h;
    this.lastBlobs = blobs;
    this.redrawGrid();
    if (blobs.unit) {
      drawMap($('unit-map'), h.unit_shape[0], h.unit_shape[1], blobs.unit, lut);
      $('unit-map').hidden = false;
      this.drawPin(h);
    } else $('unit-map').hidden = true;
    this.showUnitStats(h);
    this.showPredictions(h.predictions || []);
    this.showRf(h);
    const live = h.source === 'camera' || h.source === 'video';
    const latency = live ? this.sources.onResult(h.seq) : null;
    // figures
    this.resultTimes.push(t);
    while (this.resultTimes.length && t - this.resultTimes[0] > 2000) this.resultTimes.shift();
    if (latency !== null) {
      this.latencies.push(latency);
      this.stats.latencyCount++;
      if (this.latencies.length > 300) this.latencies.shift();
    }
    const fps = this.resultTimes.length > 1 ? ((this.resultTimes.length - 1) * 1000) / (t - this.resultTimes[0]) : 0;
    Object.assign(this.stats, {
      frames: this.stats.frames + 1, liveFrames: this.stats.liveFrames + (live ? 1 : 0), fps,
      p95: percentile(this.latencies, 95), last: h, predictions: h.predictions || [],
      sessionDropped: h.stats.dropped, skipped: this.sources.skipped, cameraFrames: this.sources.videoFrames,
    });
    this.showStatus(h, fps);
  }

  /** Draw the last frame's tiles (activations, or synthesized images in pattern mode). */
  redrawGrid() {
    const h = this.lastHeader;
    if (!h) return;
    let drawn = 0;
    if (this.pattern) {
      // units without a synthesized image show their activations, drawn off screen first
      this.offGrid.draw(h.grid.shape, this.lastBlobs.grid, this.luts[this.colormap]);
      drawn = this.atlas.drawPattern(this.grid, h, this.offGrid);
    }
    if (!drawn) this.grid.draw(h.grid.shape, this.lastBlobs.grid, this.luts[this.colormap]);
    this.stats.patternTiles = drawn || 0;
    const unit = this.settings?.layer === h.layer ? this.settings.unit : h.unit;
    const key = `${unit}/${this.grid.layout.width}x${this.grid.layout.height}/${this.grid.canvas.style.width}`;
    if (key !== this.highlightKey) {
      this.highlightKey = key;
      this.grid.highlight(unit);
    }
  }

  onBackprop(h, blobs) {
    if (blobs.rgb) drawRgb($('backprop'), h.h, h.w, blobs.rgb);
    $('backprop-note').textContent = `${h.mode} · ${h.filter} · ${h.layer}:${h.unit} · ${fmt(h.ms, 0)} ms`;
    this.stats.backprops++;
    this.stats.lastBackprop = h;
  }

  async onInput(h, blobs) {
    await this.sources.drawStill(blobs.jpeg);
    const where = h.index !== undefined ? ` · frame ${h.index + 1}/${this.sources.server?.frames ?? '?'}` : '';
    $('input-label').textContent = `${h.source}: ${h.name ?? ''}${where}`;
    this.stats.inputs++;
  }

  // -- settings ----------------------------------------------------------------------------------------
  /** Send a settings change; it is applied here at once and confirmed (or corrected) by the server. */
  sendSettings(partial) {
    if (!this.settings) return;
    this.req = (this.req || 0) + 1;
    this.settings = { ...this.settings, ...partial };
    this.conn.send({ type: 'settings', req: this.req, ...partial });
  }

  /** The server's settings; an answer to an older request than the last one sent is ignored. */
  applySettings(s, req) {
    if (req !== undefined && req !== null && req < this.req) return;
    this.settings = s;
    this.prevSettings = { layer: s.layer, unit: s.unit, normalize: s.normalize, gain: s.gain, gamma: s.gamma, diff: s.diff, backprop: s.backprop, filter: s.filter };
    if (s.backprop !== 'off') this.lastBackprop = s.backprop;
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
    $('backprop-wrap').hidden = s.backprop === 'off';
    if (document.activeElement !== $('unit-input')) $('unit-input').value = s.unit;
    const info = this.layerInfo();
    $('unit-input').max = info ? info.shape[0] - 1 : 0;
    const label = this.unitLabel(s.unit);
    setChildren($('unit-title'), `${s.layer} : ${s.unit}`, label ? el('span', { className: 'class-label' }, ` — ${label}`) : null);
    this.grid.highlight(s.unit);
    const url = new URL(location.href);
    url.searchParams.set('layer', s.layer);
    url.searchParams.set('unit', String(s.unit));
    history.replaceState(null, '', url);
    this.atlas.show(s.layer, s.unit);
  }

  layerInfo(name = this.settings?.layer) {
    return this.info?.layers.find((l) => l.name === name);
  }

  unitLabel(unit) {
    const info = this.layerInfo();
    if (!info || !info.classes || !this.info.class_names) return '';
    return this.info.class_names[unit] ?? '';
  }

  /** Layers offered in the list: every module with "all modules", else all but identities. */
  layerList() {
    const all = this.info?.layers ?? [];
    if (this.showAllLayers) return all;
    return all.filter((l) => l.type !== 'Identity' || l.name === this.settings?.layer);
  }

  fillLayers() {
    const sel = $('layer-select');
    setChildren(sel, ...this.layerList().map((l) => el('option', { value: l.name }, `${l.name}  (${l.type}, ${l.shape.join('×')})`)));
    if (this.settings) sel.value = this.settings.layer;
  }

  moveLayer(delta) {
    const list = this.layerList();
    const i = list.findIndex((l) => l.name === this.settings.layer);
    const j = Math.max(0, Math.min(list.length - 1, i + delta));
    if (j !== i) this.sendSettings({ layer: list[j].name, unit: Math.min(this.settings.unit, list[j].shape[0] - 1), position: null });
  }

  setUnit(u) {
    const info = this.layerInfo();
    if (!info) return;
    const n = info.shape[0];
    const unit = Math.max(0, Math.min(n - 1, u));
    if (unit !== this.settings.unit) this.sendSettings({ unit, position: null });
  }

  moveUnit(dx, dy) {
    const info = this.layerInfo();
    if (!info) return;
    const [, cols] = gridShape(info.shape[0]);
    this.setUnit(this.settings.unit + dx + dy * cols);
  }

  // -- panes -----------------------------------------------------------------------------------------
  showPredictions(preds) {
    const key = preds.map((p) => `${p.index}:${(p.probability * 100).toFixed(1)}`).join(' ');
    if (key === this.predKey) return;
    this.predKey = key;
    const items = preds.map((p) =>
      el('li', {}, el('span', { className: 'bar', style: { width: `${Math.max(1, p.probability * 100)}%` } }),
        el('span', { className: 'prob' }, `${(p.probability * 100).toFixed(1)}%`), el('span', { className: 'label' }, p.label)),
    );
    setChildren($('predictions'), ...items);
  }

  showUnitStats(h) {
    const now = performance.now();
    if (now - (this.unitStatsAt || 0) < 100 && h.unit === this.unitStatsUnit) return;
    this.unitStatsAt = now;
    this.unitStatsUnit = h.unit;
    const s = h.unit_stats || {};
    const parts = [`max ${fmt(s.max)}`, `mean ${fmt(s.mean)}`];
    if (s.argmax) parts.push(`strongest at ${s.argmax.join(',')}`);
    if (s.value !== undefined) parts.push(`at pin ${fmt(s.value)}`);
    if (h.unit_label) parts.push(h.unit_label);
    $('unit-stats').textContent = parts.join(' · ');
  }

  drawPin(h) {
    const pin = $('unit-pin');
    const pos = this.settings?.position;
    if (!pos || !h.unit_shape) {
      pin.hidden = true;
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
    pin.hidden = false;
  }

  /** Box the receptive field of the pinned position (or of the unit's strongest one) on the input. */
  showRf(h) {
    const box = $('rf-box');
    const g = this.geometry.get(h.layer);
    const pos = (this.settings?.layer === h.layer && this.settings.position) || h.unit_stats?.argmax;
    if (!g || !pos || !g.output_size) {
      box.hidden = true;
      return;
    }
    const [y, x] = pos;
    const rf = [g.rows.lo[y], g.cols.lo[x], g.rows.hi[y] + 1, g.cols.hi[x] + 1];
    if (rf.some((v) => v === undefined)) {
      box.hidden = true;
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
    box.hidden = false;
    this.stats.rf = rf;
  }

  showStatus(h, fps) {
    const now = performance.now();
    if (now - (this.statusAt || 0) < 250) return;
    this.statusAt = now;
    const st = h.stats;
    const parts = [`${fmt(fps, 1)} frames/s`];
    if (this.latencies.length) parts.push(`p95 ${fmt(this.stats.p95, 0)} ms`);
    parts.push(`server ${fmt(h.ms, 0)} ms`, `dropped ${st.dropped}`, `skipped ${this.sources.skipped}`);
    if (st.errors) parts.push(`errors ${st.errors}`);
    $('status').textContent = parts.join(' · ');
  }

  showError(message, sticky = false) {
    const box = $('message');
    $('message-text').textContent = message;
    box.hidden = false;
    this.stats.errors.push(message);
    clearTimeout(this.errorTimer);
    if (!sticky) this.errorTimer = setTimeout(() => (box.hidden = true), 8000);
  }

  onSourceChange(mode, name) {
    $('video-controls').hidden = mode !== 'video';
    $('freeze').setAttribute('aria-pressed', 'false');
    $('input-label').textContent = name ? `${mode}: ${name}` : mode;
    this.stats.videoEnded = false;
    if (mode === 'camera' || mode === 'video') this.sendSettings({ position: this.settings?.position ?? null });
  }

  onVideoState() {
    const v = this.sources.videoState;
    $('video-play').textContent = v.paused || v.ended ? 'Play' : 'Pause';
    if (v.ended) this.stats.videoEnded = true;
  }

  // -- controls ----------------------------------------------------------------------------------------
  bindControls() {
    $('src-camera').addEventListener('click', () => this.sources.startCamera());
    $('video-file').addEventListener('change', (e) => e.target.files[0] && this.sources.openVideo(e.target.files[0]));
    $('image-file').addEventListener('change', (e) => e.target.files[0] && this.sources.uploadImage(e.target.files[0]));
    $('sample-select').addEventListener('change', (e) => e.target.value && this.sources.sample(e.target.value));
    $('freeze').addEventListener('click', () => this.actions().toggleFreeze());
    $('video-play').addEventListener('click', () => this.sources.togglePlay());
    $('video-step').addEventListener('click', () => this.sources.step());
    $('layer-select').addEventListener('change', (e) => this.sendSettings({ layer: e.target.value, position: null }));
    $('layer-prev').addEventListener('click', () => this.moveLayer(-1));
    $('layer-next').addEventListener('click', () => this.moveLayer(1));
    $('all-layers').addEventListener('change', (e) => {
      this.showAllLayers = e.target.checked;
      this.fillLayers();
    });
    $('normalize').addEventListener('change', (e) => this.sendSettings({ normalize: e.target.value }));
    $('colormap').addEventListener('change', (e) => {
      this.colormap = e.target.value;
      this.redrawGrid();
    });
    $('gain').addEventListener('input', (e) => this.sendSettings({ gain: Math.round(2 ** Number(e.target.value) * 100) / 100 }));
    $('gamma').addEventListener('input', (e) => this.sendSettings({ gamma: Number(e.target.value) }));
    $('diff').addEventListener('change', (e) => this.setDiff(e.target.checked));
    $('pattern').addEventListener('change', (e) => this.setPattern(e.target.checked));
    $('backprop-mode').addEventListener('change', (e) => this.sendSettings({ backprop: e.target.value }));
    $('backprop-filter').addEventListener('change', (e) => this.sendSettings({ filter: e.target.value }));
    $('unit-input').addEventListener('change', (e) => this.setUnit(Number(e.target.value) | 0));
    $('unit-input').addEventListener('keydown', (e) => {
      if (e.key === 'Enter') this.setUnit(Number(e.target.value) | 0);
    });
    $('unit-prev').addEventListener('click', () => this.moveUnit(-1, 0));
    $('unit-next').addEventListener('click', () => this.moveUnit(1, 0));
    $('grid').addEventListener('click', (e) => {
      const u = this.grid.hit(e);
      if (u >= 0) this.setUnit(u);
      $('grid').focus();
    });
    $('unit-map').addEventListener('click', (e) => {
      const h = this.lastHeader;
      if (!h || !h.unit_shape) return;
      const box = e.target.getBoundingClientRect();
      const y = Math.floor(((e.clientY - box.top) / box.height) * h.unit_shape[0]);
      const x = Math.floor(((e.clientX - box.left) / box.width) * h.unit_shape[1]);
      const pos = this.settings.position;
      this.sendSettings({ position: pos && pos[0] === y && pos[1] === x ? null : [y, x] });
    });
    $('help-btn').addEventListener('click', () => this.actions().toggleHelp());
    $('help-close').addEventListener('click', () => ($('help').hidden = true));
    $('message-close').addEventListener('click', () => ($('message').hidden = true));
    window.addEventListener('resize', () => {
      this.grid.fit();
      this.highlightKey = null;
      this.rfKey = null;
      this.pinKey = null;
      this.redrawGrid();
    });
  }

  setDiff(on) {
    if (on && this.colormap === 'gray') this.colormap = 'coolwarm';
    else if (!on && this.colormap === 'coolwarm') this.colormap = 'gray';
    $('colormap').value = this.colormap;
    this.sendSettings({ diff: on });
  }

  setPattern(on) {
    if (on && !this.atlas.hasPatterns()) {
      this.showError('pattern mode needs synthesized images: start deepvis serve with --atlas ATLAS (or synthesize units)');
    }
    this.pattern = on;
    $('pattern').checked = on;
    this.redrawGrid();
  }

  actions() {
    const s = () => this.settings;
    const cycle = (list, v) => list[(list.indexOf(v) + 1) % list.length];
    return {
      left: () => this.moveUnit(-1, 0), right: () => this.moveUnit(1, 0), up: () => this.moveUnit(0, -1), down: () => this.moveUnit(0, 1),
      leftFast: () => this.moveUnit(-3, 0), rightFast: () => this.moveUnit(3, 0), upFast: () => this.moveUnit(0, -3), downFast: () => this.moveUnit(0, 3),
      prevLayer: () => this.moveLayer(-1), nextLayer: () => this.moveLayer(1),
      cycleBackprop: () => this.info?.backprop.available && this.sendSettings({ backprop: cycle(BACKPROP_MODES, s().backprop) }),
      cycleBackpropMethod: () => this.info?.backprop.available && this.sendSettings({ backprop: cycle(BACKPROP_MODES.slice(1), s().backprop === 'off' ? 'guided' : s().backprop) }),
      toggleBackprop: () => this.info?.backprop.available && this.sendSettings({ backprop: s().backprop === 'off' ? this.lastBackprop : 'off' }),
      cycleFilter: () => this.sendSettings({ filter: cycle(this.info.backprop.filters, s().filter) }),
      togglePattern: () => this.setPattern(!this.pattern),
      toggleDiff: () => this.setDiff(!s().diff),
      cycleNormalize: () => this.sendSettings({ normalize: cycle(NORMALIZE, s().normalize) }),
      cycleGamma: () => this.sendSettings({ gamma: cycle(GAMMAS, s().gamma) }),
      cycleGain: () => this.sendSettings({ gain: cycle(GAINS, s().gain) }),
      toggleFreeze: () => {
        const f = this.sources.toggleFreeze();
        $('freeze').setAttribute('aria-pressed', String(f));
        $('freeze').textContent = f ? 'Unfreeze' : 'Freeze';
      },
      camera: () => this.sources.startCamera(),
      nextSample: () => this.stepSample(1), prevSample: () => this.stepSample(-1),
      playPause: () => this.sources.togglePlay(), stepVideo: () => this.sources.step(),
      toggleHelp: () => ($('help').hidden = !$('help').hidden),
      escape: () => {
        if (!$('help').hidden) $('help').hidden = true;
        else this.sendSettings({ gain: 1, gamma: 1, backprop: 'off', diff: false, position: null });
      },
    };
  }

  stepSample(d) {
    const names = this.info?.samples ?? [];
    if (!names.length) return;
    const i = this.sources.mode === 'sample' ? names.indexOf(this.sources.name) : -1;
    const name = names[(i + d + names.length) % names.length];
    $('sample-select').value = name;
    this.sources.sample(name);
  }
}

window.addEventListener('DOMContentLoaded', () => {
  window.deepvisApp = new App();
});
