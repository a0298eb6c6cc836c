#!/usr/bin/env bash
# Makes this machine able to build and run inferline's images without a Docker daemon:
# buildah, podman and runc from Debian (as root), the offline base image python:3.11-slim
# (made with debootstrap by ../shared/containers/make-base-image.sh, cached as a tar in
# .cache/tools so later runs only `podman load` it), and podman-compose (install-pytools.sh).
# Idempotent. Callers then export CONTAINERS_CONF=<repo>/deploy/tools/containers.conf.
#
# Usage: deploy/tools/install-containers.sh      Prints the CONTAINERS_CONF path as its last line.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "${here}/../.." && pwd)"
tools="${INFERLINE_TOOLS_DIR:-${repo_root}/.cache/tools}"
base_tar="${tools}/python-3.11-slim.tar"
base_script="${INFERLINE_BASE_IMAGE_SCRIPT:-${repo_root}/../shared/containers/make-base-image.sh}"
export CONTAINERS_CONF="${CONTAINERS_CONF:-${here}/containers.conf}"

log() { echo "install-containers: $*" >&2; }

missing=()
for tool in buildah podman runc; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if (( ${#missing[@]} )); then
    command -v apt-get >/dev/null && [[ $(id -u) -eq 0 ]] \
        || { log "need ${missing[*]}: install buildah, podman and runc with your package manager (root)"; exit 1; }
    log "apt-get install buildah podman runc debootstrap"
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q buildah podman runc debootstrap; } >&2 \
        || { log "apt-get could not install buildah podman runc"; exit 1; }
fi

if ! podman image exists localhost/python:3.11-slim; then
    mkdir -p "$tools"
    if [[ -f "$base_tar" ]]; then
        log "loading the base image from ${base_tar}"
        podman load -q -i "$base_tar" >&2
        podman tag localhost/python:3.11-slim docker.io/library/python:3.11-slim
    elif [[ -x "$base_script" ]]; then
        log "making python:3.11-slim offline with ${base_script} (about a minute)"
        "$base_script" >&2
        podman save -q -o "$base_tar" localhost/python:3.11-slim >&2
    else
        log "no python:3.11-slim image and no ${base_script} to make one offline;"
        log "set INFERLINE_BASE_IMAGE_SCRIPT, or pull python:3.11-slim where a registry is reachable"
        exit 1
    fi
fi
"${here}/install-pytools.sh" >/dev/null
echo "$CONTAINERS_CONF"
