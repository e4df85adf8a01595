// "What the unit likes": the atlas's synthesized image (cut to the unit's receptive field, or the
// whole canvas), top-9 dataset crops and their deconv views, on-demand synthesis with visible
// progress, the dataset miner's progress (deepvis serve --dataset: the pane fills in as results
// come), and the pattern-mode tiles.

import { $, el, fmt, setChildren } from './dom.js';

const PATTERN_TILE_MAX = 64;
const PATTERN_WIDTH = 720;
const MAX_LOADS = 6;

export class AtlasPane {
  constructor(app, root) {
    this.app = app;
    this.root = root;
    this.atlas = { available: false };
    this.synthesis = { available: false };
    this.current = null; // {layer, unit}
    this.request = 0;
    this.jobs = new Map(); // "layer:unit" -> last synthesis message
    this.patterns = new Map(); // "layer:unit" -> HTMLImageElement (loaded) | 'loading' | 'none'
    this.layerUnits = new Map(); // layer -> Set of units with a synthesized image
    this.loading = 0;
    this.queue = [];
    this.mining = { available: false };
    this.shown = null; // {layer, unit, complete}: the record on screen (complete: every top input has its crop)
    this.statusBox = $('mining-status');
    this.whole = $('synth-whole');
    this.whole.addEventListener('change', () => {
      this.patterns.clear();
      this.refresh();
      this.redrawSoon();
    });
  }

  configure(atlas, synthesis, mining) {
    this.atlas = atlas || { available: false };
    this.synthesis = synthesis || { available: false };
    this.mining = mining || { available: false };
    this.statusBox.hidden = !this.mining.available;
    if (this.mining.available) this.showMining();
  }

  /** crop=1: synthesized images cut to the unit's receptive field; 0 (the toggle): the whole canvas. */
  crop() {
    return this.whole.checked ? 0 : 1;
  }

  /** Fetch and draw the current unit again. */
  refresh() {
    if (this.current) this.show(this.current.layer, this.current.unit, true);
  }

  url(path, params) {
    return `${path}?${new URLSearchParams({ token: this.app.token, ...params })}`;
  }

  hasPatterns() {
    return this.atlas.available || this.synthesis.available;
  }

  /** Show what the atlas knows about a unit (called on every selection change). */
  async show(layer, unit, force = false) {
    if (!force && this.current && this.current.layer === layer && this.current.unit === unit) return;
    const moved = !this.current || this.current.layer !== layer || this.current.unit !== unit;
    this.current = { layer, unit };
    if (this.mining.available) this.showMining();
    const req = ++this.request;
    if (!this.atlas.available && !this.synthesis.available) {
      setChildren(this.root, el('p', { className: 'note' }, 'No atlas loaded: start deepvis serve with --atlas ATLAS to see each unit\'s top images and synthesized image.'));
      return;
    }
    if (moved) setChildren(this.root, el('p', { className: 'note' }, 'loading…'));
    let rec;
    try {
      const res = await fetch(this.url('/api/atlas/unit', { layer, unit }));
      rec = await res.json();
      if (!res.ok) throw new Error(rec.error || `HTTP ${res.status}`);
    } catch (e) {
      if (req === this.request) setChildren(this.root, el('p', { className: 'note' }, `atlas: ${e.message}`));
      return;
    }
    if (req !== this.request) return;
    this.render(rec);
  }

