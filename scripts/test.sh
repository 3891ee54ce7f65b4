#!/usr/bin/env bash
# The README's test command: install what is missing, build, run the whole suite; then
# the whole suite again under AddressSanitizer + UndefinedBehaviorSanitizer, and the
# daemon's concurrency tests under ThreadSanitizer, then each libFuzzer target for
# CORTEX_FUZZ_SECONDS (default 20). CORTEX_SANITIZERS=off skips all three.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
jobs="$(nproc)"
# Each phase says when it starts: where CI's time goes is read off its log.
phase() { echo "== $* (at $((SECONDS / 60))m$((SECONDS % 60))s)"; }
"$root/scripts/install-deps.sh"
# Tests on explicitly: the demo builds the same folder with them off.
phase "build"
"$root/scripts/build.sh" -DCORTEX_BUILD_TESTS=ON "$@"
phase "tests"
(cd "$root/build" && ctest -j "$jobs" --output-on-failure --timeout 300)

[ "${CORTEX_SANITIZERS:-on}" = off ] && exit 0
sanitized() {  # folder, sanitizers, ctest arguments...
  local dir="$root/$1" san="$2"
  shift 2
  phase "build with -fsanitize=$san"
  # -O1: sanitizers need no more, and it builds faster.
  cmake -S "$root" -B "$dir" -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS=-O1 -DCORTEX_CUDA=OFF \
        -DCORTEX_SANITIZE="$san" >/dev/null
  cmake --build "$dir" -j "$jobs" ${targets:+--target $targets}
  phase "tests under -fsanitize=$san"
  (cd "$dir" && ctest -j "$jobs" --output-on-failure --timeout 600 "$@")
}
# Findings are fatal, in the tests and in every cortexd they start.
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:strict_string_checks=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1"
# The in-process plugin tests leave a deliberately hung plugin thread behind; LSan's
# stop-the-world tracer has crashed on such a thread at exit (its own fatal error, not a
# leak), so those run without leak checking and everything else with it. The soak
# benchmark's memory hog has no limit under ASan (see host_main.cc): it runs only above.
# The packaging checks (installed SDK, man pages, the unit file, completion scripts, the
# bench's help) read files the build wrote and run no new daemon code: plain run only.
plugin_suites="^Both/(RegistryTest|CommandTest|RepoExpertTest)\\..*/InProcess"
packaging="^Sdk\\.|^Unix\\.(Man|Cortexctl|Config|Systemd|Install)|^CliTest\\.Completion|^BenchTest\\.EveryOption"
# The demo is a script over cortexctl: the plain run checks it; the daemon paths it takes
# are the end-to-end tests'.
targets="" sanitized build-asan address,undefined -E "$plugin_suites|^BenchTest\\.Soak|$packaging|^Demo\\."
(cd "$root/build-asan" &&
 ASAN_OPTIONS="$ASAN_OPTIONS:detect_leaks=0" ctest -j "$jobs" --output-on-failure --timeout 600 -R "$plugin_suites")
# TSan: the tests where threads meet (daemon end to end, store, learner, readiness
# notified from the main and loader threads, cancelling queued and running tasks, the
# cluster's nodes and a database outage under them; PgServer is the PostgreSQL fixture). Left to the plain and ASan
# runs: the retrain cancellation test (a thousand outcomes take minutes under TSan), and
# tests of what a start refuses, of input checks and of kill -9 at random moments, whose
# threads the tests kept here drive too (kill -9 under load, concurrent submits, reload).
tsan_skip="AStopCancelsARetrain|ASecondNodeOfOneName|BadConfigRefusesToStart|NoTaskTextCanHang"
tsan_skip="$tsan_skip|ACrashIsToldFromAKill|SocketIsPrivate|KillNineAtRandomMoments"
# The learning suite runs on SQLite here (steps, checkpoints, explain and feedback on the
# trainer's, the server's and the pipeline's threads); its PostgreSQL half adds no thread.
targets="e2e_test store_test gating_test unix_test cli_test cluster_test learning_test cortex-test-pg" \
  sanitized build-tsan thread \
  -R "E2E|StoreTest|Gating|Unix\\.Readiness|CliTest\\.WaitCancel|Cluster|PgServer|Learning\\..*/sqlite" \
  -E "$tsan_skip"

# libFuzzer (clang): each target from its seed corpus, for a bounded time; a finding
# fails the run and leaves its input in build-fuzz/.
phase "fuzz targets build (clang)"
CC=clang CXX=clang++ cmake -S "$root" -B "$root/build-fuzz" -DCMAKE_BUILD_TYPE=None \
  -DCMAKE_CXX_FLAGS="-O2 -DNDEBUG" -DCMAKE_C_FLAGS="-O2 -DNDEBUG" \
  -DCORTEX_FUZZ=ON -DCORTEX_BUILD_TESTS=OFF -DCORTEX_CUDA=OFF >/dev/null
targets=(wire config manifest features)
cmake --build "$root/build-fuzz" -j "$jobs" --target "${targets[@]/#/fuzz_}"
phase "fuzzing, ${CORTEX_FUZZ_SECONDS:-20}s per target, $jobs at a time"
# One target per core at a time (each fuzzer is one process); each one's summary follows.
declare -A fuzz_pid
for t in "${targets[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 0.5; done
  mkdir -p "$root/build-fuzz/corpus-$t"
  (cd "$root/build-fuzz" && exec "$root/build-fuzz/bin/fuzz_$t" \
     -max_total_time="${CORTEX_FUZZ_SECONDS:-20}" -print_final_stats=1 \
     "$root/build-fuzz/corpus-$t" "$root/tests/fuzz/corpus/$t" >"$root/build-fuzz/fuzz_$t.log" 2>&1) &
  fuzz_pid[$t]=$!
done
fuzz_failed=0
for t in "${targets[@]}"; do
  wait "${fuzz_pid[$t]}" || fuzz_failed=1
  grep -E "^(stat::number_of_executed_units|Done|==|SUMMARY|artifact)" "$root/build-fuzz/fuzz_$t.log" |
    sed "s/^/fuzz_$t: /" || true
done
[ "$fuzz_failed" = 0 ] || { echo "fuzzing found a failure: see build-fuzz/fuzz_*.log" >&2; exit 1; }
phase "done"
