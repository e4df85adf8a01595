// Inputs: the camera, a video file, an uploaded image or a sample photo. Camera and video frames
// are cropped and resized here exactly as the model's preprocessing would (resize the shorter side
// to size / crop_pct, center-crop) and sent as raw RGB at the model's input size. A sent frame is
// kept until its result arrives: the input canvas then shows that frame, in the same display frame
// as its activations (with frames pipelined, the newest frame sent is one ahead of the result).

import { isLive } from './state.js';

/** At most this many frames on their way (sent, no result yet). Two keep the server busy: while it
 * computes one frame the next is sent, timed to arrive as that computation ends (LEAD), and waits in
 * the server's one slot, where a newer frame would replace it. Camera frames that appear meanwhile
 * are skipped except the newest. The URL may set it: &inflight=1..4 (1: no pipelining). */
const MAX_IN_FLIGHT = Math.max(1, Math.min(4, Number(new URLSearchParams(location.search).get('inflight')) || 2));
/** With a frame being computed, the next is sent once this fraction of the server's time per frame
 * (its running mean) has passed since the server began it (when it was sent, or when the previous
 * result arrived, whichever is later): sooner, it would wait longer on the server (and be older when
 * drawn); later, the server would idle. */
const LEAD = 0.8;
/** Without any result for this long, send anyway (a lost frame must not stall the camera). */
const STALL_MS = 1000;

/** RGBA pixels -> packed RGB (a quarter fewer bytes to send), into ``out`` when it has the size. */
export function toRgb(rgba, out) {
  const n = rgba.length >> 2;
  const rgb = out && out.length === 3 * n ? out : new Uint8Array(3 * n);
  for (let i = 0, j = 0, k = 0; i < n; i++, j += 4, k += 3) {
    rgb[k] = rgba[j];
    rgb[k + 1] = rgba[j + 1];
    rgb[k + 2] = rgba[j + 2];
  }
  return rgb;
}

/** The model's crop of a picture iw x ih for an input h x w (resize the shorter side to
 * max(h, w) / cropPct, center-crop): {x, y, w, h} in the picture's pixels (fractional). */
export function cropRect(iw, ih, h, w, cropPct) {
  const ratio = Math.max(h, w) / cropPct / Math.min(iw, ih);
  const nw = Math.max(w, Math.round(iw * ratio)), nh = Math.max(h, Math.round(ih * ratio));
  const left = Math.floor((nw - w) / 2), top = Math.floor((nh - h) / 2);
  return { x: left / ratio, y: top / ratio, w: w / ratio, h: h / ratio };
}

/** Whether the camera can be read frame by frame without a <video> element (MediaStreamTrackProcessor
 * on the page's thread: Chromium). Such frames are cropped in their own YUV pixels and converted once
 * (VideoFrame.copyTo), which is several times cheaper than drawing the whole picture into a canvas. */
const TRACK_FRAMES = typeof MediaStreamTrackProcessor === 'function' && typeof VideoFrame === 'function'
  && new URLSearchParams(location.search).get('capture') !== 'video';

export class Sources {
  /**
   * app: {conn, token, session(), showError(msg), onSourceChange(mode, name), onVideoState()} (see main.js)
   */
  constructor(app, video, canvas) {
    this.app = app;
    this.video = video;
    this.canvas = canvas;
    this.ctx = canvas.getContext('2d', { alpha: false });
    // live frames are cropped and read back off screen; the input canvas shows them with their results
    this.capture = document.createElement('canvas');
    this.captureCtx = this.capture.getContext('2d', { alpha: false, willReadFrequently: true });
    this.track = null; // the camera read frame by frame (TRACK_FRAMES): {reader, frame (the newest VideoFrame)}
    this.grabbing = false; // a frame is being cropped (VideoFrame.copyTo is asynchronous)
    this.mode = 'none'; // 'camera' | 'video' | 'image' | 'sample' | 'none'
    this.name = '';
    this.frozen = false;
    this.stream = null;
    this.objectUrl = null;
    this.seq = 0;
    this.lastResult = 0;
    this.lastSendAt = 0;
    this.serverMs = 0; // running mean of the server's milliseconds per frame
    this.lastResultAt = 0; // when the last result arrived
    this.sendTimer = null;
    // seq -> {born, image} of each frame on its way, until its result arrives: when it appeared
    // (performance.now(), for its latency) and, for live frames the page cropped, its pixels (ImageData)
    this.onTheirWay = new Map();
    this.skipped = 0;
    this.sent = 0;
    this.videoFrames = 0; // frames the camera or video presented while we were pumping
    this.frameAt = 0; // when the newest presented frame appeared (performance.now() time)
    this.frameFresh = false; // that frame has not been sent yet
    this.pumping = false;
    video.addEventListener('seeked', () => {
      if (this.mode === 'video' && video.paused) this.sendFrame(true);
    });
    video.addEventListener('ended', () => this.app.onVideoState?.());
    video.addEventListener('pause', () => this.app.onVideoState?.());
    video.addEventListener('play', () => this.app.onVideoState?.());
    video.addEventListener('error', () => {
      if (this.mode === 'video' && this.file && !this.server) this.serverVideo(this.file, video.error);
    });
  }

