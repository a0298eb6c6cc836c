#!/usr/bin/env bash
# Installs Prometheus (prometheus, promtool) and Alertmanager (prometheus-alertmanager) from the
# Debian packages, for the monitoring tests and for running them beside `inferline up`.
# Idempotent: does nothing when the binaries are already there. Needs root (or sudo) for apt.
#
# Usage: deploy/tools/install-prometheus.sh
#   Prints the three binary paths, one per line, as its last output:
#   prometheus, promtool, alertmanager.
set -euo pipefail

log() { echo "install-prometheus: $*" >&2; }

find_binaries() {
    prometheus="$(command -v prometheus || true)"
    promtool="$(command -v promtool || true)"
    # Debian names the binary prometheus-alertmanager; upstream tarballs name it alertmanager.
    alertmanager="$(command -v prometheus-alertmanager || command -v alertmanager || true)"
    [[ -n "$prometheus" && -n "$promtool" && -n "$alertmanager" ]]
}

if ! find_binaries; then
    if ! command -v apt-get >/dev/null; then
        log "no apt-get here: install prometheus, promtool and alertmanager (upstream tarballs work) and put them on PATH"
        exit 1
    fi
    sudo=""
    if [[ "$(id -u)" != "0" ]]; then
        command -v sudo >/dev/null || { log "not root and no sudo: install prometheus prometheus-alertmanager yourself"; exit 1; }
        sudo="sudo"
    fi
    log "installing the Debian packages prometheus and prometheus-alertmanager"
    # The packages' post-install scripts try to start services; there is no init system here.
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq >&2
    $sudo apt-get install -y -qq --no-install-recommends prometheus prometheus-alertmanager >&2
    if ! find_binaries; then
        log "apt-get finished but prometheus, promtool or the alertmanager binary is still missing"
        exit 1
    fi
fi
log "prometheus $("$prometheus" --version 2>&1 | head -n1)"
echo "$prometheus"
echo "$promtool"
echo "$alertmanager"
