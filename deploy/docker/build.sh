#!/usr/bin/env bash
# Builds inferline images from deploy/docker/Dockerfile, one target each, tagged
# ${INFERLINE_IMAGE_PREFIX}<target>:${INFERLINE_IMAGE_TAG} (default localhost/inferline-<target>:<version>).
# Usage: deploy/docker/build.sh [target ...]
#   targets: controller preprocess postprocess inference-onnx gateway (default), inference-torch, inference-cuda
# Builder: buildah when present (daemonless; used here and in CI), else docker. The base image
# python:3.11-slim must already be local (--pull=never): deploy/tools/install-containers.sh makes it.
# Extra build options go in INFERLINE_BUILD_OPTS (e.g. "--volume /opt/wheels:/wheels:ro").
# INFERLINE_PIP_FROM_HOST=1 hands the host's pip wheel sources to the torch and CUDA builds: the
# index-url, extra-index-url, find-links and constraint of `pip config list` (environment
# included) become PIP_* build arguments, and each local folder or file among them is mounted
# read-only at the same path (a file:// index's parent folder, where its `../files` links point).
# That way a machine with local wheel mirrors builds the multi-GB torch image from disk.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
TAG=${INFERLINE_IMAGE_TAG:-$VERSION}
PREFIX=${INFERLINE_IMAGE_PREFIX:-localhost/inferline-}
TARGETS=("$@"); [ ${#TARGETS[@]} -gt 0 ] || TARGETS=(controller preprocess postprocess inference-onnx gateway)
REVISION=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
read -r -a EXTRA <<<"${INFERLINE_BUILD_OPTS:-}"

# Prints build options for the host's pip configuration (INFERLINE_PIP_FROM_HOST=1), one per line.
host_pip_opts() {
  local python config scope line key value item path
  python=$(command -v python3 || command -v python) || return 0
  declare -A seen=() chosen=()
  # `pip config list` prints `scope.key='value'`; read in pip's order of precedence, later wins.
  config=$("$python" -m pip config list 2>/dev/null || true)
  for scope in global user site :env:; do
    while IFS= read -r line; do
      key=${line#*.}; key=${key%%=*}; value=${line#*=}; value=${value#\'}; value=${value%\'}
      case $key in index-url|extra-index-url|find-links|constraint) chosen[$key]=$value ;; esac
    done < <(grep "^$scope\\." <<<"$config" || true)
  done
  for key in "${!chosen[@]}"; do
    value=${chosen[$key]}
    echo "--build-arg"; echo "PIP_$(tr 'a-z-' 'A-Z_' <<<"$key")=$value"
    for item in $value; do
      path=${item#file://}
      [ "${path:0:1}" = / ] || continue
      case $key in index-url|extra-index-url) path=$(dirname "${path%/}") ;; esac
      [ -e "$path" ] && [ -z "${seen[$path]:-}" ] || continue
      seen[$path]=1
      echo "--volume"; echo "$path:$path:ro"
    done
  done
}
if [ "${INFERLINE_PIP_FROM_HOST:-0}" = 1 ]; then
  mapfile -t HOST_PIP < <(host_pip_opts)
  EXTRA+=("${HOST_PIP[@]}")
  echo "pip sources from the host: ${HOST_PIP[*]}" >&2
fi

if command -v buildah >/dev/null; then
  BUILD=(buildah build --pull=never --format docker --layers)
  # runc and the ulimits root may set on these machines (deploy/tools/containers.conf).
  export CONTAINERS_CONF=${CONTAINERS_CONF:-$ROOT/deploy/tools/containers.conf}
elif command -v docker >/dev/null; then
  BUILD=(docker build)
else
  echo "error: neither buildah nor docker is installed; run deploy/tools/install-containers.sh (Debian) or install Docker" >&2
  exit 2
fi
for target in "${TARGETS[@]}"; do
  file=deploy/docker/Dockerfile; [ "$target" = inference-cuda ] && file=deploy/docker/Dockerfile.cuda
  start=$(date +%s)
  "${BUILD[@]}" -f "$file" --target "$target" \
    --build-arg VERSION="$VERSION" --build-arg REVISION="$REVISION" --build-arg CREATED="$CREATED" \
    "${EXTRA[@]}" -t "$PREFIX$target:$TAG" . >&2
  echo "built $PREFIX$target:$TAG in $(( $(date +%s) - start )) s"
done