  setSize(inputSize, cropPct) {
    this.inputSize = inputSize;
    this.cropPct = cropPct;
    this.canvas.width = this.capture.width = inputSize[1];
    this.canvas.height = this.capture.height = inputSize[0];
  }

  // -- choosing a source --------------------------------------------------------------------------
  stopLive() {
    clearTimeout(this.sendTimer);
    clearTimeout(this.serverTimer);
    this.server = null;
    this.file = null;
    this.onTheirWay.clear();
    if (this.track) {
      this.track.thaw?.();
      this.track.reader.cancel().catch(() => {});
      this.track.frame?.close();
      this.track = null;
    }
    if (this.stream) {
      for (const t of this.stream.getTracks()) t.stop();
      this.stream = null;
    }
    this.video.pause();
    this.video.srcObject = null;
    if (this.objectUrl) {
      this.video.removeAttribute('src');
      this.video.load();
      URL.revokeObjectURL(this.objectUrl);
      this.objectUrl = null;
    }
  }

  /** The camera size to ask for: the smallest 4:3 picture whose shorter side the model's crop needs
   * (size / crop_pct, e.g. 256 for 224 at 0.875). Every camera pixel is converted and scaled in the
   * browser on every frame, so a 640x480 picture would cost ~4.7x the pixels for the same input. */
  cameraSize() {
    const short = Math.ceil(Math.max(...this.inputSize) / this.cropPct);
    return { width: { ideal: Math.ceil((short * 4) / 3) }, height: { ideal: short } };
  }

  async startCamera() {
    if (!navigator.mediaDevices?.getUserMedia) {
      this.app.showError('this browser gives no camera access here (a camera needs http://localhost or https)');
      return;
    }
    this.stopLive();
    try {
      this.stream = await navigator.mediaDevices.getUserMedia({ video: { ...this.cameraSize(), frameRate: { ideal: 30 } }, audio: false });
    } catch (e) {
      this.app.showError(`no camera: ${e.message || e.name}`);
      return;
    }
    this.setMode('camera', 'camera');
    const track = this.stream.getVideoTracks()[0];
    if (TRACK_FRAMES && track) {
      this.app.figures.capture = 'track';
      this.readTrack(track);
      return;
    }
    this.app.figures.capture = 'video';
    this.video.srcObject = this.stream;
    await this.video.play();
    this.pump();
  }

  /** Read the camera frame by frame (TRACK_FRAMES): keep the newest frame (the one before is closed)
   * and treat it as the <video> path treats a presented frame. While the input is frozen nothing is
   * read (the track drops the frames it cannot hand over) until toggleFreeze() or stopLive() thaws it. */
  async readTrack(track) {
    const reader = new MediaStreamTrackProcessor({ track }).readable.getReader();
    const t = { reader, frame: null, thaw: null };
    this.track = t;
    for (;;) {
      if (this.frozen) {
        await new Promise((resolve) => {
          t.thaw = resolve;
        });
        t.thaw = null;
        if (this.track !== t) break;
      }
      let r;
      try {
        r = await reader.read();
      } catch (e) {
        break;
      }
      if (r.done || this.track !== t) {
        r.value?.close();
        break;
      }
      t.frame?.close();
      t.frame = r.value;
      this.app.figures.trackFrames++;
      if (!this.frozen) this.framePresented(performance.now());
    }
    if (this.track === t) {
      t.frame?.close();
      this.track = null;
      if (this.mode === 'camera') this.app.showError('the camera stopped');
    }
  }

  async openVideo(file) {
    this.stopLive();
    this.file = file;
    this.objectUrl = URL.createObjectURL(file);
    this.setMode('video', file.name);
    this.video.loop = false;
    this.video.src = this.objectUrl;
    try {
      await this.video.play();
    } catch (e) {
      if (!this.server && this.file === file) this.serverVideo(file, e);
      return;
    }
    this.pump();
  }

