#!/usr/bin/env bash
# Installs a real Triton Inference Server (CPU, Python backend) for serving inferline's models
# from Triton (`inferline triton-repository`) and for the tests that put it in place of our
# inference stage (tests/e2e/test_tritonserver.py).
#
# The binary comes from the package registry's nvidia-pytriton wheel, installed with --target
# into its own folder (not the project's venv: only the server is wanted, not PyTriton's Python
# API nor its dependencies). The wheel carries bin/tritonserver, backends/python and one Python
# backend stub per Python version; the stub for 3.11 is put into backends/python, where the
# Python backend looks for it. The libraries the binaries need ship in the wheel
# (nvidia_pytriton.libs, found by their RPATH, libcudart included, loaded even without a GPU),
# except the stub's libpython3.11.so.1.0: Debian's libpython3.11 package. The stub embeds that
# interpreter, so a model.py imports numpy, torch and inferline through PYTHONPATH (the project
# venv's site-packages; inferline's triton_env prints it).
#
# Usage: deploy/tools/install-tritonserver.sh      Prints tritonserver's path as its last line;
#   its backends folder (for --backend-directory) is ../backends beside it.
set -euo pipefail

PIN="nvidia-pytriton==0.7.0"
PYTHON_VERSION="3.11"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
tools="${INFERLINE_TOOLS_DIR:-${repo_root}/.cache/tools}"
dest="${tools}/pytriton"
server="${dest}/pytriton/tritonserver"
binary="${server}/bin/tritonserver"
stub="${server}/backends/python/triton_python_backend_stub"
stamp="${dest}/.pin"
python="${PYTHON:-python3}"

log() { echo "install-tritonserver: $*" >&2; }

if [[ -f "$stamp" && "$(cat "$stamp")" == "${PIN} ${PYTHON_VERSION}" && -x "$binary" && -x "$stub" ]]; then
    echo "$binary"; exit 0
fi

case "$(uname -s)/$(uname -m)" in
    Linux/x86_64 | Linux/amd64) ;;
    *) log "the wheel's tritonserver is linux/x86-64 only; this is $(uname -s)/$(uname -m)"; exit 1 ;;
esac

log "installing ${PIN} into ${dest}"
rm -rf "$dest"
mkdir -p "$tools"
"$python" -m pip install --quiet --disable-pip-version-check --no-deps --target "${dest}.tmp.$$" "$PIN" >&2 \
    || { rm -rf "${dest}.tmp.$$"; log "pip could not install ${PIN} (is the package registry reachable?)"; exit 1; }
mv "${dest}.tmp.$$" "$dest"

# backends/python and python_backend_stubs/<version> are as deep below tritonserver/, so the
# stub's RPATH ($ORIGIN/../../../nvidia_pytriton.libs) still holds after the copy.
install -m 0755 "${server}/python_backend_stubs/${PYTHON_VERSION}/triton_python_backend_stub" "$stub"

missing="$(ldd "$binary" "$stub" "${server}/backends/python/libtriton_python.so" | grep 'not found' | sort -u || true)"
if [[ -n "$missing" ]]; then
    log "shared libraries not found (libpython${PYTHON_VERSION}.so.1.0: Debian's libpython${PYTHON_VERSION}):"
    echo "$missing" >&2
    exit 1
fi
# --help exits non-zero after printing its usage.
[[ "$("$binary" --help 2>&1 || true)" == *"Usage: tritonserver"* ]] || { log "${binary} does not start"; exit 1; }
echo "${PIN} ${PYTHON_VERSION}" >"$stamp"
log "installed tritonserver at ${binary}"
echo "$binary"
