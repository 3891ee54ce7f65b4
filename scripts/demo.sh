#!/usr/bin/env bash
# The README's main command: build, start cortexd with one simulated expert per role of the
# commit corpus, feed it 3,000 real commit subjects in order and show the router learning
# which expert to pick (success per window, retrains and their verdicts); then run the
# bundled inventory and security experts on this checkout, show the audit, write the report.
# Everything it writes stays under .demo/ (set as XDG_DATA_HOME, XDG_RUNTIME_DIR and
# XDG_CONFIG_HOME); the daemon is stopped when it ends.
#
# DEMO_BIN=DIR (a folder holding cortexd and cortexctl, e.g. build/bin) skips installing
# packages and building, for tests and for a second run. DEMO_TASKS (default: all 3,000)
# and DEMO_WINDOW (tasks per progress line, default 300) shorten or reshape the run.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
sample="$root/samples/vuejs_core-demo.tsv"
n="${DEMO_TASKS:-3000}"
w="${DEMO_WINDOW:-300}"
if [ -n "${DEMO_BIN:-}" ]; then
  bin="$(cd "$DEMO_BIN" && pwd)"
else
  "$root/scripts/install-deps.sh"
  "$root/scripts/build.sh" -DCORTEX_BUILD_TESTS=OFF
  bin="$root/build/bin"
fi
command -v jq >/dev/null || { echo "demo.sh: needs jq (scripts/install-deps.sh installs it)" >&2; exit 1; }

demo="$root/.demo"
rm -rf "$demo"
mkdir -p "$demo/data" "$demo/run" "$demo/config"
chmod 700 "$demo/run"
# (XDG_CONFIG_HOME too: a config of the user's own would otherwise be read.)
export XDG_DATA_HOME="$demo/data" XDG_RUNTIME_DIR="$demo/run" XDG_CONFIG_HOME="$demo/config"
unset CORTEX_SOCKET
ctl() { "$bin/cortexctl" "$@"; }
# Headings in bold on a terminal, plain in a log.
if [ -t 1 ]; then say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }; else say() { printf '\n== %s\n' "$*"; }; fi
pct() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f%%", b ? 100 * a / b : 0 }'; }

say "starting cortexd with scripts/demo/cortex.yaml: 8 role experts beside the bundled ones"
config="$root/scripts/demo/cortex.yaml"
pid=""
# At exit, stop the daemon and wait until it is gone (running attempts finish first).
stop() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  echo "demo.sh: cortexd (pid $pid) is still running" >&2
}
trap stop EXIT
"$bin/cortexd" --config "$config"  # detaches once its socket serves
pid=$(ctl status --json | jq .pid)
ctl status

cat <<EOF

About the eight role experts (bugfix, feature, docs, cicd, testing, performance,
refactor, maintenance): they are SIMULATED GRADERS, not real workers. Each runs
scripts/demo/grade.awk, which looks the task up in the sample and succeeds only when the
commit's real Conventional Commit type belongs to its role. Why: a router can only learn
when outcomes depend on choosing the right expert, and real experts for these roles
would be LLM agents or people, too slow and costly for a demo. The graders know each
commit's type; the router never sees it (no tag, no rule): it starts from the experts'
manifests (description, keywords, examples) and learns from which picks succeeded.
"First-pick success" counts the router's first choice, its 5% exploration included; a
failed pick falls back to the runner-up, which is not counted.
EOF
# The task texts (column 5), the first $n rows after the header. (awk reads to the end: a
# head(1) here would stop its writer with SIGPIPE, which pipefail turns into a failure.)
awk -F'\t' -v n="$n" 'NR > 1 && NR <= n + 1 { print $5 }' "$sample" >"$demo/tasks.txt"
n=$(wc -l <"$demo/tasks.txt")
last_k=$(( n % w ? n % w : w ))  # the size of the last window

say "before any outcome: the untrained router on the last $last_k tasks (dry runs)"
# What the router would pick for the last window's tasks before it has seen a single
# outcome (model v0: the manifests and the built-in rules), graded by the same grader.
# `route` records nothing, so this leaves the run below untouched.
prior_ok=0
while IFS= read -r text; do
  e=$(ctl route --no-repo --json -- "$text" | jq -r '.candidates[0].expert')
  CORTEX_TASK_TEXT="$text" awk -v role="$e" -f "$root/scripts/demo/grade.awk" "$sample" >/dev/null &&
    prior_ok=$((prior_ok + 1))
