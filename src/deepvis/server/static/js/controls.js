// Controls: the lists built from the server's hello (normalizations, backprop modes and filters,
// colormaps, sample photos), the mouse and keyboard bindings, and what each of them does.

import { $, el, setChildren } from './dom.js';
import { gridShape, stripHit } from './grid.js';
import { installKeys, renderHelp } from './keys.js';
import { FROZEN_STATUS } from './panes.js';
import { OFF, isLive } from './state.js';

// the boost presets that t / T cycle through (the sliders reach any value in between)
const GAMMAS = [1, 0.7, 0.5, 0.35, 1.5];
const GAINS = [1, 2, 4, 8, 16];

const cycle = (list, v) => list[(list.indexOf(v) + 1) % list.length];
const options = (names) => names.map((n) => el('option', { value: n }, n));

export class Controls {
  /** app: {state, figures, panes, sources, atlas, sendSettings(partial)} (see main.js). */
  constructor(app) {
    this.app = app;
    this.state = app.state;
    this.bind();
    installKeys(this.actions(), (key, at) => app.figures.keyPressed(key, at));
    renderHelp($('help-table'), null);
  }

  /** Fill the lists from hello: the page has no list of its own of what the server offers. */
  build(info) {
    const st = this.state;
    setChildren($('colormap'), ...options(Object.keys(info.colormaps)));
    $('colormap').value = st.colormap;
    setChildren($('sample-select'), el('option', { value: '' }, 'sample photo…'), ...options(info.samples));
    setChildren($('normalize'), ...options(info.normalizations));
    setChildren($('backprop-mode'), ...options(info.backprop.modes));
    setChildren($('backprop-filter'), ...options(info.backprop.filters));
    $('backprop-mode').disabled = !info.backprop.available;
    $('backprop-note').textContent = info.backprop.available ? '' : 'the backprop view is off on this server (deepvis serve --no-backprop)';
    renderHelp($('help-table'), info);
  }

  // -- mouse -------------------------------------------------------------------------------------------
  bind() {
    const app = this.app;
    const sources = () => app.sources;
    $('src-camera').addEventListener('click', () => sources().startCamera());
    $('video-file').addEventListener('change', (e) => e.target.files[0] && sources().openVideo(e.target.files[0]));
    $('image-file').addEventListener('change', (e) => e.target.files[0] && sources().uploadImage(e.target.files[0]));
    $('sample-select').addEventListener('change', (e) => e.target.value && sources().sample(e.target.value));
    $('freeze').addEventListener('click', () => this.toggleFreeze());
    $('video-play').addEventListener('click', () => sources().togglePlay());
    $('video-step').addEventListener('click', () => sources().step());
    $('layer-select').addEventListener('change', (e) => app.sendSettings({ layer: e.target.value, position: null }));
    $('layer-prev').addEventListener('click', () => this.moveLayer(-1));
    $('layer-next').addEventListener('click', () => this.moveLayer(1));
    $('all-layers').addEventListener('change', (e) => {
      this.state.showAllLayers = e.target.checked;
      app.panes.fillLayers();
    });
    $('normalize').addEventListener('change', (e) => app.sendSettings({ normalize: e.target.value }));
    $('colormap').addEventListener('change', (e) => {
      this.state.colormap = e.target.value;
      app.panes.redrawGrid();
    });
    $('gain').addEventListener('input', (e) => app.sendSettings({ gain: Math.round(2 ** Number(e.target.value) * 100) / 100 }));
    $('gamma').addEventListener('input', (e) => app.sendSettings({ gamma: Number(e.target.value) }));
    $('diff').addEventListener('change', (e) => this.setDiff(e.target.checked));
    $('pattern').addEventListener('change', (e) => this.setPattern(e.target.checked));
    $('backprop-mode').addEventListener('change', (e) => app.sendSettings({ backprop: e.target.value }));
    $('backprop-filter').addEventListener('change', (e) => app.sendSettings({ filter: e.target.value }));
    $('backprop-raw').addEventListener('change', (e) => this.setRawBackprop(e.target.checked));
    $('unit-input').addEventListener('change', (e) => this.typeUnit(e.target));
    $('unit-input').addEventListener('keydown', (e) => {
      if (e.key === 'Enter') this.typeUnit(e.target);
    });
    $('unit-prev').addEventListener('click', () => this.moveUnit(-1, 0));
    $('unit-next').addEventListener('click', () => this.moveUnit(1, 0));
    $('grid').addEventListener('click', (e) => {
      const u = app.panes.grid.hit(e);
      if (u >= 0) this.setUnit(u);
      $('grid').focus();
    });
    $('strip').addEventListener('click', (e) => {
      // a strip cell selects its unit (the channel; the unit view shows the channel's patch map)
      const h = this.state.lastHeader;
      if (!h || !h.prefix) return;
      const hit = stripHit(e.target, h.prefix.shape[0], h.prefix.shape[1], e);
      if (!hit) return;
      // the cell's unit at that prefix token (LAYER:C@cls): the backprop view starts from the token's value
      const token = h.prefix.names[hit.row];
      const info = this.state.layerInfo();
      if (info && info.layout === 'tokens') this.app.sendSettings({ unit: hit.unit, token, position: null });
      else this.setUnit(hit.unit);
    });
    $('query-mode').addEventListener('change', (e) => this.setQuery(e.target.value));
    $('input-canvas').addEventListener('mousemove', (e) => this.queryAt(e));
    $('unit-map').addEventListener('click', (e) => {
      const h = this.state.lastHeader;
      if (!h || !h.unit_shape) return;
      const box = e.target.getBoundingClientRect();
      const y = Math.floor(((e.clientY - box.top) / box.height) * h.unit_shape[0]);
      const x = Math.floor(((e.clientX - box.left) / box.width) * h.unit_shape[1]);
      const pos = this.state.settings.position;
      app.sendSettings({ position: pos && pos[0] === y && pos[1] === x ? null : [y, x], token: null });
    });
    $('help-btn').addEventListener('click', () => this.toggleHelp());
    $('help-close').addEventListener('click', () => ($('help').hidden = true));
    $('message-close').addEventListener('click', () => ($('message').hidden = true));
    window.addEventListener('resize', () => app.panes.resize());
  }

