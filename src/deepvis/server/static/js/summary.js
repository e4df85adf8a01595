// The summary pane: sparsity, dead units and the most active units of the selected layer, with its
// locality and sensitivity where known. The page asks for a `summary` message (server/summary.py)
// every `summary.interval_s` seconds (from the server's hello) while results arrive, while the
// dataset miner (--dataset) advances on the selected layer, and whenever the layer changes: live
// statistics of the frames seen on this page (reset with the button or z), the statistics mined from
// the dataset so far, or the numbers of the atlas / report the server was started with, and it says
// which. A most active unit is a button: clicking it selects the unit.

import { $, el, fmt, setChildren, setHidden, setText } from './dom.js';

export class SummaryPane {
  /** app: {state, figures, conn, controls} (see main.js). */
  constructor(app) {
    this.app = app;
    this.last = null;
    this.askedFrames = -1;
    this.askedLayer = null;
    this.askedMining = '';
    this.timer = null;
    this.table = null; // the pane's elements (build)
    this.cells = {};
    this.byMean = null;
    this.byMax = null;
    $('summary-reset').addEventListener('click', () => this.reset());
  }

  /** The server's hello: ask for the summary at the interval it gives (server/summary.py: SUMMARY_INTERVAL). */
  hello(m) {
    if (this.timer !== null) clearInterval(this.timer);
    this.timer = setInterval(() => this.tick(), m.summary.interval_s * 1000);
  }

  /** Ask for the summary when results arrived, the layer changed or its mining advanced since the last question. */
  tick() {
    const layer = this.app.state.settings?.layer;
    if (!layer || !this.app.conn.open) return;
    const frames = this.app.figures.frames;
    const mining = miningKey(this.app.figures.mining, layer);
    if (frames === this.askedFrames && layer === this.askedLayer && mining === this.askedMining) return;
    this.askedFrames = frames;
    this.askedLayer = layer;
    this.askedMining = mining;
    this.app.conn.send({ type: 'summary' });
  }

  /** Ask the server to forget the live statistics (it answers with the emptied summary). */
  reset() {
    this.app.conn.send({ type: 'summary', reset: true });
  }

  /** A `summary` message arrived: show it if it is the selected layer's. */
  show(m) {
    this.last = m;
    this.app.figures.summary = m;
    const layer = this.app.state.settings?.layer;
    if (layer && m.layer !== layer) return;
    setText($('summary-source'), m.origin);
    setHidden($('summary-reset'), m.source !== 'live');
    const pct = (x) => (x === null || x === undefined ? '–' : `${fmt(100 * x, 1)}%`);
    const rows = [
      ['inputs', String(m.images)],
      ['sparsity', pct(m.sparsity)],
      ['dead units', m.dead === null ? '–' : `${m.dead} of ${m.units}${m.dead_units.length ? `: ${m.dead_units.join(', ')}${m.dead > m.dead_units.length ? ', …' : ''}` : ''}`],
      ['locality (median)', m.locality ? fmt(m.locality.median ?? NaN, 3) : '–'],
      ['sensitivity', m.sensitivity ? sensitivityText(m.sensitivity) : '–'],
    ];
    if (!this.table) this.build(rows.map(([k]) => k));
    for (const [k, v] of rows) setText(this.cells[k], v);
    this.showUnits(this.byMean, m.most_active_by_mean, 'mean');
    this.showUnits(this.byMax, m.most_active_by_max, 'max');
  }

  /** The pane's elements, made once: the figures' table and the two lists of most active units.
   * Later summaries rewrite only the text that changed (the live pane is redrawn twice a second). */
  build(fields) {
    this.cells = Object.fromEntries(fields.map((k) => [k, el('td', { dataset: { field: k } })]));
    this.table = el('table', { className: 'summary-table' },
      el('tbody', {}, ...fields.map((k) => el('tr', {}, el('th', {}, k), this.cells[k]))));
    const list = (title, id) => el('div', { className: 'summary-units', id: `summary-${id}` }, el('span', { className: 'note' }, `${title}: `));
    this.byMean = list('most active by mean', 'by-mean');
    this.byMax = list('most active by max', 'by-max');
    setChildren($('summary'), this.table, this.byMean, this.byMax);
  }

  /** One list of most active units, each a button that selects its unit (hidden when empty). A unit's
   * button is kept from one summary to the next, only its figure rewritten, so that a click in
   * progress is not lost when the summary is redrawn under the mouse. */
  showUnits(list, rows, key) {
    const old = new Map([...list.querySelectorAll('.unit-chip')].map((b) => [b.dataset.unit, b]));
    const buttons = rows.map((r) => {
      const b = old.get(String(r.unit)) ?? this.chip(r.unit);
      old.delete(String(r.unit));
      setText(b.lastChild, fmt(r[key] ?? NaN, 2));
      return b;
    });
    for (const b of old.values()) b.remove();
    const shown = [...list.querySelectorAll('.unit-chip')];
    if (shown.length !== buttons.length || shown.some((b, i) => b !== buttons[i])) list.append(...buttons);
    setHidden(list, buttons.length === 0);
  }

  chip(unit) {
    const b = el('button', { type: 'button', className: 'unit-chip', title: `select unit ${unit}`, dataset: { unit: String(unit) } },
      `${unit} `, el('span', { className: 'note' }));
    b.addEventListener('click', () => this.app.controls.setUnit(unit));
    return b;
  }
}

/** What changes in the dataset miner's status (atlas.js keeps the last one) when the layer's statistics may have:
 * its phase, and the inputs read while it is being mined. */
function miningKey(status, layer) {
  const p = status?.layers?.[layer];
  if (!p) return '';
  return p.phase === 'mining' ? `mining:${p.done}` : p.phase;
}

function sensitivityText(s) {
  const kinds = Object.keys(s.mean_change || {});
  return kinds.map((k) => `${k}: ${s.mean_change[k].map((v, i) => `ε=${s.epsilons?.[i] ?? '?'} → ${fmt(v ?? NaN, 3)}`).join(', ')}`).join('; ') || '–';
}
