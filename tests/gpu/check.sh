#!/usr/bin/env bash
# GPU end-to-end check, meant for one device call of at most 5 minutes:
#   here:      bash tests/gpu/check.sh --prepare     (builds release binaries into .gpu-carry/)
#   on a GPU:  bash tests/gpu/check.sh               (with .gpu-carry carried along)
# On a machine with cargo and a GPU, plain `bash tests/gpu/check.sh` builds and runs.
set -euo pipefail
cd "$(dirname "$0")/../.."
carry=.gpu-carry

prepare() {
  cargo build --release --bin offloadd --bin offloadd-worker
  mkdir -p "$carry"
  cp target/release/offloadd target/release/offloadd-worker "$carry/"
  strip "$carry/offloadd" "$carry/offloadd-worker" 2>/dev/null || true
  cp "$(ls -t target/release/build/offloadd-*/out/offloadd_descriptor.bin | head -n 1)" "$carry/"
  grep -qx "/$carry/" .git/info/exclude 2>/dev/null || echo "/$carry/" >> .git/info/exclude
  ls -la "$carry"
}

if [ "${1:-}" = "--prepare" ]; then prepare; exit 0; fi
if [ ! -x "$carry/offloadd" ]; then
  command -v cargo >/dev/null || { echo "no $carry/ binaries and no cargo: run 'bash tests/gpu/check.sh --prepare' first" >&2; exit 2; }
  prepare
fi
if ! nvidia-smi -L >/dev/null 2>&1; then
  echo "SKIPPED: no NVIDIA GPU here (nvidia-smi failed); this check needs one" >&2
  exit 0
fi
nvidia-smi -L
"$carry/offloadd" --version
exec python3 tests/gpu/check.py --offloadd "$carry/offloadd" --worker "$carry/offloadd-worker" --descriptor "$carry/offloadd_descriptor.bin"
