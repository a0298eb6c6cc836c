#!/usr/bin/env bash
# ONNX Runtime's OpenVINO execution provider on the served YOLOv8n export (issue 17): its own
# wheel (onnxruntime-openvino) replaces onnxruntime, so it gets its own venv, .cache/openvino.
# The export and the letterboxed scene come from inferline's own code in the main venv
# (bench/ort_options.py --write-input); bench/openvino_ep.py times both providers of that wheel.
#
#   bash bench/openvino.sh [openvino_ep.py arguments, e.g. --duration 5 --rounds 3]
#
# writes bench/results/ort-openvino.{json,md}. Needs the stand-ins' digests pinned, as
# bench/README.md says for every script here.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$REPO/.cache/openvino"
PYTHON="${PYTHON:-python3.11}"
PINS=(onnxruntime-openvino==1.24.1 numpy==2.4.6)

if [[ ! -f "$VENV/.installed" || "$(cat "$VENV/.installed")" != "${PINS[*]}" ]]; then
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PINS[@]}"
  echo "${PINS[*]}" > "$VENV/.installed"
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$REPO/.venv/bin/python" "$REPO/bench/ort_options.py" --write-input "$work"
"$VENV/bin/python" "$REPO/bench/openvino_ep.py" --model "$(cat "$work/model.txt")" --input "$work/input.npy" \
  --out "$REPO/bench/results/ort-openvino" --command "bash bench/openvino.sh $*" "$@"
