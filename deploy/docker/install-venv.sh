#!/bin/sh
# Builds /opt/venv for one image: the stage's pinned requirements, then inferline itself without
# dependencies (so nothing the stage does not import slips in), then drops what a running
# service never uses (pip, setuptools, test suites) so the runtime stage copies less.
# Usage: install-venv.sh REQUIREMENTS_FILE [extra pip arguments...]
set -eu
reqs=$1; shift
python3 -m venv /opt/venv
/opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check "$@" -r "$reqs"
/opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps /wheels/inferline-*.whl
/opt/venv/bin/pip uninstall --yes --quiet pip setuptools
find /opt/venv/lib -depth -type d -name tests \( -path '*/numpy/*' -o -path '*/onnx/*' -o -path '*/grpc*' \) -exec rm -rf {} +
find /opt/venv -name '*.pyi' -delete
python3 -m compileall -q -j 0 /opt/venv/lib >/dev/null
