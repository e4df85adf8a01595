// DOM helpers. Text always goes through textContent: nothing from the server or a file name is
// ever parsed as HTML.

/** The element with this id (throws when the page lacks it: a bug, not a user error). */
export function $(id) {
  const e = document.getElementById(id);
  if (!e) throw new Error(`page element #${id} is missing`);
  return e;
}

/** Create an element: el('li', {className: 'x', title: 't'}, 'text', child, ...). */
export function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === 'dataset') Object.assign(e.dataset, v);
    else if (k === 'style') Object.assign(e.style, v);
    else if (k in e) e[k] = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

/** Show or hide an element, writing the attribute only when it changes: setting `hidden` to the value
 * it has still invalidates the element's style, and the live panes do it on every frame. */
export function setHidden(e, hidden) {
  if (e.hidden !== hidden) e.hidden = hidden;
}

/** Write an element's text only when it changes: each write lays the page out (and Chromium then
 * hit-tests the mouse position again). */
export function setText(e, text) {
  if (e.textContent !== text) e.textContent = text;
}

/** Replace an element's children. */
export function setChildren(parent, ...children) {
  parent.replaceChildren(...children.filter((c) => c !== null && c !== undefined));
}

/** Percentile of an array of numbers (p in 0..100). */
export function percentile(values, p) {
  if (!values.length) return NaN;
  const s = [...values].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))];
}

export function fmt(x, digits = 2) {
  return Number.isFinite(x) ? x.toFixed(digits) : '–';
}
