#!/usr/bin/env bash
# perf_analyzer against a controller pipeline (encoded JPEGs in, detections out), the command a
# Triton user runs against an ensemble. Needs deploy/tools/install-perf-analyzer.sh first, and a
# running stack; for a short run on loopback with free ports (yolov8n only):
#   INFERLINE_MODELS=yolov8n INFERLINE_CONTROLLER_PORT=45051 INFERLINE_PREPROCESS_PORT=45052 \
#   INFERLINE_INFERENCE_PORT=45053 INFERLINE_POSTPROCESS_PORT=45054 inferline up
#   bench/perf_analyzer/pipeline.sh yolov8n 127.0.0.1:45051 [more perf_analyzer options]
# The input data (one length-prefixed JPEG per request, from ../shared/data) is made at run time.
set -euo pipefail
cd "$(dirname "$0")/../.."
model=${1:-yolov8n}
target=${2:-127.0.0.1:50051}
shift $(( $# < 2 ? $# : 2 ))
data=.cache/perf_analyzer/images.json
.venv/bin/python bench/perf_analyzer/input_data.py --out "$data" >&2
exec env LD_LIBRARY_PATH=.cache/perf_analyzer/lib .venv/bin/perf_analyzer -m "$model" -i grpc -u "$target" \
    --input-data "$data" --shape IMAGE:1 -b 1 "$@"
