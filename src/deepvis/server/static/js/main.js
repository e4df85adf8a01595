// The live toolbox page: puts its parts together.
//   state.js     what the page knows (hello, settings, last results) and its live figures
//   link.js      the conversation with the server (over net.js's WebSocket)
//   panes.js     drawing
//   controls.js  the controls built from hello, mouse and keys, and what they do
//   sources.js   inputs (camera, video, image, samples); atlas.js: "what the unit likes"
//   summary.js   the selected layer's summary (sparsity, dead and most active units)
//   probe.js     the tests' read-only window into the figures, only with &test=1 in the URL

import { $ } from './dom.js';
import { AtlasPane } from './atlas.js';
import { Controls } from './controls.js';
import { Link } from './link.js';
import { Panes } from './panes.js';
import { installProbe } from './probe.js';
import { Sources } from './sources.js';
import { SummaryPane } from './summary.js';
import { Figures, PageState } from './state.js';

class App {
  constructor() {
    this.state = new PageState(new URLSearchParams(location.search));
    this.figures = new Figures();
    installProbe(this.figures);
    this.token = this.state.token;
    this.link = new Link(this);
    this.conn = this.link.conn;
    this.panes = new Panes(this);
    this.sources = new Sources(this, $('video'), $('input-canvas'));
    this.atlas = new AtlasPane(this, $('atlas-pane'));
    this.controls = new Controls(this);
    this.summary = new SummaryPane(this);
    if (!this.token) {
      this.showError('this page needs the URL that deepvis serve printed (it ends with ?token=...)', true);
      return;
    }
    this.link.connect();
  }

  // what the parts ask of each other
  session() {
    return this.state.sessionId;
  }

  get pattern() {
    return this.state.pattern;
  }

  sendSettings(partial) {
    this.link.sendSettings(partial);
  }

  showError(message, sticky = false) {
    this.panes.showError(message, sticky);
  }

  redrawGrid() {
    this.panes.redrawGrid();
  }

  onSourceChange(mode, name) {
    this.controls.sourceChanged(mode, name);
  }

  onVideoState() {
    const v = this.sources.videoState;
    this.panes.videoState(v);
    if (v.ended) this.figures.videoEnded = true;
  }
}

window.addEventListener('DOMContentLoaded', () => new App());
