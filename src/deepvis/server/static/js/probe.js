// The tests' window into the page. Only a page opened with `&test=1` in its URL has it
// (tests/test_browser.py and benchmarks/bench_live.py open it so): `window.deepvis` is then a
// read-only view of the live figures (state.js, Figures: frames drawn, latencies, the last result's
// header, ...), which they poll with page.evaluate. Any other page carries no global at all.

/** Install window.deepvis when the URL asks for it (`test=1`). */
export function installProbe(figures) {
  if (new URLSearchParams(location.search).get('test') !== '1') return;
  const probe = {};
  for (const key of Object.keys(figures)) {
    if (key !== 'resultTimes') Object.defineProperty(probe, key, { enumerable: true, get: () => figures[key] });
  }
  window.deepvis = Object.freeze(probe);
}
