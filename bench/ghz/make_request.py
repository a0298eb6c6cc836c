"""Writes ghz call data for inferline.v1.ControllerService/Detect (or, with --oip, for the
controller's pipelines over inference.GRPCInferenceService/ModelInfer) from image files.

    python bench/ghz/make_request.py IMAGE [IMAGE ...] > bench/ghz/request.json

One image gives one DetectRequest object; several give a JSON array of requests, one image
each, which ghz sends round-robin (request i uses element i mod len). --one-request puts every
image into a single request instead (a batch). The JSON is protobuf's JSON mapping of
DetectRequest (protos/inferline/v1/controller.proto): `model`, `images[].data` (base64 of the
encoded file, exactly as on disk), `images[].name`, and `options` (DetectOptions; empty = the
model's defaults). Standard library only, so it runs without the inferline venv.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def images_in(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            sys.exit(f"error: no such image or directory: {path}")
    if not found:
        sys.exit("error: no images found")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", help="image files (JPEG, PNG, WebP, BMP) or directories")
    parser.add_argument("--model", default="yolov8n", help="model name from ListModels (default yolov8n)")
    parser.add_argument("--conf", type=float, help="confidence threshold (default: the model's, 0.25 for YOLO)")
    parser.add_argument("--iou", type=float, help="NMS IoU threshold (default: the model's, 0.7 for YOLO)")
    parser.add_argument("--one-request", action="store_true", help="all images in one request (a batch)")
    parser.add_argument("--oip", action="store_true",
                        help="call data for inference.GRPCInferenceService/ModelInfer on the controller's "
                             "pipeline (bench/ghz/pipeline-infer.json) instead of Detect")
    args = parser.parse_args()
    if args.oip:
        json.dump(oip_requests(args), sys.stdout)
        sys.stdout.write("\n")
        return

    options = {k: v for k, v in (("conf", args.conf), ("iou", args.iou)) if v is not None}
    images = [{"name": p.name,
               "data": base64.b64encode(p.read_bytes()).decode("ascii")} for p in images_in(args.images)]
    requests = [{"model": args.model, "images": [image], "options": options} for image in images]
    if args.one_request:
        data: object = {"model": args.model, "images": images, "options": options}
    else:
        data = requests[0] if len(requests) == 1 else requests
    json.dump(data, sys.stdout)
    sys.stdout.write("\n")


def oip_requests(args: argparse.Namespace) -> object:
    """ModelInferRequest(s) in protobuf JSON for the pipeline ``args.model``: input ``IMAGE``
    (BYTES, shape [batch, 1]) in ``raw_input_contents``, serialised as Triton serialises BYTES
    (each element's uint32 little-endian length, then its bytes), base64 as JSON wants bytes."""
    parameters = {k: {"double_param": v} for k, v in (("conf", args.conf), ("iou", args.iou)) if v is not None}

    def request(files: list[Path]) -> dict:
        raw = b"".join(len(data).to_bytes(4, "little") + data for data in (p.read_bytes() for p in files))
        return {
            "model_name": args.model,
            "inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [len(files), 1]}],
            "raw_input_contents": [base64.b64encode(raw).decode("ascii")],
            "parameters": parameters,
        }

    files = images_in(args.images)
    if args.one_request:
        return request(files)
    requests = [request([p]) for p in files]
    return requests[0] if len(requests) == 1 else requests


if __name__ == "__main__":
    main()
