#!/usr/bin/env bash
# Installs Debian's headless-capable Chromium and its matching chromedriver, for the gateway's
# browser test (tests/gateway/test_demo_page_browser.py drives the demo page with Selenium and
# the system browser; Selenium downloads nothing).
#
# Usage: deploy/tools/install-chromium.sh
#   Idempotent: does nothing when both are on PATH already. Needs root (or sudo) and apt-get.
#   Prints the chromedriver path as its last line.
set -euo pipefail

log() { echo "install-chromium: $*" >&2; }

found() {
    local browser driver
    browser="$(command -v chromium || true)"
    driver="$(command -v chromedriver || true)"
    [[ -n "$browser" && -n "$driver" ]] || return 1
    "$browser" --version >/dev/null 2>&1 && "$driver" --version >/dev/null 2>&1
}

if found; then
    log "$(chromium --version 2>/dev/null) and $(chromedriver --version 2>/dev/null | cut -d' ' -f1-2) already installed"
    command -v chromedriver
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    log "apt-get not found: install chromium and chromium-driver with your system's package manager"
    exit 1
fi

sudo=""
if [[ "$(id -u)" != "0" ]]; then
    if command -v sudo >/dev/null 2>&1; then
        sudo="sudo"
    else
        log "not root and no sudo: run as root, or install chromium and chromium-driver yourself"
        exit 1
    fi
fi

log "apt-get install chromium chromium-driver"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >&2
$sudo apt-get install -y -qq --no-install-recommends chromium chromium-driver >&2

if ! found; then
    log "installed, but chromium or chromedriver does not run"
    exit 1
fi
log "installed $(chromium --version 2>/dev/null)"
command -v chromedriver
