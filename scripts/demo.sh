#!/usr/bin/env bash
# The README's main command: build, start cortexd on its embedded defaults, feed it real
# commit subjects (samples/), let it route and run them, and show the audit trail.
# Everything it writes stays under .demo/ (set as XDG_DATA_HOME, XDG_RUNTIME_DIR and
# XDG_CONFIG_HOME).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
n="${DEMO_TASKS:-300}"
"$root/scripts/install-deps.sh"
"$root/scripts/build.sh" -DCORTEX_BUILD_TESTS=OFF
bin="$root/build/bin"

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

say "starting cortexd on its embedded defaults"
"$bin/cortexd"
trap 'kill "$(ctl status --json | sed -n "s/.*\"pid\": \([0-9]*\).*/\1/p")" 2>/dev/null || true' EXIT
ctl status

say "feeding $n real tasks: commit subjects from vuejs/core (samples/README.md), repo=$root"
start=$(date +%s%N)
tail -n +2 "$root/samples/vuejs_core-sample.tsv" | head -n "$n" | cut -f5 |
  while IFS= read -r text; do ctl submit "$text" --tag "repo=$root" >/dev/null; done
echo "submitted $n tasks; waiting for them to finish"
for _ in $(seq 1 600); do
  s=$(ctl status --json)
  q=$(sed -n 's/.*"queue_depth": \([0-9]*\).*/\1/p' <<<"$s")
  r=$(sed -n 's/.*"inflight": \([0-9]*\).*/\1/p' <<<"$s")
  [ "$q" = 0 ] && [ "$r" = 0 ] && break
  sleep 0.2
done
ms=$(( ($(date +%s%N) - start) / 1000000 ))
echo "all $n submitted and finished in ${ms} ms"

say "a task that names a security concern: the rule fires and the security expert runs"
ctl submit "check for leaked credentials and tokens before release" --tag "repo=$root" --wait | head -n 3

say "cortexctl experts"
ctl experts
say "cortexctl history --limit 12"
ctl history --limit 12
say "cortexctl show (the newest task)"
ctl show "$(ctl history --limit 1 --json | sed -n 's/.*"id": "\([0-9a-f]*\)".*/\1/p' | head -n1)"
say "cortexctl route (dry run)"
ctl route "fix XSS injection in the template compiler"
say "cortexctl retrain --wait (a candidate from the outcomes so far, validated off-policy)"
ctl retrain --wait
say "cortexctl models"
ctl models
say "cortexctl confidence"
ctl confidence
say "cortexctl status"
ctl status
echo
env="XDG_DATA_HOME=$demo/data XDG_RUNTIME_DIR=$demo/run XDG_CONFIG_HOME=$demo/config"
echo "cortexd stops now; the store stays at $demo/data/cortex/cortex.db. To look again:"
echo "  export $env"
echo "  $bin/cortexd && $bin/cortexctl history    # cortexd prints its pid: kill it when done"