  /** The browser cannot play the file: the server decodes it (in a child process) and plays it by frame. */
  async serverVideo(file, why) {
    this.stopLive();
    this.server = { name: file.name, frames: 0, fps: 25, index: 0, playing: false, ended: false, loading: true };
    this.setMode('video', file.name);
    this.app.onSourceChange?.('video', `${file.name} (decoding on the server…)`);
    const q = new URLSearchParams({ token: this.app.token, session: this.app.session(), name: file.name.slice(0, 200) });
    let res, body;
    try {
      res = await fetch(`/api/video?${q}`, { method: 'POST', body: file, headers: { 'content-type': 'application/octet-stream' } });
      body = await res.json();
    } catch (e) {
      body = { error: `upload failed: ${e.message}` };
    }
    if (this.server === null || this.server.name !== file.name) return; // another input was chosen meanwhile
    if (!res || !res.ok) {
      this.server = null;
      const reason = why && (why.message || why.name) ? ` (${why.message || why.name})` : '';
      this.app.showError(`this browser cannot play ${file.name}${reason}, and the server could not decode it either: ${body.error || res.status}`);
      return;
    }
    if (body.warning) this.app.showError(body.warning);
    Object.assign(this.server, { frames: body.frames, fps: body.fps || 25, loading: false, playing: true });
    this.app.onSourceChange?.('video', `${file.name} (decoded by the server, ${body.frames} frames)`);
    this.serverTick();
  }

  /** Play a server-decoded video: ask for the next frame at its rate, never more than the in-flight cap. */
  serverTick() {
    const sv = this.server;
    if (!sv || !sv.playing || this.frozen || this.mode !== 'video') return;
    clearTimeout(this.serverTimer);
    if (sv.index >= sv.frames) {
      sv.playing = false;
      sv.ended = true;
      this.app.onVideoState?.();
      return;
    }
    const now = performance.now();
    if (this.seq - this.lastResult < MAX_IN_FLIGHT || now - this.lastSendAt > STALL_MS) {
      this.videoFrames++;
      this.requestServerFrame(sv.index++);
    }
    this.serverTimer = setTimeout(() => this.serverTick(), 1000 / sv.fps);
  }

  requestServerFrame(index) {
    const seq = ++this.seq;
    const now = performance.now();
    this.lastSendAt = now;
    this.remember(seq, now, null);
    this.sent++;
    this.app.conn.send({ type: 'video_frame', index, seq });
  }

  /** Video state for the controls: {paused, ended} of the <video> element or of the server's player. */
  get videoState() {
    if (this.server) return { paused: !this.server.playing, ended: this.server.ended };
    return { paused: this.video.paused, ended: this.video.ended };
  }

  async uploadImage(file) {
    this.stopLive();
    const q = new URLSearchParams({ token: this.app.token, session: this.app.session(), name: file.name.slice(0, 200) });
    let res;
    try {
      res = await fetch(`/api/upload?${q}`, { method: 'POST', body: file, headers: { 'content-type': 'application/octet-stream' } });
    } catch (e) {
      this.app.showError(`upload failed: ${e.message}`);
      return;
    }
    let body = {};
    try {
      body = await res.json();
    } catch (e) {
      body = { error: `the server answered ${res.status}` };
    }
    if (!res.ok) {
      this.app.showError(body.error || `upload refused (${res.status})`);
      return;
    }
    this.setMode('image', file.name);
  }

  sample(name) {
    this.stopLive();
    this.setMode('sample', name);
    this.app.conn.send({ type: 'sample', name });
  }

  setMode(mode, name) {
    this.mode = mode;
    this.name = name;
    this.frozen = false;
    this.app.onSourceChange?.(mode, name);
  }

  get live() {
    return isLive(this.mode);
  }

  /** A live input that is not frozen: its frames keep coming (a paused video still counts). */
  get streaming() {
    return this.live && !this.frozen;
  }

  toggleFreeze() {
    this.frozen = !this.frozen;
    if (this.mode === 'video' && this.server) {
      this.server.playing = !this.frozen && !this.server.ended;
      this.serverTick();
    } else if (this.mode === 'video') {
      if (this.frozen) this.video.pause();
      else this.video.play();
    }
    if (!this.frozen) {
      if (this.track) this.track.thaw?.();
      else this.pump();
    }
    this.app.onVideoState?.();
    return this.frozen;
  }

