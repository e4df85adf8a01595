// "What the unit likes": the atlas's synthesized image (cut to the unit's receptive field, or the
// whole canvas), top-9 dataset crops (or, with the same toggle, their whole inputs with the field's
// box) and their deconv views, on-demand synthesis with visible progress, feature accentuation of the
// frame shown, the quality figures of every synthesized image, the dataset miner's progress (deepvis
// serve --dataset: the pane fills in as results come), and the pattern-mode tiles.

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
    this.accent = null; // the last accentuation message of the current unit (job 'accentuate')
    this.frameShot = null; // the frame shown when "accentuate" was pressed (data URL of the input canvas)
    this.figuresAsked = new Set(); // "layer:unit": figures of the atlas's image asked for
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
    if (this.mining.available) {
      // the miner's status as the page connected (the next comes with its next progress, which a
      // busy machine may delay: the miner runs at the lowest priority)
      this.app.figures.mining = this.mining;
      this.showMining();
    }
  }

  /** crop=1: synthesized images cut to the unit's receptive field and dataset crops; 0 (the toggle):
   * the whole canvas and the whole dataset inputs (with the field's box) where the server has them. */
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
    if (moved) this.accent = null;
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
        this.figuresLine(rec.synth, 'synth-figures'),
      );
      if (!rec.synth.scores && rec.synth.source !== 'live') this.askFigures(layer, unit);
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
    if (this.synthesis.available) parts.push(el('h4', {}, 'Accentuated (this frame)'), this.accentBox(rec));

    if (rec.top && rec.top.length) {
      const whole = this.crop() === 0;
      const crops = rec.top.map((t) => {
        const kind = whole && t.whole ? 'input' : 'crop';
        return el('figure', { className: 'top' },
          t.crop ? el('img', { src: this.url('/api/atlas/image', { layer, unit, kind, rank: t.rank }), alt: `top ${t.rank + 1}${kind === 'input' ? ' (whole input, receptive field boxed)' : ''}`, className: `top-${kind}` }) : el('div', { className: 'missing' }, '–'),
          t.view ? el('img', { src: this.url('/api/atlas/image', { layer, unit, kind: 'view', rank: t.rank }), alt: `deconv of top ${t.rank + 1}` }) : null,
          el('figcaption', {}, `${fmt(t.value)}${t.label ? ` · ${t.label}` : ''}`));
      });
      const what = whole && rec.top.some((t) => t.whole) ? 'whole input with the receptive field boxed' : 'crop';
      parts.push(el('h4', {}, `Top ${rec.top.length} dataset inputs (${what}, deconv)`), el('div', { className: 'tops' }, ...crops));
      if (whole && rec.whole_note) parts.push(el('p', { className: 'note', id: 'whole-note' }, rec.whole_note));
      const v = rec.top[0].value;
      if (rec.top.length > 1 && rec.top.every((t) => t.value === v)) {
        parts.push(el('p', { className: 'note', id: 'tops-tie' }, `all ${rec.top.length} top inputs tie at ${fmt(v, 3)}: the unit reaches its maximum on many inputs (e.g. its resting value where its inputs are silent), so these are arbitrary among them, and their views can be flat (no input pixel changes the unit there)`));
      }
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

  /** The quality figures of a synthesized or accentuated image as one line (``no score`` with the
   * reason for a figure that cannot be computed), or "computing…" while the server works them out. */
  figuresLine(image, id) {
    let line;
    if (image.scores && image.scores.line) line = image.scores.line;
    else if (image.scores) line = 'no score';
    else if (image.beats_top_k) {
      const b = image.beats_top_k;
      line = `beats-top-${b.k}: ${b.ratio !== null ? `${fmt(b.ratio)}x` : 'n/a'} (${b.beats}/${b.k}, from the value synthesis reached) · other figures: computing…`;
    } else line = 'quality figures: computing…';
    // a judge that is the served model is starred in the line; the flags say it in full (the tooltip)
    const flags = image.scores?.flags || [];
    const note = flags.length ? ' · * not independent: the judge is the served model' : '';
    return el('p', { className: 'figures', id, title: flags.join('\n') }, line + note);
  }

  askFigures(layer, unit) {
    const key = `${layer}:${unit}`;
    if (this.figuresAsked.has(key) || !this.synthesis.available) return;
    this.figuresAsked.add(key);
    this.app.conn.send({ type: 'figures', layer, unit });
  }

  /** The accentuation box: the button (or Cancel while one runs), the frame it started from and the
   * result with its figures: the unit's activation before -> after, the distance reached vs the ball. */
  accentBox(rec) {
    const { layer, unit } = rec;
    const box = el('div', { className: 'accent', id: 'accent-box' });
    const m = this.accent;
    const running = m && (m.state === 'queued' || m.state === 'running');
    const btn = el('button', { id: 'accent-btn', type: 'button', title: 'raise this unit in the frame shown, staying close to it (feature accentuation)' }, running ? 'Cancel' : 'Accentuate');
    btn.addEventListener('click', () => (running ? this.cancelAccent(layer, unit) : this.accentuate(layer, unit)));
    box.append(btn);
    if (running) {
      const p = el('div', { className: 'synth-progress', id: 'accent-progress' });
      this.showProgress(p, m);
      box.append(p);
    } else if (m && m.state !== 'done') {
      box.append(el('p', { className: 'note' }, `accentuation ${m.state}${m.message ? `: ${m.message}` : ''}`));
    }
    const acc = rec.accentuation;
    if (acc && m && m.state === 'done') {
      const before = this.frameShot ? el('figure', {}, el('img', { src: this.frameShot, alt: 'the frame it started from', className: 'synth-img' }), el('figcaption', {}, 'frame')) : null;
      const after = el('figure', {}, el('img', { src: this.url('/api/atlas/image', { layer, unit, kind: 'accent', v: acc.version }), alt: `accentuation of ${layer}:${unit}`, className: 'synth-img', id: 'accent-img' }), el('figcaption', {}, 'accentuated'));
      box.append(
        el('div', { className: 'accent-pair' }, before, after),
        el('p', { className: 'figures', id: 'accent-numbers' }, `${acc.measure || 'activation'} ${fmt(acc.before, 3)} → ${fmt(acc.after, 3)} · distance ${fmt(acc.pixel_rms, 1)} of ${fmt(acc.radius, 0)} RMS levels (max ${fmt(acc.pixel_max, 0)})`),
        ...(acc.note ? [el('p', { className: 'note', id: 'accent-note' }, acc.note)] : []),
        this.figuresLine(acc, 'accent-figures'),
      );
    }
    return box;
  }

  accentuate(layer, unit) {
    const canvas = document.getElementById('input-canvas');
    try {
      this.frameShot = canvas ? canvas.toDataURL('image/png') : null;
    } catch (e) {
      this.frameShot = null;
    }
    const pos = this.app.state.settings?.layer === layer ? this.app.state.settings.position : null;
    this.app.conn.send({ type: 'accentuate', layer, unit, ...(pos ? { position: pos } : {}) });
    this.accent = { state: 'queued', progress: 0, layer, unit, job: 'accentuate' };
    this.refresh();
  }

  cancelAccent(layer, unit) {
    this.app.conn.send({ type: 'accentuate', layer, unit, cancel: true });
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
    if (m.job === 'accentuate' || m.job === 'figures') {
      this.onJob(m);
      return;
    }
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

  /** An accentuation or figures job reports (queued / running / done / cancelled / error). */
  onJob(m) {
    const cur = this.current;
    const here = cur && cur.layer === m.layer && cur.unit === m.unit;
    if (m.job === 'figures') {
      if (here && m.state === 'done') this.refresh();
      return;
    }
    this.app.figures.synthesis = m; // the tests' probe: the last job's message, whatever its kind
    if (m.state === 'error') this.app.showError(`accentuation of ${m.layer}:${m.unit} failed: ${m.message}`);
    if (!here) return;
    this.accent = m;
    const p = document.getElementById('accent-progress');
    if (m.state === 'running' && p) this.showProgress(p, m);
    else this.refresh();
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
