#!/usr/bin/env bash
# Install each serving peer into its own venv under .cache/peers/<peer>/ (their dependencies
# conflict with each other and with inferline's). Pinned versions, pip only.
#
#   bash bench/peers/install.sh                  # all peers
#   bash bench/peers/install.sh mosec litserve   # some
#
# Every venv gets the same model stack as inferline's main venv (onnxruntime, numpy, OpenCV at
# the main venv's versions) and sees inferline's pure-numpy letterbox / YOLO decode through a
# .pth file (.cache/peers/src links to this checkout), so every peer runs the same pre- and
# postprocessing code and only the serving framework differs. The litserve venv also gets torch
# and ultralytics for its PyTorch variant.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
ROOT="$REPO/.cache/peers"
PYTHON="${PYTHON:-python3.11}"

LITSERVE=0.2.19
MOSEC=0.9.8
BENTOML=1.4.40
KSERVE=0.21.0
COMMON=(onnxruntime==1.32.0 numpy==2.4.6 opencv-python-headless==5.0.0.93 pillow==13.0.0)
TORCH=(torch==2.14.1 torchvision==0.29.1 ultralytics==8.4.190)

mkdir -p "$ROOT/src/inferline"
ln -sfn "$REPO/common" "$ROOT/src/inferline/common"
ln -sfn "$REPO/services" "$ROOT/src/inferline/services"

install_peer() {
  local peer="$1"; shift
  local venv="$ROOT/$peer"
  if [[ -f "$venv/.installed" && "$(cat "$venv/.installed")" == "$*" ]]; then
    echo "$peer: up to date"; return
  fi
  echo "$peer: installing $*"
  rm -rf "$venv"
  "$PYTHON" -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$@"
  local site
  site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "$ROOT/src" > "$site/inferline_src.pth"
  echo "$*" > "$venv/.installed"
}

peers=("$@")
[[ ${#peers[@]} -eq 0 ]] && peers=(mosec kserve bentoml litserve)
for peer in "${peers[@]}"; do
  case "$peer" in
    litserve) install_peer litserve "litserve==$LITSERVE" "${COMMON[@]}" "${TORCH[@]}" ;;
    mosec) install_peer mosec "mosec==$MOSEC" "${COMMON[@]}" ;;
    bentoml) install_peer bentoml "bentoml==$BENTOML" "${COMMON[@]}" ;;
    kserve) install_peer kserve "kserve==$KSERVE" "${COMMON[@]}" ;;
    *) echo "unknown peer: $peer (litserve, mosec, bentoml, kserve)" >&2; exit 2 ;;
  esac
done