  render(rec) {
    const { layer, unit } = rec;
    const parts = [];
    const job = this.jobs.get(`${layer}:${unit}`);
    const synthBox = el('div', { className: 'synth' });
    if (rec.synth) {
      synthBox.append(
        el('figure', {}, el('img', { src: this.url('/api/atlas/image', { layer, unit, kind: 'synth', v: rec.synth.version ?? 0, crop: this.crop() }), alt: `synthesized image of ${layer}:${unit}`, className: 'synth-img' }),
          el('figcaption', {}, `synthesized${rec.synth.source === 'live' ? ' (this session)' : ''}${rec.synth.value !== null && rec.synth.value !== undefined ? ` · value ${fmt(rec.synth.value)}` : ''}`)),
      );
    } else if (this.synthesis.available) {
      const btn = el('button', { id: 'synth-btn', type: 'button' }, 'Synthesize this unit');
      btn.addEventListener('click', () => this.synthesize(layer, unit));
      synthBox.append(el('p', { className: 'note' }, rec.in_atlas ? 'no synthesized image in the atlas' : 'this unit is not in the atlas'), btn);
    } else {
      synthBox.append(el('p', { className: 'note' }, rec.in_atlas ? 'no synthesized image in the atlas' : 'this unit is not in the atlas'));
    }
    const progress = el('div', { className: 'synth-progress', id: 'synth-progress', hidden: !job || job.state === 'done' });
    synthBox.append(progress);
    parts.push(el('h4', {}, 'Synthesized'), synthBox);
    if (job && job.state !== 'done') this.showProgress(progress, job);

    if (rec.top && rec.top.length) {
      const crops = rec.top.map((t) =>
        el('figure', { className: 'top' },
          t.crop ? el('img', { src: this.url('/api/atlas/image', { layer, unit, kind: 'crop', rank: t.rank }), alt: `top ${t.rank + 1}` }) : el('div', { className: 'missing' }, '–'),
          t.view ? el('img', { src: this.url('/api/atlas/image', { layer, unit, kind: 'view', rank: t.rank }), alt: `deconv of top ${t.rank + 1}` }) : null,
          el('figcaption', {}, `${fmt(t.value)}${t.label ? ` · ${t.label}` : ''}`)),
      );
      parts.push(el('h4', {}, `Top ${rec.top.length} dataset inputs (crop, deconv)`), el('div', { className: 'tops' }, ...crops));
    } else if (this.mining.available) {
      parts.push(el('p', { className: 'note', id: 'tops-pending' }, `top inputs: mining ${this.mining.dataset} for ${layer}…`));
    } else if (rec.in_atlas === false && this.atlas.available) {
      parts.push(el('p', { className: 'note' }, 'no dataset images for this unit in the atlas'));
    }
    if (rec.stats) {
      parts.push(el('p', { className: 'note' }, `dataset: mean ${fmt(rec.stats.mean)} · max ${fmt(rec.stats.max)} · active on ${fmt(100 * (rec.stats.frac_active ?? 0), 0)}% of images`));
    }
    setChildren(this.root, ...parts);
    const top = rec.top || [];
    this.shown = { layer, unit, complete: top.length > 0 && top.every((t) => t.crop) };
    this.app.figures.atlasShown = { layer, unit, tops: top.length, crops: top.filter((t) => t.crop).length, views: top.filter((t) => t.view).length };
  }

  /** The dataset miner's status (every page gets it, newest wins): progress of the current layer, and
   * the inputs it could not read. The pane fills in: an incomplete record is fetched again as views come. */
  onMining(m) {
    this.mining = m;
    this.app.figures.mining = m;
    this.showMining();
    const cur = this.current;
    const p = cur ? m.layers[cur.layer] : null;
    const s = this.shown;
    if (p && s && s.layer === cur.layer && s.unit === cur.unit && !s.complete && (p.phase === 'views' || p.phase === 'done')) this.refresh();
  }

  showMining() {
    const m = this.mining;
    const layer = this.current ? this.current.layer : null;
    const p = layer && m.layers ? m.layers[layer] : null;
    const parts = [];
    if (!p) parts.push(`dataset ${m.dataset}: ${m.samples} inputs, mined for the layer you select`);
    else if (p.phase === 'mining') parts.push(`mining ${m.dataset} for ${layer}: `, el('progress', { max: Math.max(1, p.total), value: p.done }), ` ${p.done}/${p.total} inputs`);
    else if (p.phase === 'views') parts.push(`crops and ${m.view_mode} views of ${layer}: `, el('progress', { max: Math.max(1, p.total), value: p.done }), ` ${p.done}/${p.total} units`);
    else if (p.phase === 'queued') parts.push(`${layer}: waiting to be mined`);
    else if (p.phase === 'done') parts.push(`${m.dataset} (${m.samples} inputs) mined for ${layer}`);
    else parts.push(`mining ${layer} failed: ${p.message}`);
    if (m.skipped_count) {
      const listed = m.skipped.map((k) => `${k.name} (${k.reason})`).join('; ');
      const more = m.skipped_count > m.skipped.length ? ` and ${m.skipped_count - m.skipped.length} more` : '';
      parts.push(el('span', { className: 'skipped', id: 'mining-skipped' }, `${m.skipped_count} unreadable input${m.skipped_count === 1 ? '' : 's'} skipped: ${listed}${more}`));
    }
    setChildren(this.statusBox, ...parts);
    this.statusBox.hidden = false;
  }

  synthesize(layer, unit) {
    this.app.conn.send({ type: 'synthesize', layer, unit });
    this.jobs.set(`${layer}:${unit}`, { state: 'queued', progress: 0, layer, unit });
    const p = document.getElementById('synth-progress');
    if (p) {
      p.hidden = false;
      this.showProgress(p, { state: 'queued', progress: 0 });
    }
  }

