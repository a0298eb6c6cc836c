#!/bin/sh
# Builds /opt/venv for one image in two steps, so that a change to inferline's own code rebuilds
# only the second (seconds) and reuses the first's layer (the pinned dependencies: several GB for
# the torch and CUDA images):
#
#   install-venv.sh deps REQUIREMENTS_FILE [extra pip arguments...]
#       the stage's pinned requirements, nothing of inferline; compiled to bytecode.
#   install-venv.sh project
#       inferline itself from /wheels without dependencies (so nothing the stage does not import
#       slips in), then drops what a running service never uses (pip, setuptools).
set -eu
step=$1; shift
case "$step" in
deps)
  reqs=$1; shift
  python3 -m venv /opt/venv
  /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check "$@" -r "$reqs"
  # ultralytics requires opencv-python, whose cv2 needs libGL; both wheels write the same cv2
  # folder, so keep only the headless one (the services never open a window).
  if /opt/venv/bin/pip show --quiet opencv-python 2>/dev/null && /opt/venv/bin/pip show --quiet opencv-python-headless 2>/dev/null; then
    /opt/venv/bin/pip uninstall --yes --quiet opencv-python
    /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --force-reinstall --no-deps \
      "$(grep -h '^opencv-python-headless==' /requirements/*.txt | head -1)"
  fi
  find /opt/venv/lib -depth -type d -name tests \( -path '*/numpy/*' -o -path '*/onnx/*' -o -path '*/grpc*' \) -exec rm -rf {} +
  find /opt/venv -name '*.pyi' -delete
  # numpy's build tools (distutils, f2py): only for compiling Fortran/C extensions.
  rm -rf /opt/venv/lib/python3*/site-packages/numpy/distutils /opt/venv/lib/python3*/site-packages/numpy/f2py \
    /opt/venv/bin/f2py /opt/venv/bin/numpy-config
  # torch ships test helpers written for newer Pythons (torch/testing/_internal/py312_intrinsics.py),
  # which no service imports and this Python cannot compile: skip them rather than fail the build.
  # -q prints only the files that fail, so a failure here says which.
  python3 -m compileall -q -j 0 -x '/torch/testing/_internal/' /opt/venv/lib
  ;;
project)
  /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps --no-compile /wheels/inferline-*.whl
  /opt/venv/bin/pip uninstall --yes --quiet pip setuptools
  python3 -m compileall -q -j 0 /opt/venv/lib/python3*/site-packages/inferline
  ;;
*)
  echo "usage: install-venv.sh deps REQUIREMENTS_FILE [pip arguments...] | install-venv.sh project" >&2
  exit 2
  ;;
esac
