#!/usr/bin/env bash
# The README's test command: install what is missing, build, run the whole suite; then
# the whole suite again under AddressSanitizer + UndefinedBehaviorSanitizer, and the
# daemon's concurrency tests under ThreadSanitizer (CORTEX_SANITIZERS=off skips both).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
jobs="$(nproc)"
"$root/scripts/install-deps.sh"
"$root/scripts/build.sh" "$@"
(cd "$root/build" && ctest -j "$jobs" --output-on-failure --timeout 300)

[ "${CORTEX_SANITIZERS:-on}" = off ] && exit 0
sanitized() {  # folder, sanitizers, ctest arguments...
  local dir="$root/$1" san="$2"
  shift 2
  echo "== tests under -fsanitize=$san"
  cmake -S "$root" -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCORTEX_CUDA=OFF \
        -DCORTEX_SANITIZE="$san" >/dev/null
  cmake --build "$dir" -j "$jobs"
  (cd "$dir" && ctest -j "$jobs" --output-on-failure --timeout 600 "$@")
}
# Findings are fatal, in the tests and in every cortexd they start.
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:strict_string_checks=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1"
sanitized build-asan address,undefined
sanitized build-tsan thread -R "E2E|StoreTest|Gating|Replay"
