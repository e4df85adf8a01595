// What the page knows: the server's description of the model (its hello message), the settings shown,
// the last results, and the live figures of the status line. No DOM here.

import { percentile } from './dom.js';

/** The backprop setting that means "no view" (a word of the protocol; the modes themselves come in hello). */
export const OFF = 'off';

/** Whether an input (a source mode, or a result's ``source``) is live: camera or video frames, coming
 * several times a second (the others are stills: an uploaded image, a sample photo). */
export function isLive(source) {
  return source === 'camera' || source === 'video';
}

export class PageState {
  constructor(params) {
    this.token = params.get('token') || '';
    this.urlLayer = params.get('layer');
    this.urlUnit = params.get('unit');
    this.info = null; // the hello message: model, layers, the lists the controls are built from
    this.sessionId = null;
    this.settings = null; // what is shown: changes apply here at once, the server confirms or corrects them
    this.req = 0; // number of the last settings request sent
    this.prevSettings = null; // restored after a reconnect
    this.colormap = 'gray';
    this.luts = {}; // colormap name -> 256 packed RGBA words
    this.showAllLayers = false;
    this.pattern = false;
    this.lastBackprop = null; // the last backprop mode that was on (turned back on by 'a')
    this.lastHeader = null; // the last frame result and its payloads
    this.lastBlobs = null;
    this.geometry = new Map(); // layer -> receptive fields of its positions
    this.queryCursor = false; // attention layers: the query follows the patch under the cursor on the input
  }

  /** The backprop settings the server offers, OFF first. */
  get backpropModes() {
    return this.info?.backprop.modes ?? [OFF];
  }

  /** The backprop methods (the modes but OFF). */
  get backpropMethods() {
    return this.backpropModes.filter((m) => m !== OFF);
  }

  layerInfo(name = this.settings?.layer) {
    return this.info?.layers.find((l) => l.name === name);
  }

  unitLabel(unit) {
    const info = this.layerInfo();
    if (!info || !info.classes || !this.info.class_names) return '';
    return this.info.class_names[unit] ?? '';
  }

  /** Layers offered in the list: every module with "all modules", else the server's listed ones (LayerInfo.listed). */
  layerList() {
    const all = this.info?.layers ?? [];
    if (this.showAllLayers) return all;
    return all.filter((l) => l.listed || l.name === this.settings?.layer);
  }

  /** Apply a settings change at once; returns the message that asks the server for it (null before hello). */
  propose(partial) {
    if (!this.settings) return null;
    this.req += 1;
    this.settings = { ...this.settings, ...partial };
    return { type: 'settings', req: this.req, ...partial };
  }

  /** The server's settings; false (and ignored) when they answer an older request than the last one sent. */
  confirm(s, req) {
    if (req !== undefined && req !== null && req < this.req) return false;
    this.settings = s;
    this.prevSettings = { layer: s.layer, unit: s.unit, normalize: s.normalize, gain: s.gain, gamma: s.gamma, diff: s.diff, backprop: s.backprop, filter: s.filter, percentile: s.percentile };
    if (s.backprop !== OFF) this.lastBackprop = s.backprop;
    return true;
  }
}

/** Append item to list, keeping its last n entries. */
function keepLast(list, item, n) {
  list.push(item);
  if (list.length > n) list.shift();
}

/** The live figures: results drawn, their rate and latency, what the server dropped and the page skipped.
 * The status line shows them; the test probe (probe.js) reads them. */
export class Figures {
  constructor() {
    this.ready = false; // hello has been received
    this.frames = 0;
    this.liveFrames = 0; // results of camera or video frames
    this.backprops = 0;
    this.backpropsDrawn = { withResult: 0, alone: 0 }; // backprop views drawn with a result (Link.withNextResult) or alone
    this.inputs = 0; // still inputs shown
    this.errors = []; // every message shown to the user
    this.fps = 0; // results drawn per second, over the last 2 s
    this.p95 = NaN; // latency (ms, frame on screen -> result drawn) of the last 300 live results
    this.latencies = [];
    this.latencyCount = 0;
    this.last = null; // the last frame result's header
    this.lastGrid = null; // its grid payload (uint8 values, as received)
    this.predictions = [];
    this.sessionDropped = 0;
    this.skipped = 0;
    this.cameraFrames = 0;
    this.inputSeq = null; // the live frame the input canvas shows (its result is the one drawn)
    this.capture = null; // how camera frames are read: 'track' (frame by frame) or 'video' (a <video> element)
    this.trackFrames = 0; // camera frames read frame by frame (none while the input is frozen)
    this.videoEnded = false;
    this.lastBackprop = null;
    this.patternTiles = 0;
    this.rf = null; // the receptive field boxed on the input: [y0, x0, y1, x1]
    this.queryBox = null; // an attention layer's query patch boxed on the input: [y0, x0, y1, x1] (input pixels)
    this.unitMap = null; // the unit map drawn last: {unit, at (performance.now()), exact (false: the page's preview from the grid)}
    this.unitMaps = []; // the last unit maps drawn for another unit, or exact after a preview (as unitMap)
    this.synthesis = null; // the last synthesis progress message
    this.mining = null; // the last dataset-mining status (deepvis serve --dataset)
    this.atlasShown = null; // the unit record the unit pane shows (atlas.js)
    this.summary = null; // the last summary message (summary.js)
    this.strip = null; // the prefix strip drawn under the grid: {names, shape: [tokens, units]}, null when none
    this.lastKey = null; // the last key acted on: {key, at (its event's time stamp, performance.now() clock)}
    this.viewChanges = []; // the last results drawn that showed another layer or unit than the one before: {layer, unit, at}
    this.resultTimes = [];
  }

  keyPressed(key, at) {
    this.lastKey = { key, at };
  }

  unitMapDrawn(unit, exact) {
    const prev = this.unitMap;
    this.unitMap = { unit, at: performance.now(), exact };
    if (!prev || prev.unit !== unit || prev.exact !== exact) {
      keepLast(this.unitMaps, this.unitMap, 16);
    }
  }

  /** A frame result ``h`` was drawn at time ``t`` (ms); ``latency`` in ms, or null for a still input. */
  frameDrawn(h, t, latency, live, sources) {
    this.resultTimes.push(t);
    while (this.resultTimes.length && t - this.resultTimes[0] > 2000) this.resultTimes.shift();
    if (latency !== null) {
      keepLast(this.latencies, latency, 300);
      this.latencyCount++;
    }
    const n = this.resultTimes.length;
    this.fps = n > 1 ? ((n - 1) * 1000) / (t - this.resultTimes[0]) : 0;
    this.frames++;
    if (live) this.liveFrames++;
    this.p95 = percentile(this.latencies, 95);
    if (!this.last || this.last.layer !== h.layer || this.last.unit !== h.unit) {
      keepLast(this.viewChanges, { layer: h.layer, unit: h.unit, at: t }, 16);
    }
    this.last = h;
    if (h.predictions) this.predictions = h.predictions;
    this.sessionDropped = h.stats.dropped;
    this.skipped = sources.skipped;
    this.cameraFrames = sources.videoFrames;
  }
}
