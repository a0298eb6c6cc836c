#!/usr/bin/env bash
# perf_analyzer for the Open Inference Protocol benchmarks (bench/results/perf-analyzer-*.txt).
#
# The binary ships in the tritonclient 2.40.0 wheel (the dev extra installs it into .venv/bin);
# it needs two shared libraries that neither that wheel nor the system has: libb64.so.0d
# (Debian's libb64-0d) and libcudart.so.12 (the nvidia-cuda-runtime-cu12 wheel; loaded even on
# CPU-only machines). This puts both in .cache/perf_analyzer/lib, without root. Run:
#   LD_LIBRARY_PATH=.cache/perf_analyzer/lib .venv/bin/perf_analyzer ...
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=.cache/perf_analyzer
mkdir -p "$dest/lib" "$dest/download"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download libb64-0d && dpkg-deb -x libb64-0d_*.deb deb)
cp "$work"/deb/usr/lib/x86_64-linux-gnu/libb64.so.0d* "$dest/lib/"
.venv/bin/python -m pip download --quiet --no-deps --dest "$work" "nvidia-cuda-runtime-cu12==12.9.79"
(cd "$work" && python3 -m zipfile -e nvidia_cuda_runtime_cu12-*.whl cu)
cp "$work"/cu/nvidia/cuda_runtime/lib/libcudart.so.12 "$dest/lib/"
LD_LIBRARY_PATH="$dest/lib" .venv/bin/perf_analyzer --version
