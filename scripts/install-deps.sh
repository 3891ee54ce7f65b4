#!/usr/bin/env bash
# Installs the Debian packages Cortex builds with, only those missing (runs as root, or through
# sudo when available): clang for the fuzz targets, libsystemd-dev for sd_notify, scdoc for the
# man pages, and systemd, groff-base and man-db to test the unit and the pages; cpp-httplib for
# the /metrics endpoint, Chart.js for the HTML pages and chromium (with a font) to test them in
# a real browser; libpq-dev for the PostgreSQL store and postgresql, whose server the tests
# start on their own (initdb in a temporary folder). The CUDA toolkit is optional and never
# installed here.
set -euo pipefail
pkgs=(build-essential cmake pkg-config git sqlite3 libsqlite3-dev libboost-dev
      libyaml-cpp-dev libfmt-dev nlohmann-json3-dev libcli11-dev libopenblas-dev
      libgtest-dev libgmock-dev libre2-dev libjemalloc-dev clang libclang-rt-dev libpq-dev postgresql
      libsystemd-dev systemd scdoc groff-base man-db libcpp-httplib-dev libjs-chart.js chromium
      fonts-dejavu-core
      zsh fish)  # zsh, fish: the completion test checks their scripts
pkgs+=(jq)   # scripts/demo.sh reads cortexctl's --json output with it
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing: ${missing[*]}"
SUDO=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO=sudo
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
