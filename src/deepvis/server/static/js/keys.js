// Keyboard bindings, after the original Deep Visualization Toolbox (i/j/k/l move, I/J/K/L move
// faster, u/o change layer, b/n/m backprop mode and filter, s pattern mode, t/T boost, h help).
// One table drives both the key handler and the help overlay.

import { el, setChildren } from './dom.js';

/** The choices the server offers, for the help text (info: its hello message; null before it arrives). */
const listed = (what, names) => (names ? `${what}: ${names.join(', ')}` : what);

/** [keys, action, description]; action names are methods of the controls' `actions` object; a
 * description may depend on what the server offers (a function of its hello message, or null). */
export const BINDINGS = [
  [['j', 'ArrowLeft'], 'left', 'select the unit to the left'],
  [['l', 'ArrowRight'], 'right', 'select the unit to the right'],
  [['i', 'ArrowUp'], 'up', 'select the unit above'],
  [['k', 'ArrowDown'], 'down', 'select the unit below'],
  [['J'], 'leftFast', 'move 3 units left'],
  [['L'], 'rightFast', 'move 3 units right'],
  [['I'], 'upFast', 'move 3 rows up'],
  [['K'], 'downFast', 'move 3 rows down'],
  [['u', 'U', 'PageUp'], 'prevLayer', 'previous layer'],
  [['o', 'O', 'PageDown'], 'nextLayer', 'next layer'],
  [['b'], 'cycleBackprop', (info) => listed('cycle the backprop view', info?.backprop.modes)],
  [['n'], 'cycleBackpropMethod', 'next backprop method (keeps it on)'],
  [['a'], 'toggleBackprop', 'show or hide the backprop view'],
  [['m'], 'cycleFilter', 'cycle the backprop display filter'],
  [['v'], 'toggleRawBackprop', 'backprop view: raw signed values scaled by the maximum, or back to the readable view (norm, 99th percentile)'],
  [['s'], 'togglePattern', 'pattern mode: tiles show each unit\'s synthesized image'],
  [['x'], 'toggleDiff', 'diff view: activation minus its running mean'],
  [['r'], 'cycleNormalize', (info) => listed('cycle normalization', info?.normalizations)],
  [['t'], 'cycleGamma', 'cycle the gamma boost'],
  [['T'], 'cycleGain', 'cycle the gain boost'],
  [['f', ' '], 'toggleFreeze', 'freeze / unfreeze the input'],
  [['c'], 'camera', 'use the camera'],
  [['e'], 'nextSample', 'next sample photo'],
  [['w'], 'prevSample', 'previous sample photo'],
  [['p'], 'playPause', 'play / pause the video'],
  [['.'], 'stepVideo', 'step the video one frame'],
  [['z'], 'resetSummary', 'reset the layer summary\'s live statistics'],
  [['h', '?'], 'toggleHelp', 'show / hide this help'],
  [['Escape'], 'escape', 'close help; otherwise reset boost, backprop and diff'],
];

const KEY_NAMES = { ' ': 'Space', ArrowLeft: '←', ArrowRight: '→', ArrowUp: '↑', ArrowDown: '↓' };

/** Install the key handler; keys typed into form fields are left alone. onKey(key, timeStamp), when
 * given, hears of each key acted on before its action runs (timeStamp: the event's, on the
 * performance.now() clock, for the figures of how long a key takes to show its effect). */
export function installKeys(actions, onKey = null) {
  const byKey = new Map();
  for (const [keys, action] of BINDINGS) for (const k of keys) byKey.set(k, action);
  document.addEventListener('keydown', (ev) => {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const t = ev.target;
    const typing = t instanceof HTMLInputElement && !['checkbox', 'range', 'button', 'file'].includes(t.type);
    if (typing || t instanceof HTMLTextAreaElement || (t instanceof HTMLSelectElement && ev.key.startsWith('Arrow'))) return;
    const action = byKey.get(ev.key);
    if (!action || !actions[action]) return;
    ev.preventDefault();
    onKey?.(ev.key, ev.timeStamp);
    actions[action]();
  });
}

/** Fill the help overlay's table from BINDINGS (info: the server's hello message, or null). */
export function renderHelp(table, info) {
  const rows = BINDINGS.map(([keys, , desc]) =>
    el('tr', {}, el('td', {}, ...keys.flatMap((k, i) => [i ? ' ' : null, el('kbd', {}, KEY_NAMES[k] || k)])),
      el('td', {}, typeof desc === 'function' ? desc(info) : desc)),
  );
  setChildren(table, el('tbody', {}, ...rows));
}
