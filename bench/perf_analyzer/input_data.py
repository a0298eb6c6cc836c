"""Writes perf_analyzer's ``--input-data`` JSON for a controller pipeline: encoded images as
the ``IMAGE`` input (BYTES), one entry per image, read at run time from the shared test scenes
(no image is committed). perf_analyzer sends the entries in turn, one per request.

    .venv/bin/python bench/perf_analyzer/input_data.py --images ../shared/data --out .cache/pa-images.json

perf_analyzer's format for binary data is ``{"data": [{"IMAGE": {"b64": "..."}}]}``: the
decoded bytes are sent as the tensor's contents. For a BYTES tensor those contents are Triton's
serialisation (each element: its length as uint32 little-endian, then its bytes), so each
entry holds one length-prefixed JPEG and perf_analyzer needs ``--shape IMAGE:1``.
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path

import numpy as np

from inferline.common.oip_bytes import serialize

REPO = Path(__file__).resolve().parents[2]


def entries(images: list[Path], tensor: str) -> list[dict[str, dict[str, str]]]:
    return [
        {tensor: {"b64": base64.b64encode(serialize(np.array([path.read_bytes()], dtype=object))).decode()}}
        for path in images
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared" / "data",
                        help="a folder of JPEGs (every *.jpg is used) or one image")
    parser.add_argument("--limit", type=int, default=8, help="at most this many images")
    parser.add_argument("--tensor", default="IMAGE", help="the pipeline's input name")
    parser.add_argument("--out", type=Path, default=REPO / ".cache" / "perf_analyzer" / "images.json")
    args = parser.parse_args()
    images = sorted(args.images.glob("*.jpg"))[: args.limit] if args.images.is_dir() else [args.images]
    if not images:
        parser.error(f"no *.jpg in {args.images}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"data": entries(images, args.tensor)}))
    print(f"{args.out}: {len(images)} images as {args.tensor}")


if __name__ == "__main__":
    main()
