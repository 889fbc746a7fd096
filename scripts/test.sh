#!/usr/bin/env bash
# The full test suite, as the README gives it: builds the extension into the virtualenv of
# $PYTHON (default: .venv, created if missing), then runs the Rust tests and the pytest suite
# on gevent's default loop (libev) and on libuv.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
if [ ! -x "$PYTHON" ]; then
    python3 -m venv "$(dirname "$(dirname "$PYTHON")")"
fi
"$PYTHON" -m pip install -q --disable-pip-version-check maturin==1.16.0 -r requirements-test.txt
# Install a release wheel (what a user gets), not an editable debug build. One abi3 wheel
# serves every CPython 3.9+, so CI builds it once and passes it in $GIPC_WHEEL.
if [ -z "${GIPC_WHEEL:-}" ]; then
    rm -rf target/wheels
    "$PYTHON" -m maturin build --release -q --out target/wheels
    GIPC_WHEEL=$(ls target/wheels/*.whl)
fi
"$PYTHON" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps "$GIPC_WHEEL"
if [ -z "${GIPC_SKIP_CARGO_TEST:-}" ]; then
    echo "-- Rust core tests"
    cargo test -q --workspace
fi
# GIPC_TEST_LOOPS narrows the loops (CI runs some CPython versions on one loop each).
for loop in ${GIPC_TEST_LOOPS:-libev-cext libuv}; do
    echo "-- pytest on gevent loop: $loop ($("$PYTHON" --version))"
    eval GEVENT_LOOP=$loop "$PYTHON" -m pytest -p no:cacheprovider ${PYTEST_ARGS:-} tests
done