  togglePlay() {
    if (this.mode !== 'video') return;
    const sv = this.server;
    if (sv) {
      if (sv.loading) return;
      if (sv.ended) {
        sv.index = 0;
        sv.ended = false;
      }
      sv.playing = !sv.playing;
      this.frozen = false;
      this.serverTick();
    } else if (this.video.paused || this.video.ended) {
      this.frozen = false;
      this.video.play();
      this.pump();
    } else this.video.pause();
    this.app.onVideoState?.();
  }

  /** One frame forward (the paused video seeks; the frame is sent when the seek lands). */
  step(frames = 1) {
    if (this.mode !== 'video') return;
    const sv = this.server;
    if (sv) {
      if (sv.loading || !sv.frames) return;
      sv.playing = false;
      sv.index = Math.max(0, Math.min(sv.frames - 1, sv.index + frames - 1));
      this.requestServerFrame(sv.index++);
      sv.ended = sv.index >= sv.frames;
      this.app.onVideoState?.();
      return;
    }
    this.video.pause();
    const d = this.video.duration || 0;
    this.video.currentTime = Math.max(0, Math.min(d, this.video.currentTime + frames / 30));
  }

  // -- sending frames ------------------------------------------------------------------------------
  pump() {
    if (this.pumping) return;
    this.pumping = true;
    const v = this.video;
    const next = (now, meta) => {
      if (!this.streaming || (this.mode === 'video' && (v.paused || v.ended))) {
        this.pumping = false;
        return;
      }
      this.framePresented(meta?.presentationTime ?? now ?? performance.now());
      if (v.requestVideoFrameCallback) v.requestVideoFrameCallback(next);
      else requestAnimationFrame(next);
    };
    if (v.requestVideoFrameCallback) v.requestVideoFrameCallback(next);
    else requestAnimationFrame(next);
  }

  /** A new camera or video frame appeared at ``at`` (performance.now() time; latency counts from
   * there): send it, or, when the cap is reached, keep it for the moment the next result arrives. */
  framePresented(at) {
    this.videoFrames++;
    if (this.frameFresh) this.skipped++; // the previous frame was never sent: replaced by this one
    this.frameAt = at;
    this.frameFresh = true;
    this.sendFrame(false);
  }

  /** Crop/resize the current camera or video frame and send it; force ignores the in-flight cap. */
  sendFrame(force) {
    const conn = this.app.conn;
    const frame = this.track?.frame;
    if (!conn.open || this.grabbing || !(frame ? frame.displayWidth : this.video.videoWidth)) return;
    const now = performance.now();
    const inFlight = this.seq - this.lastResult;
    if (!force && now - this.lastSendAt < STALL_MS) {
      if (inFlight >= MAX_IN_FLIGHT) return; // sent on the next result
      // the server began the frame on its way when it arrived or when the previous result left
      const wait = inFlight > 0 ? Math.max(this.lastSendAt, this.lastResultAt) + LEAD * this.serverMs - now : 0;
      if (wait > 1) {
        // the server is still busy with the last frame: send the newest one in time for its end
        clearTimeout(this.sendTimer);
        this.sendTimer = setTimeout(() => this.frameFresh && this.streaming && this.sendFrame(false), wait);
        return;
      }
    }
    const born = this.frameFresh && this.frameAt <= now ? this.frameAt : now;
    this.frameFresh = false;
    if (frame) {
      // a copy of the frame: the reader closes its own when the next one comes
      const copy = frame.clone();
      this.grabbing = true;
      this.cropTrackFrame(copy).then(
        (image) => {
          copy.close();
          this.grabbing = false;
          if (this.streaming && conn.open) this.sendImage(image, born, performance.now());
        },
        (e) => {
          // not expected (the copy stays open); the camera must not stall: the next frame is tried
          copy.close();
          this.grabbing = false;
          this.frameFresh = true;
          this.app.showError(`a camera frame could not be read: ${e.message || e.name}`);
        },
      );
      return;
    }
    const [h, w] = this.inputSize;
    const r = cropRect(this.video.videoWidth, this.video.videoHeight, h, w, this.cropPct);
    this.sendImage(this.scaled(this.video, r.x, r.y, r.w, r.h), born, now);
  }

  /** The rectangle (x, y, cw, ch) of a drawable ``source`` (the <video>, a VideoFrame, a canvas)
   * scaled, smoothed, to the input size in the capture canvas: its pixels as ImageData. */
  scaled(source, x, y, cw, ch) {
    const [h, w] = this.inputSize;
    this.captureCtx.drawImage(source, x, y, cw, ch, 0, 0, w, h);
    return this.captureCtx.getImageData(0, 0, w, h);
  }