  showProgress(box, m) {
    const pct = Math.round(100 * (m.progress || 0));
    setChildren(box, el('progress', { max: 100, value: pct }), el('span', {}, ` ${m.state}${m.state === 'running' ? ` ${pct}%` : ''}${m.message ? ` — ${m.message}` : ''}`));
  }

  /** A synthesis job reports: queued / running (progress) / done / error. */
  onSynthesis(m) {
    const key = `${m.layer}:${m.unit}`;
    this.jobs.set(key, m);
    this.app.figures.synthesis = m;
    const cur = this.current;
    const here = cur && cur.layer === m.layer && cur.unit === m.unit;
    if (m.state === 'done') {
      this.patterns.delete(key);
      this.layerUnits.get(m.layer)?.add(m.unit);
      if (here) {
        this.current = null;
        this.show(m.layer, m.unit);
      }
      return;
    }
    if (m.state === 'error') this.app.showError(`synthesis of ${key} failed: ${m.message}`);
    const p = document.getElementById('synth-progress');
    if (here && p) {
      p.hidden = false;
      this.showProgress(p, m);
    }
  }

  // -- pattern mode ------------------------------------------------------------------------------------
  /** Learn which units of a layer have synthesized images (once per layer). */
  async preload(layer) {
    if (this.layerUnits.has(layer) || !this.hasPatterns()) return;
    this.layerUnits.set(layer, new Set());
    try {
      const res = await fetch(this.url('/api/atlas/layer', { layer }));
      const body = await res.json();
      if (res.ok) this.layerUnits.set(layer, new Set(body.synth || []));
    } catch (e) {
      this.app.showError(`atlas: ${e.message}`);
    }
    this.redrawSoon();
  }

  /** Redraw the grid once per animation frame at most (as pattern images arrive). */
  redrawSoon() {
    if (this.redrawPending) return;
    this.redrawPending = true;
    requestAnimationFrame(() => {
      this.redrawPending = false;
      if (this.app.pattern) this.app.redrawGrid();
    });
  }

  /** Draw the layer's synthesized images as the grid's tiles (the activation tiles of ``activations``,
   * an off-screen GridView of the same frame, where a unit has none); returns how many images were
   * drawn (0: none to show, the caller draws activations). */
  drawPattern(grid, header, activations) {
    const layer = header.layer;
    const units = this.layerUnits.get(layer);
    if (units === undefined) {
      this.preload(layer);
      return 0;
    }
    if (!units.size) return 0;
    const n = header.grid.shape[0];
    const cols = Math.ceil(Math.sqrt(n));
    const tile = Math.max(16, Math.min(PATTERN_TILE_MAX, Math.floor(PATTERN_WIDTH / cols) - 1));
    grid.setLayout([n, tile, tile]);
    grid.ctx.fillStyle = 'rgb(40,40,40)';
    grid.ctx.fillRect(0, 0, grid.canvas.width, grid.canvas.height);
    let drawn = 0;
    grid.ctx.imageSmoothingEnabled = true;
    for (let c = 0; c < n; c++) {
      const img = units.has(c) ? this.pattern(layer, c) : null;
      if (img) {
        grid.drawTileImage(c, img);
        drawn++;
      } else if (activations) {
        const src = activations.tileRect(c);
        const dst = grid.tileRect(c);
        if (src && dst) {
          grid.ctx.imageSmoothingEnabled = false;
          grid.ctx.drawImage(activations.canvas, src.x, src.y, src.w, src.h, dst.x, dst.y, dst.w, dst.h);
          grid.ctx.imageSmoothingEnabled = true;
        }
      }
    }
    return Math.max(drawn, 1); // the pattern layout is shown even while images load
  }

  pattern(layer, unit) {
    const key = `${layer}:${unit}`;
    const have = this.patterns.get(key);
    if (have instanceof HTMLImageElement) return have;
    if (have === undefined) {
      this.patterns.set(key, 'loading');
      this.queue.push([key, this.url('/api/atlas/image', { layer, unit, kind: 'synth', crop: this.crop() })]);
      this.pump();
    }
    return null;
  }

  pump() {
    while (this.loading < MAX_LOADS && this.queue.length) {
      const [key, src] = this.queue.shift();
      const img = new Image();
      this.loading++;
      img.onload = () => {
        this.loading--;
        this.patterns.set(key, img);
        this.pump();
        this.redrawSoon();
      };
      img.onerror = () => {
        this.loading--;
        this.patterns.set(key, 'none');
        this.pump();
      };
      img.src = src;
    }
  }
}
