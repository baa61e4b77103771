#!/usr/bin/env bash
# GPU end-to-end check, meant for one device call of at most 5 minutes:
#   here:      bash tests/gpu/check.sh --prepare     (release binaries and the Python client's
#                                                    grpcio/protobuf wheels into .gpu-carry/)
#   on a GPU:  bash tests/gpu/check.sh               (with .gpu-carry carried along)
# On a machine with cargo and a GPU, plain `bash tests/gpu/check.sh` builds and runs.
# Three parts: check.py (the daemon's CUDA data plane, driven through the driver API),
# lifecycle_check.py (per-lease streams, the per-device budget, staging, restarts) and
# python_check.py (the `offloadd` Python package on a random Llama: tokens and tokens/s).
set -euo pipefail
cd "$(dirname "$0")/../.."
carry=.gpu-carry

pin() { sed -n "s/^$1==//p" python/requirements-test.txt; }

prepare() {
  cargo build --release --bin offloadd --bin offloadd-worker
  mkdir -p "$carry"
  cp target/release/offloadd target/release/offloadd-worker "$carry/"
  strip "$carry/offloadd" "$carry/offloadd-worker" 2>/dev/null || true
  cp "$(ls -t target/release/build/offloadd-*/out/offloadd_descriptor.bin | head -n 1)" "$carry/"
  # The GPU machine has Python 3.12, torch and transformers but no network, and maybe an older
  # grpcio/protobuf than the generated stubs need: carry the versions python/ pins.
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$carry/whl" \
    "grpcio==$(pin grpcio)" "protobuf==$(pin protobuf)"
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
if ls "$carry"/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/offloadd-site "$carry"/whl/*.whl
  export PYTHONPATH=/tmp/offloadd-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
rc=0
python3 tests/gpu/check.py --offloadd "$carry/offloadd" --worker "$carry/offloadd-worker" --descriptor "$carry/offloadd_descriptor.bin" || rc=1
python3 tests/gpu/lifecycle_check.py --offloadd "$carry/offloadd" --worker "$carry/offloadd-worker" --descriptor "$carry/offloadd_descriptor.bin" || rc=1
python3 tests/gpu/python_check.py --offloadd "$carry/offloadd" || rc=1
exit $rc