done < <(tail -n "$last_k" "$demo/tasks.txt")
echo "  its first pick would be right for $prior_ok of $last_k ($(pct "$prior_ok" "$last_k"))"

say "feeding $n commit subjects from vuejs/core (samples/README.md), $w per line"
# One task at a time, in the corpus's order, so each decision uses all outcomes before it
# and the experts are never busy (load would bias routing). After each window the daemon
# is drained and the window's tasks are exactly the newest $w in the history.
# Waits until nothing is queued or running (each grader has a 10 s timeout).
drain() {
  for _ in $(seq 1 600); do
    [ "$(ctl status --json | jq '.queue_depth + .inflight')" = 0 ] && return 0
    sleep 0.1
  done
  echo "demo.sh: tasks still queued or running after a minute" >&2
  return 1
}
start=$(date +%s)
done_n=0 seen_v=0 first="" last=""
while [ "$done_n" -lt "$n" ]; do
  k=$(( n - done_n < w ? n - done_n : w ))
  sed -n "$((done_n + 1)),$((done_n + k))p" "$demo/tasks.txt" |
    while IFS= read -r text; do ctl submit - --no-repo <<<"$text" >/dev/null; done
  drain
  done_n=$((done_n + k))
  ok=$(ctl history --json --limit "$k" |
    jq '[.[] | select(.outcome == "success" and (.chosen // .expert) == .expert)] | length')
  [ -n "$first" ] || first="$ok/$k"
  last="$ok/$k"
  v=$(ctl status --json | jq -r .model_version)
  printf '  %5d/%d tasks  first-pick success %6s (%d/%d)  live model %s  %3ds\n' \
    "$done_n" "$n" "$(pct "$ok" "$k")" "$ok" "$k" "$v" "$(( $(date +%s) - start ))"
  # Retrains finished since the last line: the verdict and the estimates (95% intervals)
  # on held-out decisions the candidate never saw, against what the live system did there.
  models=$(ctl models --json)  # read once: a retrain may finish meanwhile
  jq -r --argjson after "$seen_v" '
    def p: . * 100 | round | tostring;
    .models[] | select(.version > $after) | .metrics as $m |
    "      retrain \(.name): \(.status) (trained on \($m.train_rows), held out \($m.holdout_rows):" +
    " candidate \($m.candidate.value | p)% [\($m.candidate.low | p)-\($m.candidate.high | p)]" +
    " vs live then \($m.live.value | p)% [\($m.live.low | p)-\($m.live.high | p)]" +
    (if $m.clipped then ", too uncertain: clipped" else "" end) + ")"' <<<"$models"
  seen_v=$(jq '[.models[].version] | max' <<<"$models")
done
printf '\nbefore and after: first-pick success\n'
printf '  first %4d tasks  %6s  starting from the manifests, learning as it went\n' \
  "${first#*/}" "$(pct "${first%/*}" "${first#*/}")"
printf '  last  %4d tasks  %6s  the untrained router would have had %s; now model %s, %d retrains\n' \
  "$last_k" "$(pct "${last%/*}" "${last#*/}")" "$(pct "$prior_ok" "$last_k")" \
  "$(ctl status --json | jq -r .model_version)" "$seen_v"

say "real work: the bundled security and inventory experts on this checkout ($root)"
# Policy rules in scripts/demo/cortex.yaml send these there (the graders fail other text).
ctl submit "check for leaked credentials and tokens before release" --tag "repo=$root" --wait | sed -n 1,3p
ctl submit "catalog the languages and build manifests of this repository" --tag "repo=$root" --wait | sed -n 1,9p

say "cortexctl experts"
ctl experts
say "cortexctl history --limit 10"
ctl history --limit 10
say "cortexctl confidence"
ctl confidence
say "cortexctl models"
ctl models
say "cortexctl report"
ctl report --html "$demo/report.html"  # prints the page's path
echo
env="XDG_DATA_HOME=$demo/data XDG_RUNTIME_DIR=$demo/run XDG_CONFIG_HOME=$demo/config"
echo "cortexd stops now; the store stays at $demo/data/cortex/cortex.db. To look again:"
echo "  export $env"
echo "  $bin/cortexd --config $config && $bin/cortexctl history    # cortexd prints its pid: kill it when done"
