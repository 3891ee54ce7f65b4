// Shared by the pages Cortex writes (report, replay): the data, one section per plot,
// Chart.js with common options, and the record the browser test reads: how many points
// each plot drew (window.__cortexPlots) and that drawing is over (window.__cortexReady).
'use strict';
const Cortex = (() => {
  const data = JSON.parse(document.getElementById('cortex-data').textContent);
  window.__cortexData = data;
  window.__cortexPlots = {};
  const main = document.getElementById('plots');
  const palette = ['#3366cc', '#dc3912', '#ff9900', '#109618', '#990099', '#0099c6',
                   '#dd4477', '#66aa00', '#b82e2e', '#316395', '#994499', '#22aa99'];
  // A colour by index, or by name: an expert or event keeps its colour from page to page.
  const color = (i, alpha) => {
    if (typeof i === 'string') {
      let h = 0;
      for (const ch of i) h = (h * 31 + ch.codePointAt(0)) >>> 0;
      i = h;
    }
    const c = palette[i % palette.length];
    if (alpha === undefined) return c;
    const n = parseInt(c.slice(1), 16);
    return `rgba(${n >> 16},${(n >> 8) & 255},${n & 255},${alpha})`;
  };
  const el = (tag, text, cls) => {
    const e = document.createElement(tag);
    if (text !== undefined) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  };
  const section = (title, note) => {
    const s = el('section');
    s.appendChild(el('h2', title));
    if (note) s.appendChild(el('p', note, 'note'));
    main.appendChild(s);
    return s;
  };
  const pad = (n) => String(n).padStart(2, '0');
  // Local time: in full for the summary; on an axis, as short as the span allows.
  const span = (data.until || 0) - (data.since || 0);
  const parts = (t) => {
    const d = new Date(t * 1000);
    return {day: `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`,
            hms: `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`,
            ms: String(d.getMilliseconds()).padStart(3, '0'), md: `${pad(d.getMonth() + 1)}-${pad(d.getDate())}`,
            hm: `${pad(d.getHours())}:${pad(d.getMinutes())}`};
  };
  const time = (t) => { const p = parts(t); return `${p.day} ${p.hms}`; };
  const iso = (s) => time(Date.parse(s) / 1000);  // the daemon's UTC times, shown local
  const tick = (t) => {
    const p = parts(t);
    return span < 20 ? `${p.hms}.${p.ms}` : span < 86400 ? p.hms : `${p.md} ${p.hm}`;
  };
  const pct = (x) => (x === null || x === undefined ? '-' : `${(100 * x).toFixed(1)}%`);
  const num = (x, digits) => (x === null || x === undefined ? '-' : Number(x).toFixed(digits));
  // Success over the last k buckets: sum(ok) / sum(done), null where nothing was done.
  const rolling = (ok, done, k) => ok.map((_, i) => {
    let o = 0, n = 0;
    for (let j = Math.max(0, i - k + 1); j <= i; ++j) o += ok[j], n += done[j];
    return n > 0 ? o / n : null;
  });
  // A plot: a section with a canvas, drawn without animation (the page is a document,
  // and a screenshot must show the final state). A plot that fails says so on the page
  // and in the console (where the browser test sees it) and the others still draw.
  const plot = (id, title, note, config, height) => {
    const s = section(title, note);
    const box = el('div', undefined, 'plot');
    if (height) box.style.height = `${height}px`;
    const canvas = el('canvas');
    canvas.id = `plot-${id}`;
    box.appendChild(canvas);
    s.appendChild(box);
    config.options = Object.assign(
        {animation: false, responsive: true, maintainAspectRatio: false}, config.options || {});
    try {
      new Chart(canvas, config);
      // What is drawn: a number, an {x, y} with a y, or a [low, high] bar with both ends.
      const drawn = (v) => (typeof v === 'number' && isFinite(v)) ||
          (Array.isArray(v) && v.length === 2 && v.every((e) => typeof e === 'number')) ||
          (v !== null && typeof v === 'object' && !Array.isArray(v) && typeof v.y === 'number');
      let points = 0;
      for (const ds of config.data.datasets) points += ds.data.filter(drawn).length;
      window.__cortexPlots[id] = points;
    } catch (e) {
      box.textContent = `This plot could not be drawn: ${e}`;
      console.error(`plot ${id}: ${e}`);
    }
    return s;
  };
  // A table under `parent` (a section): headers, then rows of cells; numbers align right.
  const table = (parent, headers, rows) => {
    const t = el('table');
    const head = el('tr');
    for (const h of headers) head.appendChild(el('th', h));
    t.appendChild(head);
    for (const r of rows) {
      const tr = el('tr');
      for (const c of r) tr.appendChild(el('td', String(c), typeof c === 'number' ? 'num' : ''));
      t.appendChild(tr);
    }
    parent.appendChild(t);
  };
  const timeAxis = (title) => ({
    type: 'linear',
    min: data.since,
    max: data.until,
    title: {display: true, text: title},
    ticks: {callback: (v) => tick(v), maxRotation: 0, autoSkipPadding: 24},
  });
  const summary = (text) => { document.getElementById('summary').textContent = text; };
  const done = () => { window.__cortexReady = true; };
  return {data, color, section, plot, table, time, iso, timeAxis, pct, num, rolling, summary, done};
})();
