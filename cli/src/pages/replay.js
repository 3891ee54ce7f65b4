// `cortex-bench replay --html`: the learning curve of the router on a real task stream
// against its baselines, and where its choices went (bench/replay.cc writes the data).
'use strict';
(() => {
  const d = Cortex.data, c = d.curve, base = d.baselines;
  const xy = (ys) => ys.map((y, i) => ({x: c.at[i], y: y}));
  Cortex.summary(`${d.rows} tasks replayed in order. Online success ${Cortex.pct(d.online_success)} ` +
      `(exploration included); final greedy policy on the last 20%: ${Cortex.pct(d.policy_last20)}, ` +
      `against majority ${Cortex.pct(base.majority_last20)}, rules+prior ${Cortex.pct(base.prior_last20)} ` +
      `and full information ${Cortex.pct(base.full_info_last20)}. ${d.retrains} retrains, ` +
      `${d.promotions} promoted.`);
  const promoted = d.retrain_marks.filter((m) => m.promoted);
  const refused = d.retrain_marks.filter((m) => !m.promoted);
  const onCurve = (task) => {  // a retrain's marker sits on the online curve
    let k = c.at.findIndex((a) => a >= task);
    if (k < 0) k = c.at.length - 1;
    return c.online[k];
  };
  Cortex.plot('curve', 'Learning curve',
      `Success over the trailing ${c.window} tasks. Online: the router as it learns, choosing ` +
      'before it sees each outcome. Rules+prior: the same router never trained. Majority: ' +
      'always the most frequent role so far. Full information: a model trained once on ' +
      "every expert's outcome (not only the chosen one's) for the first 80% of the stream, " +
      'measured on the last 20%; the learning router keeps learning there, so it can pass ' +
      'it. Diamonds: retrains (filled: promoted; hollow: refused).', {
        type: 'line',
        data: {datasets: [
          {label: 'online (learning)', data: xy(c.online), borderColor: Cortex.color(0),
           backgroundColor: Cortex.color(0), pointRadius: 0, borderWidth: 2},
          {label: 'rules+prior', data: xy(c.prior), borderColor: Cortex.color(2),
           backgroundColor: Cortex.color(2), pointRadius: 0, borderWidth: 1.5},
          {label: 'majority so far', data: xy(c.majority), borderColor: '#888',
           backgroundColor: '#888', pointRadius: 0, borderWidth: 1.5, borderDash: [4, 3]},
          {label: 'full information (last 20%)', borderColor: Cortex.color(3),
           backgroundColor: Cortex.color(3), pointRadius: 0, borderWidth: 2, borderDash: [8, 4],
           data: [{x: d.split80, y: base.full_info_last20}, {x: d.rows, y: base.full_info_last20}]},
          {label: 'retrain, promoted', type: 'scatter', pointStyle: 'rectRot', pointRadius: 5,
           borderColor: '#333', backgroundColor: '#333',
           data: promoted.map((m) => ({x: m.task, y: onCurve(m.task)}))},
          {label: 'retrain, refused', type: 'scatter', pointStyle: 'rectRot', pointRadius: 5,
           borderColor: '#333', backgroundColor: 'rgba(0,0,0,0)',
           data: refused.map((m) => ({x: m.task, y: onCurve(m.task)}))},
        ]},
        options: {scales: {
          x: {type: 'linear', min: 0, max: d.rows, title: {display: true, text: 'tasks replayed'}},
          y: {min: 0, max: 1, title: {display: true, text: 'success rate'},
              ticks: {callback: (v) => `${Math.round(v * 100)}%`}},
        }},
      }, 420);
  const experts = Object.keys(c.share).sort();  // a colour each, by its place
  Cortex.plot('share', "Each expert's share of the online choices",
      `Over the trailing ${c.window} tasks: where the learning router sent the work.`, {
        type: 'line',
        data: {datasets: experts.map((e, i) => ({
          label: e, data: xy(c.share[e]), fill: i === 0 ? 'origin' : '-1', pointRadius: 0,
          borderWidth: 1, borderColor: Cortex.color(i), backgroundColor: Cortex.color(i, 0.55),
        }))},
        options: {scales: {
          x: {type: 'linear', min: 0, max: d.rows, title: {display: true, text: 'tasks replayed'}},
          y: {stacked: true, min: 0, max: 1, ticks: {callback: (v) => `${Math.round(v * 100)}%`}},
        }},
      });
  const s = Cortex.section('By tenth of the stream', 'Online success in each tenth of the stream.');
  Cortex.table(s, ['tenth', ...d.online_success_by_decile.map((_, i) => i + 1)],
               [['online success', ...d.online_success_by_decile.map((x) => Cortex.pct(x))]]);
  Cortex.done();
})();
