// `cortexctl report --html`: what the router decided and how that went, from the
// aggregates cortexd computed in its store (wire::ToJson(ReportData)).
'use strict';
(() => {
  const d = Cortex.data, b = d.buckets;
  const n = b.start.length;
  const mid = b.start.map((t) => t + d.bucket_s / 2);  // a bucket is drawn at its middle
  const xy = (ys) => ys.map((y, i) => ({x: mid[i], y: y}));
  const sum = (a) => a.reduce((s, v) => s + v, 0);
  const firstDone = sum(b.first_done), firstOk = sum(b.first_ok);
  const every = d.bucket_s >= 7200 ? `${+(d.bucket_s / 3600).toPrecision(3)} h`
              : d.bucket_s >= 120 ? `${+(d.bucket_s / 60).toPrecision(3)} min`
              : `${+d.bucket_s.toPrecision(3)} s`;
  Cortex.summary(`${d.tasks} tasks from ${Cortex.time(d.since)} to ${Cortex.time(d.until)} ` +
                 `(local time), in ${n} buckets of ${every}. The router's first choice ` +
                 `succeeded in ${firstOk} of ${firstDone} finished first attempts ` +
                 `(${Cortex.pct(firstDone ? firstOk / firstDone : null)}).`);

  // Success over time, with the model that decided.
  const k = Math.max(1, Math.min(5, Math.round(n / 12)));
  const promoted = d.models.filter((m) => m.status === 'promoted');
  Cortex.plot('success', 'Success over time',
      `Rolling over ${k} bucket(s); a gap is a time without tasks. "First choice" is the ` +
      "router's own pick (its first " +
      'attempt); "task" counts fallbacks too. The grey steps are the model version that ' +
      'made the decisions (right axis); a triangle marks each promotion, at its version.', {
        type: 'line',
        data: {datasets: [
          {label: 'first choice succeeded', data: xy(Cortex.rolling(b.first_ok, b.first_done, k)),
           borderColor: Cortex.color(0), backgroundColor: Cortex.color(0), pointRadius: 2.5,
           spanGaps: false, yAxisID: 'y'},
          {label: 'task succeeded (fallbacks included)',
           data: xy(Cortex.rolling(b.succeeded, b.finished, k)), borderColor: Cortex.color(3),
           backgroundColor: Cortex.color(3), pointRadius: 2.5, spanGaps: false, yAxisID: 'y'},
          {label: 'model version', data: xy(b.model_version.map((v) => (v < 0 ? null : v))),
           stepped: true, borderColor: '#999', backgroundColor: '#999', pointRadius: 0,
           borderDash: [4, 3], spanGaps: false, yAxisID: 'v'},
          {label: 'model promoted', type: 'scatter', yAxisID: 'v', pointStyle: 'triangle',
           pointRadius: 6, borderColor: '#555', backgroundColor: '#555',
           data: promoted.map((m) => ({x: m.created_unix, y: m.version}))},
        ]},
        options: {scales: {
          x: Cortex.timeAxis('time'),
          y: {min: 0, max: 1, title: {display: true, text: 'success rate'},
              ticks: {callback: (v) => `${Math.round(v * 100)}%`}},
          v: {position: 'right', min: 0, title: {display: true, text: 'model version'},
              grid: {drawOnChartArea: false}, ticks: {precision: 0}},
        }},
      });

  // Each expert's share of the decisions. An expert has one colour on the page (by its
  // name's place among all the page's experts), an event kind one of its own.
  const experts = Object.keys(d.share);
  const everyExpert = [...new Set([...experts, ...d.calibration.map((c) => c.expert)])].sort();
  const ec = (e, alpha) => Cortex.color(everyExpert.indexOf(e), alpha);
  const kindsKnown = ['loaded', 'replaced', 'removed', 'refused', 'unavailable', 'crash',
                      'quarantined', 'released', 'retrain', 'rollback', 'crashed'];
  const kc = (k, alpha) => Cortex.color(kindsKnown.includes(k) ? kindsKnown.indexOf(k) : k, alpha);
  Cortex.plot('share', 'Share of decisions by expert',
      'Of the tasks decided in each bucket, the share the router gave each expert (its ' +
      'first choice, exploration included). No bar: no decision then.', {
        type: 'bar',
        data: {datasets: experts.map((e) => ({
          label: e, borderWidth: 0, backgroundColor: ec(e, 0.75),
          data: d.share[e].map((c, j) => (b.decided[j] ? {x: mid[j], y: c / b.decided[j]} : null))
              .filter((p) => p),
          barPercentage: 1, categoryPercentage: 0.95,
        }))},
        options: {scales: {
          x: Object.assign(Cortex.timeAxis('time'), {stacked: true}),
          y: {stacked: true, min: 0, max: 1, ticks: {callback: (v) => `${Math.round(v * 100)}%`}},
        }},
      });

  // Reliability of the router's confidence.
  const cal = d.calibration.filter((c) => c.n > 0);
  const calSection = Cortex.plot('calibration', 'Confidence against outcome (reliability)',
      "The router's confidence in the expert it chose, in ten bins, against how often that " +
      'first attempt succeeded. On the diagonal, confidence means what it says; the Brier ' +
      'score (lower is better) is the mean squared gap per decision. A larger point is a ' +
      'bin with more decisions.', {
        type: 'scatter',
        data: {datasets: [
          {label: 'perfect calibration', data: [{x: 0, y: 0}, {x: 1, y: 1}], showLine: true,
           borderColor: '#aaa', borderDash: [5, 4], pointRadius: 0},
          ...cal.map((c, i) => ({
            label: `${c.expert} (Brier ${Cortex.num(c.brier, 3)}, n=${c.n})`, showLine: true,
            borderColor: ec(c.expert), backgroundColor: ec(c.expert), clip: 8,
            data: c.bins.filter((x) => x.n > 0).map((x) => ({x: x.confidence, y: x.success})),
            pointRadius: c.bins.filter((x) => x.n > 0).map((x) => 2 + Math.min(6, Math.log10(x.n + 1) * 2)),
          })),
        ]},
        options: {scales: {
          x: {min: 0, max: 1, title: {display: true, text: 'confidence (bin mean)'}},
          y: {min: 0, max: 1, title: {display: true, text: 'observed success'}},
        }},
      }, 420);
  Cortex.table(calSection, ['expert', 'first attempts', 'Brier score'],
               cal.map((c) => [c.expert, c.n, Cortex.num(c.brier, 3)]));

  // Latency, submit to finish.
  const edges = d.latency.edges_s, counts = d.latency.counts;
  const label = (s) => (s < 1 ? `${+(s * 1000).toPrecision(3)} ms` : s < 60 ? `${+s.toPrecision(3)} s`
                       : s < 3600 ? `${+(s / 60).toPrecision(3)} min` : `${+(s / 3600).toPrecision(3)} h`);
  const labels = counts.map((_, i) => (i < edges.length ? `≤ ${label(edges[i])}` : `> ${label(edges[edges.length - 1])}`));
  let lo = counts.findIndex((c) => c > 0), hi = counts.length - 1;
  while (hi > lo && counts[hi] === 0) --hi;
  if (lo < 0) lo = 0;
  Cortex.plot('latency', 'Latency distribution',
      'Finished tasks by time from submit to finish (queueing, every attempt, and recording ' +
      'included).', {
        type: 'bar',
        data: {labels: labels.slice(lo, hi + 1),
               datasets: [{label: 'tasks', data: counts.slice(lo, hi + 1),
                           backgroundColor: Cortex.color(5, 0.7)}]},
        options: {scales: {y: {title: {display: true, text: 'tasks'}}}},
      }, 280);
  Cortex.plot('latency_time', 'Latency over time',
      'Mean and longest time from submit to finish of the tasks that finished in each bucket.', {
        type: 'line',
        data: {datasets: [
          {label: 'mean', data: xy(b.latency_mean_s.map((v, i) => (b.finished[i] ? v : null))),
           borderColor: Cortex.color(5), backgroundColor: Cortex.color(5), pointRadius: 1.5, spanGaps: false},
          {label: 'longest', data: xy(b.latency_max_s.map((v, i) => (b.finished[i] ? v : null))),
           borderColor: Cortex.color(1), backgroundColor: Cortex.color(1), pointRadius: 1.5, spanGaps: false},
        ]},
        options: {scales: {x: Cortex.timeAxis('time'),
                           y: {type: 'logarithmic', title: {display: true, text: 'seconds'}}}},
      }, 280);

  // Retrains: each candidate's estimate against the live system's, with 95% intervals.
  // One with too few held-out decisions has no estimate worth drawing (its verdict says
  // so): it is in the table only.
  const trained = d.models.filter((m) => m.metrics && m.metrics.candidate);
  const validated = (m) => (m.metrics.holdout_rows || 0) >= (m.metrics.min_holdout_rows || 0);
  const est = (m, which) => (validated(m) && m.metrics[which]) || {};
  const drawnRetrains = trained.filter(validated);
  let retrainSection;
  if (drawnRetrains.length) {
    retrainSection = Cortex.plot('retrains', 'Retrains and their verdicts',
        'Each retrain estimates, off-policy on held-out decisions, the success of the candidate ' +
        'model and of the live system as it decided them (bars: 95% intervals; points: ' +
        'estimates). A candidate is promoted only when estimated better.', {
          type: 'bar',
          data: {labels: drawnRetrains.map((m) => `v${m.version} ${m.status}`), datasets: [
            {label: 'candidate (95% interval)', data: drawnRetrains.map((m) => [est(m, 'candidate').low, est(m, 'candidate').high]),
             backgroundColor: Cortex.color(0, 0.35), borderColor: Cortex.color(0), borderWidth: 1},
            {label: 'live then (95% interval)', data: drawnRetrains.map((m) => [est(m, 'live').low, est(m, 'live').high]),
             backgroundColor: Cortex.color(2, 0.35), borderColor: Cortex.color(2), borderWidth: 1},
            {label: 'candidate estimate', type: 'line', showLine: false, pointRadius: 4,
             borderColor: Cortex.color(0), backgroundColor: Cortex.color(0),
             data: drawnRetrains.map((m) => est(m, 'candidate').value)},
            {label: 'live estimate', type: 'line', showLine: false, pointRadius: 4, pointStyle: 'rect',
             borderColor: Cortex.color(2), backgroundColor: Cortex.color(2),
             data: drawnRetrains.map((m) => est(m, 'live').value)},
          ]},
          options: {scales: {y: {min: 0, max: 1, title: {display: true, text: 'estimated success'}}}},
        }, 300);
  } else {
    retrainSection = Cortex.section('Retrains and their verdicts', trained.length
        ? 'No retrain in this window had enough held-out decisions for an estimate; the ' +
          'table says why.'
        : 'No model was trained in this window.');
  }
  if (trained.length)
    Cortex.table(retrainSection, ['model', 'made', 'verdict', 'candidate', 'live', 'difference', 'why'],
        trained.map((m) => [m.name, Cortex.iso(m.created), m.status, Cortex.num(est(m, 'candidate').value, 3),
                            Cortex.num(est(m, 'live').value, 3),
                            validated(m) ? `${Cortex.num(m.metrics.diff.value, 3)} ± ${Cortex.num(m.metrics.diff.ci, 3)}` : 'not validated',
                            m.metrics.reason || '']));

  // Expert events: plugin loads, refusals, crashes, quarantines, retrains.
  const kinds = Object.keys(d.events);
  if (kinds.length) {
    const s = Cortex.plot('events', 'Plugin and model events',
        'Events per bucket: plugin loads and replacements, refusals, crashes, quarantines, ' +
        'retrains and rollbacks (cortexctl events lists them).', {
          type: 'bar',
          data: {datasets: kinds.map((e, i) => ({
            label: e, backgroundColor: kc(e, 0.8),
            data: d.events[e].map((c, j) => (c ? {x: mid[j], y: c} : null)).filter((p) => p),
            barThickness: 6,
          }))},
          options: {scales: {x: Object.assign(Cortex.timeAxis('time'), {stacked: true}),
                             y: {stacked: true, title: {display: true, text: 'events'},
                                 ticks: {precision: 0}}}},
        }, 260);
    Cortex.table(s, ['time', 'event', 'expert', 'detail'],
                 d.recent_events.map((e) => [Cortex.iso(e.time), e.event, e.expert, e.detail]));
  } else {
    Cortex.section('Plugin and model events', 'No plugin or model events in this window.');
  }

  // The rules that fired most.
  if (d.rules.length) {
    Cortex.plot('rules', 'Most-fired rules',
        'Decisions in which each rule fired (a boost or a force from the configuration).', {
          type: 'bar',
          data: {labels: d.rules.map((r) => r.rule),
                 datasets: [{label: 'decisions', data: d.rules.map((r) => r.decisions),
                             backgroundColor: Cortex.color(6, 0.7)}]},
          options: {indexAxis: 'y', scales: {x: {ticks: {precision: 0}}}},
        }, Math.max(160, 40 + 26 * d.rules.length));
  } else {
    Cortex.section('Most-fired rules', 'No rule fired in this window.');
  }
  Cortex.done();
})();
