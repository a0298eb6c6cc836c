#!/usr/bin/env bash
# Builds inferline images from deploy/docker/Dockerfile, one target each, tagged
# ${INFERLINE_IMAGE_PREFIX}<target>:${INFERLINE_IMAGE_TAG} (default localhost/inferline-<target>:<version>).
# Usage: deploy/docker/build.sh [target ...]
#   targets: controller preprocess postprocess inference-onnx (default), inference-torch, inference-cuda
# Builder: buildah when present (daemonless; used here and in CI), else docker. The base image
# python:3.11-slim must already be local (--pull=never): deploy/tools/install-containers.sh makes it.
# Extra build options go in INFERLINE_BUILD_OPTS (e.g. "--volume /opt/wheels:/wheels:ro").
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
