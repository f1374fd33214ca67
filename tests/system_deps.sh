#!/usr/bin/env bash
# What the tests need from the system beyond pip, set up by `make test` itself: Chromium (the HTML report tests
# open every page in it), curl and jq (the API tests run the original design's own curl | jq commands), exiftool
# (the XMP tests read back what Mondrian wrote with it, as a photo manager would), PostgreSQL (the shared-ledger
# tests) and, on Linux other than x86_64 (where pip brings oneMKL), OpenBLAS (MLX's CPU
# path is ~30x faster with either; the LoRA learning test needs one to finish in time) and strace (the durability test
# reads the daemon's fsyncs with it). On Debian/Ubuntu they are
# installed (as root, or through sudo); elsewhere this
# says what to install and the tests that need them say so too.
set -uo pipefail

have_chromium() {
  [ -n "${MONDRIAN_CHROMIUM:-}" ] && return 0
  for name in chromium chromium-browser google-chrome google-chrome-stable; do
    command -v "$name" >/dev/null 2>&1 && return 0
  done
  [ -d "/Applications/Google Chrome.app" ] || [ -d "/Applications/Chromium.app" ]
}

have_openblas() {
  [ "$(uname -s)" != Linux ] && return 0  # macOS: MLX uses Metal and Accelerate
  [ "$(uname -m)" = x86_64 ] && return 0  # oneMKL comes with pip (the `mkl` wheel, a dependency there)
  compgen -G "/usr/lib/*/libopenblas*.so*" >/dev/null || compgen -G "/usr/lib64/libopenblas*.so*" >/dev/null \
    || compgen -G "/usr/lib/libopenblas*.so*" >/dev/null || compgen -G "/usr/local/lib/libopenblas*.so*" >/dev/null
}

missing=()
have_chromium || missing+=(chromium)
have_openblas || missing+=(libopenblas0-pthread)
command -v exiftool >/dev/null 2>&1 || missing+=(libimage-exiftool-perl)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v jq >/dev/null 2>&1 || missing+=(jq)
[ "$(uname -s)" != Linux ] || command -v strace >/dev/null 2>&1 || missing+=(strace)  # report-folder durability test
# PostgreSQL's server binaries: the shared-ledger tests start a throw-away server of their own (tests/pgserver.py).
have_postgres() {
  command -v initdb >/dev/null 2>&1 || [ -x /usr/local/bin/initdb ] \
    || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}
have_postgres || missing+=(postgresql)
# libfaketime: one node of the shared-ledger tests runs with its clock a minute and a half ahead.
[ "$(uname -s)" != Linux ] || compgen -G "/usr/lib/*/faketime/libfaketime.so.1" >/dev/null || missing+=(libfaketime)
[ ${#missing[@]} -eq 0 ] && exit 0

if command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO="none"; fi
  fi
  if [ "$SUDO" != none ]; then
    echo "installing what the tests need: ${missing[*]} (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    if $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null; then
      exit 0
    fi
  fi
  echo "make test: could not install ${missing[*]}; run: sudo apt-get install ${missing[*]}" >&2
else
  shown="${missing[*]/libopenblas0-pthread/OpenBLAS}"
  echo "make test: please install ${shown/libimage-exiftool-perl/exiftool} with your package manager" \
       "(or set MONDRIAN_CHROMIUM to a Chromium or Chrome binary); tests that need them will say so" >&2
fi
exit 0