  // -- keys (keys.js names these actions) ------------------------------------------------------------
  actions() {
    const app = this.app;
    const st = this.state;
    const s = () => st.settings;
    const backprop = () => st.info?.backprop.available;
    return {
      left: () => this.moveUnit(-1, 0), right: () => this.moveUnit(1, 0), up: () => this.moveUnit(0, -1), down: () => this.moveUnit(0, 1),
      leftFast: () => this.moveUnit(-3, 0), rightFast: () => this.moveUnit(3, 0), upFast: () => this.moveUnit(0, -3), downFast: () => this.moveUnit(0, 3),
      prevLayer: () => this.moveLayer(-1), nextLayer: () => this.moveLayer(1),
      cycleBackprop: () => backprop() && app.sendSettings({ backprop: cycle(st.backpropModes, s().backprop) }),
      cycleBackpropMethod: () => backprop() && app.sendSettings({ backprop: s().backprop === OFF ? st.backpropMethods[0] : cycle(st.backpropMethods, s().backprop) }),
      toggleBackprop: () => backprop() && app.sendSettings({ backprop: s().backprop === OFF ? (st.lastBackprop ?? st.backpropMethods[0]) : OFF }),
      cycleFilter: () => app.sendSettings({ filter: cycle(st.info.backprop.filters, s().filter) }),
      toggleRawBackprop: () => this.setRawBackprop(!this.isRawBackprop()),
      togglePattern: () => this.setPattern(!st.pattern),
      toggleDiff: () => this.setDiff(!s().diff),
      cycleNormalize: () => app.sendSettings({ normalize: cycle(st.info.normalizations, s().normalize) }),
      cycleGamma: () => app.sendSettings({ gamma: cycle(GAMMAS, s().gamma) }),
      cycleGain: () => app.sendSettings({ gain: cycle(GAINS, s().gain) }),
      toggleFreeze: () => this.toggleFreeze(),
      camera: () => app.sources.startCamera(),
      nextSample: () => this.stepSample(1), prevSample: () => this.stepSample(-1),
      playPause: () => app.sources.togglePlay(), stepVideo: () => app.sources.step(),
      toggleHelp: () => this.toggleHelp(),
      resetSummary: () => app.summary.reset(),
      escape: () => {
        if (!$('help').hidden) $('help').hidden = true;
        else app.sendSettings({ gain: 1, gamma: 1, backprop: OFF, diff: false, position: null });
      },
    };
  }

  // -- what the controls do ----------------------------------------------------------------------------
  /** The next (delta 1) or previous (-1) layer of the list that shows other data: layers that output the
   * very tensor of the current one (``same_as``: an activation after its norm, a block's last module) are
   * passed over, so that each key press changes what is shown. */
  moveLayer(delta) {
    const list = this.state.layerList();
    const i = list.findIndex((l) => l.name === this.state.settings.layer);
    if (i < 0) return;
    const source = (l) => l.same_as || l.name;
    let j = i;
    while (j + delta >= 0 && j + delta < list.length) {
      j += delta;
      if (source(list[j]) !== source(list[i])) break;
    }
    if (source(list[j]) === source(list[i])) j = i; // nothing else that way
    if (j !== i) this.app.sendSettings({ layer: list[j].name, unit: Math.min(this.state.settings.unit, list[j].shape[0] - 1), position: null });
  }

