// The layers pane: every channel's activations tiled into one canvas (the layout of
// deepvis.render.tile_grid: columns = ceil(sqrt(C)), 1-pixel padding), and the enlarged unit map.

import { setHidden } from './dom.js';

const PAD = 1;
const CELL = 8; // pixels per unit of a layer without a spatial map
const PAD_RGBA = [40, 40, 40, 255];

/** (rows, cols) of a near-square grid of n tiles. */
export function gridShape(n) {
  const cols = Math.ceil(Math.sqrt(n));
  return [Math.ceil(n / cols), cols];
}

/** A colormap as 256 packed RGBA words (little-endian ImageData order). */
export function lut32(flatRgb) {
  const out = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    const r = flatRgb[3 * i], g = flatRgb[3 * i + 1], b = flatRgb[3 * i + 2];
    out[i] = (255 << 24) | (b << 16) | (g << 8) | r;
  }
  return out;
}

export class GridView {
  constructor(canvas, cursor) {
    this.canvas = canvas;
    this.cursor = cursor;
    this.ctx = canvas.getContext('2d', { alpha: false });
    this.layout = null; // {n, rows, cols, th, tw}
    this.image = null;
  }

  /** Tile geometry for a grid header shape [C, h, w] or [C]. A new geometry also builds the index
   * map of the drawing: for every non-padding pixel of the canvas, in pixel order, the value it shows. */
  setLayout(shape) {
    const n = shape[0];
    const [th, tw] = shape.length === 3 ? [shape[1], shape[2]] : [CELL, CELL];
    const [rows, cols] = gridShape(n);
    const width = PAD + cols * (tw + PAD);
    const height = PAD + rows * (th + PAD);
    const l = this.layout;
    if (!l || l.n !== n || l.th !== th || l.tw !== tw || l.vector !== (shape.length !== 3)) {
      this.layout = { n, rows, cols, th, tw, width, height, vector: shape.length !== 3 };
      this.canvas.width = width;
      this.canvas.height = height;
      this.image = this.ctx.createImageData(width, height);
      this.pixels = new Uint32Array(this.image.data.buffer);
      this.pixels.fill(PAD_RGBA[0] | (PAD_RGBA[1] << 8) | (PAD_RGBA[2] << 16) | (255 << 24));
      [this.dst, this.src] = indexMap(this.layout);
      this.fit();
    }
    return this.layout;
  }

  /** Scale the canvas to the space it has (whole multiples when enlarging, so tiles stay crisp). */
  fit() {
    const l = this.layout;
    const wrap = this.canvas.parentElement;
    if (!l || !wrap) return; // an off-screen grid
    const availW = Math.max(100, wrap.clientWidth);
    const availH = Math.max(240, window.innerHeight - wrap.getBoundingClientRect().top - 16);
    const s = Math.min(availW / l.width, availH / l.height);
    const k = s >= 1 ? Math.floor(s) : s;
    this.canvas.style.width = `${Math.floor(l.width * k)}px`;
    this.canvas.style.height = `${Math.floor(l.height * k)}px`;
  }

  /** Draw uint8 values (C*h*w, or C for vectors) with a packed colormap: one pass over the index
   * map into the canvas's pixels, then one upload of the whole grid (putImageData). */
  draw(shape, values, lut) {
    this.setLayout(shape);
    const px = this.pixels, dst = this.dst, src = this.src;
    for (let i = 0, m = dst.length; i < m; i++) px[dst[i]] = lut[values[src[i]]];
    this.ctx.putImageData(this.image, 0, 0);
  }

  /** Draw an image (e.g. a synthesized pattern) into tile c, scaled to the tile. */
  drawTileImage(c, img) {
    const r = this.tileRect(c);
    if (r) this.ctx.drawImage(img, r.x, r.y, r.w, r.h);
  }

  /** A tile's rectangle in canvas pixels. */
  tileRect(c) {
    const l = this.layout;
    if (!l || c < 0 || c >= l.n) return null;
    return { x: PAD + (c % l.cols) * (l.tw + PAD), y: PAD + Math.floor(c / l.cols) * (l.th + PAD), w: l.tw, h: l.th };
  }

