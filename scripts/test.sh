#!/usr/bin/env bash
# The README's test command: install what is missing, build, run the whole suite.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/scripts/install-deps.sh"
"$root/scripts/build.sh" "$@"
cd "$root/build"
ctest -j "$(nproc)" --output-on-failure --timeout 300
