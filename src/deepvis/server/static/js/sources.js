// Inputs: the camera, a video file, an uploaded image or a sample photo. Camera and video frames
// are cropped and resized here exactly as the model's preprocessing would (resize the shorter side
// to size / crop_pct, center-crop) and sent as raw RGBA at the model's input size.

/** At most this many frames on their way (sent, no result yet). Camera frames that appear meanwhile
 * are skipped except the newest, which is sent the moment a result comes back. One in flight gives
 * the lowest latency with nearly the same rate as two (measured with benchmarks/bench_live.py on
 * 2 cores: p95 ~95 ms at ~24 frames/s, against ~125 ms at ~26 frames/s). The URL may set it:
 * &inflight=1..4. */
const MAX_IN_FLIGHT = Math.max(1, Math.min(4, Number(new URLSearchParams(location.search).get('inflight')) || 1));
/** Without any result for this long, send anyway (a lost frame must not stall the camera). */
const STALL_MS = 1000;

export class Sources {
  /**
   * app: {conn, token, session(), inputSize: [h, w], cropPct, showError(msg), onSourceChange(mode, name)}
   */
  constructor(app, video, canvas) {
    this.app = app;
    this.video = video;
    this.canvas = canvas;
    this.ctx = canvas.getContext('2d', { alpha: false, willReadFrequently: true });
    this.mode = 'none'; // 'camera' | 'video' | 'image' | 'sample' | 'none'
    this.name = '';
    this.frozen = false;
    this.stream = null;
    this.objectUrl = null;
    this.seq = 0;
    this.lastResult = 0;
    this.lastSendAt = 0;
    this.sentAt = new Map();
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
    this.canvas.width = inputSize[1];
    this.canvas.height = inputSize[0];
  }

  // -- choosing a source --------------------------------------------------------------------------
  stopLive() {
    clearTimeout(this.serverTimer);
    this.server = null;
    this.file = null;
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

  async startCamera() {
    if (!navigator.mediaDevices?.getUserMedia) {
      this.app.showError('this browser gives no camera access here (a camera needs http://localhost or https)');
      return;
    }
    this.stopLive();
    try {
      this.stream = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 30 } }, audio: false });
    } catch (e) {
      this.app.showError(`no camera: ${e.message || e.name}`);
      return;
    }
    this.video.srcObject = this.stream;
    this.setMode('camera', 'camera');
    await this.video.play();
    this.pump();
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
    this.sentAt.set(seq, now);
    if (this.sentAt.size > 256) this.sentAt.delete(this.sentAt.keys().next().value);
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
    return this.mode === 'camera' || this.mode === 'video';
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
    if (!this.frozen) this.pump();
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
      if (!this.live || this.frozen || (this.mode === 'video' && (v.paused || v.ended))) {
        this.pumping = false;
        return;
      }
      this.videoFrames++;
      // a new frame is on screen: remember when it appeared (latency counts from there) and send it,
      // or, when the cap is reached, keep it for the moment the next result arrives
      if (this.frameFresh) this.skipped++; // the previous frame was never sent: replaced by this one
      this.frameAt = meta?.presentationTime ?? now ?? performance.now();
      this.frameFresh = true;
      this.sendFrame(false);
      if (v.requestVideoFrameCallback) v.requestVideoFrameCallback(next);
      else requestAnimationFrame(next);
    };
    if (v.requestVideoFrameCallback) v.requestVideoFrameCallback(next);
    else requestAnimationFrame(next);
  }

  /** Crop/resize the current video frame into the canvas and send it; force ignores the in-flight cap. */
  sendFrame(force) {
    const v = this.video;
    const conn = this.app.conn;
    if (!conn.open || !v.videoWidth) return;
    const now = performance.now();
    const inFlight = this.seq - this.lastResult;
    if (!force && inFlight >= MAX_IN_FLIGHT && now - this.lastSendAt < STALL_MS) return; // sent on the next result
    const [h, w] = this.inputSize;
    const iw = v.videoWidth, ih = v.videoHeight;
    const ratio = Math.max(h, w) / this.cropPct / Math.min(iw, ih);
    const nw = Math.max(w, Math.round(iw * ratio)), nh = Math.max(h, Math.round(ih * ratio));
    const left = Math.floor((nw - w) / 2), top = Math.floor((nh - h) / 2);
    this.ctx.drawImage(v, left / ratio, top / ratio, w / ratio, h / ratio, 0, 0, w, h);
    const data = this.ctx.getImageData(0, 0, w, h).data;
    const seq = ++this.seq;
    const born = this.frameFresh && this.frameAt <= now ? this.frameAt : now;
    this.frameFresh = false;
    if (conn.sendBinary({ type: 'frame', seq, w, h, format: 'rgba', source: this.mode }, data)) {
      this.sent++;
      this.lastSendAt = now;
      this.sentAt.set(seq, born);
      if (this.sentAt.size > 256) this.sentAt.delete(this.sentAt.keys().next().value);
    }
  }

  /** A result for frame seq arrived: returns its latency in ms (frame on screen → now), or null.
   * A camera frame that appeared while the cap held it back is sent at once. */
  onResult(seq) {
    if (seq === null || seq === undefined) return null;
    if (seq > this.lastResult) this.lastResult = seq;
    if (this.frameFresh && this.live && !this.frozen && !this.server) this.sendFrame(false);
    const t = this.sentAt.get(seq);
    for (const k of this.sentAt.keys()) {
      if (k > seq) break;
      this.sentAt.delete(k);
    }
    return t === undefined ? null : performance.now() - t;
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