  /** The unit under a mouse event, or -1. */
  hit(ev) {
    const l = this.layout;
    if (!l) return -1;
    const box = this.canvas.getBoundingClientRect();
    const x = ((ev.clientX - box.left) / box.width) * l.width;
    const y = ((ev.clientY - box.top) / box.height) * l.height;
    const col = Math.floor((x - PAD) / (l.tw + PAD));
    const row = Math.floor((y - PAD) / (l.th + PAD));
    if (col < 0 || col >= l.cols || row < 0 || row >= l.rows) return -1;
    const c = row * l.cols + col;
    return c < l.n ? c : -1;
  }

  /** Move the highlight box onto tile c (CSS pixels over the scaled canvas). */
  highlight(c) {
    const r = this.tileRect(c);
    if (!r) {
      setHidden(this.cursor, true);
      return;
    }
    const sx = this.canvas.clientWidth / this.layout.width;
    const sy = this.canvas.clientHeight / this.layout.height;
    Object.assign(this.cursor.style, {
      left: `${this.canvas.offsetLeft + (r.x - PAD) * sx}px`,
      top: `${this.canvas.offsetTop + (r.y - PAD) * sy}px`,
      width: `${(r.w + 2 * PAD) * sx}px`,
      height: `${(r.h + 2 * PAD) * sy}px`,
    });
    setHidden(this.cursor, false);
  }
}

/** For a grid layout: (dst, src), the canvas pixel and the value index of every non-padding pixel,
 * in pixel order (tiles in the layout of deepvis.render.tile_grid; a vector's value fills its cell). */
export function indexMap({ n, rows, cols, th, tw, width, vector }) {
  const dst = new Uint32Array(n * th * tw);
  const src = new Uint32Array(n * th * tw);
  let k = 0;
  for (let r = 0; r < rows; r++) {
    for (let y = 0; y < th; y++) {
      const line = (PAD + r * (th + PAD) + y) * width;
      for (let col = 0; col < cols; col++) {
        const c = r * cols + col;
        if (c >= n) break;
        const ox = line + PAD + col * (tw + PAD);
        const base = vector ? -1 : c * th * tw + y * tw;
        for (let x = 0; x < tw; x++, k++) {
          dst[k] = ox + x;
          src[k] = vector ? c : base + x;
        }
      }
    }
  }
  return [dst, src];
}

/** A canvas's reusable ImageData of h x w (made again only when the size changes). */
function imageFor(canvas, h, w) {
  if (canvas.width !== w || canvas.height !== h || !canvas._image) {
    canvas.width = w;
    canvas.height = h;
    canvas._ctx = canvas.getContext('2d', { alpha: false });
    canvas._image = canvas._ctx.createImageData(w, h);
  }
  return [canvas._ctx, canvas._image];
}

/** Draw a uint8 map (h*w) into a canvas with a packed colormap. */
export function drawMap(canvas, h, w, values, lut) {
  const [ctx, img] = imageFor(canvas, h, w);
  const px = new Uint32Array(img.data.buffer);
  for (let i = 0; i < h * w; i++) px[i] = lut[values[i]];
  ctx.putImageData(img, 0, 0);
}

/** Draw packed RGB bytes (h*w*3) into a canvas. */
export function drawRgb(canvas, h, w, rgb) {
  const [ctx, img] = imageFor(canvas, h, w);
  const d = img.data;
  for (let i = 0, j = 0; i < h * w; i++, j += 3) {
    d[4 * i] = rgb[j];
    d[4 * i + 1] = rgb[j + 1];
    d[4 * i + 2] = rgb[j + 2];
    d[4 * i + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
}

/** The prefix strip (a token layer's class, distillation and register tokens, drawn apart from the
 * grid; of an attention layer, the query's weights on the prefix keys): uint8 values (P*C, row-major:
 * one row per token, one cell per unit in the grid's order, on the grid's scale: deepvis.render.strip).
 * One canvas pixel per value, scaled by CSS to the grid's width, STRIP_ROW CSS pixels per row. */
export const STRIP_ROW = 10;

export function drawStrip(canvas, rows, cols, values, lut, width) {
  drawMap(canvas, rows, cols, values, lut);
  canvas.style.width = `${Math.max(cols, width)}px`;
  canvas.style.height = `${rows * STRIP_ROW}px`;
}

/** The strip cell under a mouse event: {row, unit}, or null. */
export function stripHit(canvas, rows, cols, ev) {
  const box = canvas.getBoundingClientRect();
  const unit = Math.floor(((ev.clientX - box.left) / box.width) * cols);
  const row = Math.floor(((ev.clientY - box.top) / box.height) * rows);
  return unit >= 0 && unit < cols && row >= 0 && row < rows ? { row, unit } : null;
}
