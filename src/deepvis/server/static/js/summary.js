// The summary pane: sparsity, dead units and the most active units of the selected layer, with its
// locality and sensitivity where known. The page asks for a `summary` message (server/summary.py)
// every `summary.interval_s` seconds (from the server's hello) while results arrive, while the
// dataset miner (--dataset) advances on the selected layer, and whenever the layer changes: live
// statistics of the frames seen on this page (reset with the button or z), the statistics mined from
// the dataset so far, or the numbers of the atlas / report the server was started with, and it says
// which. A most active unit is a button: clicking it selects the unit.

import { $, el, fmt, setChildren } from './dom.js';

export class SummaryPane {
  /** app: {state, figures, conn, controls} (see main.js). */
  constructor(app) {
    this.app = app;
    this.last = null;
    this.askedFrames = -1;
    this.askedLayer = null;
    this.askedMining = '';
    this.timer = null;
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
    $('summary-source').textContent = m.origin;
    $('summary-reset').hidden = m.source !== 'live';
    const pct = (x) => (x === null || x === undefined ? '–' : `${fmt(100 * x, 1)}%`);
    const rows = [
      ['inputs', String(m.images)],
      ['sparsity', pct(m.sparsity)],
      ['dead units', m.dead === null ? '–' : `${m.dead} of ${m.units}${m.dead_units.length ? `: ${m.dead_units.join(', ')}${m.dead > m.dead_units.length ? ', …' : ''}` : ''}`],
      ['locality (median)', m.locality ? fmt(m.locality.median ?? NaN, 3) : '–'],
      ['sensitivity', m.sensitivity ? sensitivityText(m.sensitivity) : '–'],
    ];
    const table = el('table', { className: 'summary-table' },
      el('tbody', {}, ...rows.map(([k, v]) => el('tr', {}, el('th', {}, k), el('td', { dataset: { field: k } }, v)))));
    setChildren($('summary'), table,
      this.unitList('most active by mean', m.most_active_by_mean, 'mean', 'by-mean'),
      this.unitList('most active by max', m.most_active_by_max, 'max', 'by-max'));
  }

  unitList(title, rows, key, id) {
    if (!rows.length) return null;
    const buttons = rows.map((r) => {
      const b = el('button', { type: 'button', className: 'unit-chip', title: `select unit ${r.unit}`, dataset: { unit: String(r.unit) } },
        `${r.unit} `, el('span', { className: 'note' }, fmt(r[key] ?? NaN, 2)));
      b.addEventListener('click', () => this.app.controls.setUnit(r.unit));
      return b;
    });
    return el('div', { className: 'summary-units', id: `summary-${id}` }, el('span', { className: 'note' }, `${title}: `), ...buttons);
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