  /** The model's crop of a camera VideoFrame as ImageData at the input size: the crop is converted
   * to RGB in the frame's own pixels (copyTo), then scaled in a canvas (smoothed, as drawImage from
   * the <video> scales). The crop rectangle is rounded to even pixels (YUV 4:2:0 needs it). Where
   * copyTo cannot convert (older browsers), the frame is drawn into the canvas instead, from then on. */
  async cropTrackFrame(frame) {
    const [h, w] = this.inputSize;
    const r = cropRect(frame.displayWidth, frame.displayHeight, h, w, this.cropPct);
    if (!this.copyToFails) {
      const vis = frame.visibleRect;
      const sx = vis.width / frame.displayWidth, sy = vis.height / frame.displayHeight;
      const even = (v) => 2 * Math.round(v / 2);
      const x = even(vis.x + r.x * sx), y = even(vis.y + r.y * sy);
      const cw = Math.min(even(r.w * sx), vis.x + vis.width - x), ch = Math.min(even(r.h * sy), vis.y + vis.height - y);
      if (!this.cropImage || this.cropImage.width !== cw || this.cropImage.height !== ch) {
        this.cropImage = new ImageData(cw, ch);
        this.cropCanvas = Object.assign(document.createElement('canvas'), { width: cw, height: ch });
        this.cropCtx = this.cropCanvas.getContext('2d', { alpha: false });
      }
      try {
        await frame.copyTo(this.cropImage.data, { rect: { x, y, width: cw, height: ch }, format: 'RGBX' });
        if (cw === w && ch === h) return new ImageData(new Uint8ClampedArray(this.cropImage.data), w, h);
        this.cropCtx.putImageData(this.cropImage, 0, 0);
        return this.scaled(this.cropCanvas, 0, 0, cw, ch);
      } catch (e) {
        this.copyToFails = true;
      }
    }
    return this.scaled(frame, r.x, r.y, r.w, r.h);
  }

  /** Send the pixels of a live frame (RGBA ImageData at the input size) that appeared at ``born``. */
  sendImage(image, born, now) {
    const data = toRgb(image.data, this.rgb);
    this.rgb = data;
    const seq = ++this.seq;
    if (this.app.conn.sendBinary({ type: 'frame', seq, w: image.width, h: image.height, format: 'rgb', source: this.mode }, data)) {
      this.sent++;
      this.lastSendAt = now;
      this.remember(seq, born, image);
    }
  }

  /** Keep frame ``seq`` until its result arrives (the 16 newest: older ones only wait for results of
   * frames the server failed). */
  remember(seq, born, image) {
    this.onTheirWay.set(seq, { born, image });
    if (this.onTheirWay.size > 16) this.onTheirWay.delete(this.onTheirWay.keys().next().value);
  }

  /** Show a live frame's pixels (those of the result being drawn) in the input canvas. */
  showInput(image) {
    this.ctx.putImageData(image, 0, 0);
  }

  /** A result for frame seq arrived: returns what the page kept of that frame, {born, image} (see
   * ``onTheirWay``), or null; frames sent before it are forgotten. A camera frame that appeared while
   * the cap held it back is sent at once, before the result is drawn, so that the server computes it
   * meanwhile. */
  onResult(seq, serverMs) {
    if (seq === null || seq === undefined) return null;
    if (seq > this.lastResult) this.lastResult = seq;
    this.lastResultAt = performance.now();
    if (Number.isFinite(serverMs)) this.serverMs = this.serverMs ? 0.8 * this.serverMs + 0.2 * serverMs : serverMs;
    if (this.frameFresh && this.streaming && !this.server) this.sendFrame(false);
    const kept = this.onTheirWay.get(seq) ?? null;
    for (const k of this.onTheirWay.keys()) {
      if (k > seq) break;
      this.onTheirWay.delete(k);
    }
    return kept;
  }

  /** A frame failed on the server: count it as answered so the camera keeps going. */
  onFailed(seq) {
    if (Number.isInteger(seq) && seq > this.lastResult) this.lastResult = seq;
  }

  /** Draw a still input (JPEG bytes from the server) into the input canvas. */
  async drawStill(jpeg) {
    const bmp = await createImageBitmap(new Blob([jpeg], { type: 'image/jpeg' }));
    this.ctx.drawImage(bmp, 0, 0, this.canvas.width, this.canvas.height);
    bmp.close();
  }
}