  setUnit(u) {
    const info = this.state.layerInfo();
    if (!info) return;
    const n = info.shape[0];
    const unit = Math.max(0, Math.min(n - 1, u));
    if (unit !== this.state.settings.unit || this.state.settings.token) this.app.sendSettings({ unit, position: null, token: null });
  }

  /** A unit typed in the box: selected when it is one of the layer's; otherwise a message, and the box
   * shows the selected unit again (a typed 99999 or -3 is not silently read as another unit). */
  typeUnit(input) {
    const info = this.state.layerInfo();
    if (!info || !this.state.settings) return;
    const n = info.shape[0];
    const text = input.value.trim();
    const u = Number(text);
    if (text === '' || !Number.isInteger(u) || u < 0 || u >= n) {
      input.value = this.state.settings.unit;
      this.app.showError(`no unit ${text || '(empty)'} in ${info.name}: its units are 0-${n - 1}`);
      return;
    }
    this.setUnit(u);
  }

  moveUnit(dx, dy) {
    const info = this.state.layerInfo();
    if (!info) return;
    const [, cols] = gridShape(info.shape[0]);
    this.setUnit(this.state.settings.unit + dx + dy * cols);
  }

  /** True when the backprop view shows the raw signed view (hello's ``backprop.raw``: filter and scaling). */
  isRawBackprop() {
    const raw = this.state.info?.backprop.raw;
    const s = this.state.settings;
    return !!raw && !!s && s.filter === raw.filter && s.percentile === raw.percentile;
  }

  /** Show the raw signed view (scaled by the maximum), or go back to the readable default view. */
  setRawBackprop(on) {
    const b = this.state.info?.backprop;
    if (!b || !b.filters.includes(b.raw.filter)) return;
    const want = on ? b.raw : b.filters.includes(b.readable.filter) ? b.readable : { filter: b.filters[0], percentile: 100 };
    this.app.sendSettings({ filter: want.filter, percentile: want.percentile });
  }

  /** Attention layers: the query token (a prefix token's name), or 'cursor': the patch under the cursor on the input. */
  setQuery(value) {
    const st = this.state;
    const info = st.layerInfo();
    st.queryCursor = value === 'cursor';
    if (st.queryCursor) {
      const [, gh, gw] = info?.shape ?? [0, 1, 1];
      this.app.sendSettings({ query: [Math.floor(gh / 2), Math.floor(gw / 2)] });
    } else this.app.sendSettings({ query: value });
  }

  /** With the query following the cursor: the patch of an attention layer's grid under the mouse on the input. */
  queryAt(e) {
    const st = this.state;
    const info = st.layerInfo();
    if (!st.queryCursor || !info || info.layout !== 'attention' || !st.settings) return;
    const box = e.target.getBoundingClientRect();
    const [, gh, gw] = info.shape;
    const y = Math.max(0, Math.min(gh - 1, Math.floor(((e.clientY - box.top) / box.height) * gh)));
    const x = Math.max(0, Math.min(gw - 1, Math.floor(((e.clientX - box.left) / box.width) * gw)));
    const q = st.settings.query;
    if (!Array.isArray(q) || q[0] !== y || q[1] !== x) this.app.sendSettings({ query: [y, x] });
  }

  setDiff(on) {
    const st = this.state;
    if (on && st.colormap === 'gray') st.colormap = 'coolwarm';
    else if (!on && st.colormap === 'coolwarm') st.colormap = 'gray';
    $('colormap').value = st.colormap;
    this.app.sendSettings({ diff: on });
  }

  setPattern(on) {
    if (on && !this.app.atlas.hasPatterns()) {
      this.app.showError('pattern mode needs synthesized images: start deepvis serve with --atlas ATLAS');
    }
    this.state.pattern = on;
    $('pattern').checked = on;
    this.app.panes.redrawGrid();
  }

  toggleFreeze() {
    const f = this.app.sources.toggleFreeze();
    $('freeze').setAttribute('aria-pressed', String(f));
    $('freeze').textContent = f ? 'Unfreeze' : 'Freeze';
    if (f) $('status').textContent = FROZEN_STATUS;
  }

  toggleHelp() {
    $('help').hidden = !$('help').hidden;
  }

  stepSample(d) {
    const names = this.state.info?.samples ?? [];
    if (!names.length) return;
    const sources = this.app.sources;
    const i = sources.mode === 'sample' ? names.indexOf(sources.name) : -1;
    const name = names[(i + d + names.length) % names.length];
    $('sample-select').value = name;
    sources.sample(name);
  }

  /** Another input was chosen: show its controls; a live source keeps the pinned position. */
  sourceChanged(mode, name) {
    $('video-controls').hidden = mode !== 'video';
    $('freeze').setAttribute('aria-pressed', 'false');
    $('input-label').textContent = name ? `${mode}: ${name}` : mode;
    this.app.figures.videoEnded = false;
    if (isLive(mode)) this.app.sendSettings({ position: this.state.settings?.position ?? null });
  }
}
