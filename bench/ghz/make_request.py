"""Writes ghz call data for inferline.v1.ControllerService/Detect from image files.

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
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
