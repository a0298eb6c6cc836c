"""``inferline eval``: COCO mAP of ``detect --save-json``'s predictions against ground truth,
scored by pycocotools (the reference implementation; optional extra ``inferline[eval]``).

Ground truth is a COCO annotations file, or the test set's own format
(``{"images": {file: [{"box": [x1, y1, x2, y2], "<id_field>": class id}, ...]}}``, as
``shapes_labels.json``), converted here. Predictions are matched to images by file name, so
the ids ``detect`` wrote (file stems) need not be the ground truth's.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Any

# COCOeval.stats, in order: the names its summary prints.
STAT_NAMES = (
    "mAP50-95",
    "mAP50",
    "mAP75",
    "mAP50-95_small",
    "mAP50-95_medium",
    "mAP50-95_large",
    "AR1",
    "AR10",
    "AR100",
    "AR_small",
    "AR_medium",
    "AR_large",
)


def add_commands(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser("eval", help="COCO mAP of detect --save-json predictions (pycocotools)")
    evaluate.add_argument("predictions", type=Path, help="predictions.json written by detect --save-json")
    evaluate.add_argument(
        "--gt", type=Path, required=True, help="ground truth: COCO annotations, or shapes_labels.json"
    )
    evaluate.add_argument(
        "--id-field",
        default="ultralytics_id",
        help="class id field of a shapes-style ground truth (torchvision_id for torchvision models)",
    )
    evaluate.add_argument("--json", action="store_true", help="every COCOeval figure as one JSON object")
    evaluate.set_defaults(handler=cmd_eval)


def coco_ground_truth(raw: dict[str, Any], id_field: str) -> dict[str, Any]:
    """COCO annotations as they are; the shapes format converted (boxes x1 y1 x2 y2 -> x y w h)."""
    if "annotations" in raw:
        return raw
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    categories: dict[int, str] = {}
    for image_id, (file_name, objects) in enumerate(sorted(raw["images"].items()), start=1):
        images.append({"id": image_id, "file_name": file_name})
        for obj in objects:
            x1, y1, x2, y2 = obj["box"]
            category = int(obj[id_field])
            categories[category] = obj.get("label", str(category))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    return {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": name} for c, name in sorted(categories.items())],
    }


def matched_predictions(predictions: list[dict[str, Any]], ground_truth: dict[str, Any]) -> list[dict[str, Any]]:
    """Predictions with the ground truth's image ids, found by file name (or by the stem for an
    entry without one); those of images the ground truth lacks are left out."""
    by_name = {Path(image["file_name"]).name: image["id"] for image in ground_truth["images"]}
    by_stem = {Path(name).stem: image_id for name, image_id in by_name.items()}
    matched = []
    for entry in predictions:
        name = entry.get("file_name")
        image_id = by_name.get(Path(name).name) if name else by_stem.get(str(entry["image_id"]))
        if image_id is not None:
            matched.append({**entry, "image_id": image_id})
    return matched


def score(predictions: list[dict[str, Any]], ground_truth: dict[str, Any]) -> dict[str, float]:
    """COCOeval's bbox figures (mAP50-95 first) over every ground-truth image."""
    try:
        from pycocotools.coco import COCO  # noqa: PLC0415 - optional extra, for this command only
        from pycocotools.cocoeval import COCOeval  # noqa: PLC0415
    except ImportError as exc:
        raise RuntimeError("inferline eval needs pycocotools: pip install 'inferline[eval]'") from exc
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress; we print figures
        truth = COCO()
        truth.dataset = ground_truth
        truth.createIndex()
        found = truth.loadRes(predictions) if predictions else COCO()
        evaluation = COCOeval(truth, found, "bbox")
        if predictions:
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
    if not predictions:
        return dict.fromkeys(STAT_NAMES, 0.0)
    return {name: round(float(value), 5) for name, value in zip(STAT_NAMES, evaluation.stats, strict=True)}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"{path}: not JSON ({exc})") from None


def cmd_eval(args: argparse.Namespace) -> int:
    try:
        ground_truth = coco_ground_truth(_read_json(args.gt), args.id_field)
    except (KeyError, TypeError, ValueError) as exc:
        raise RuntimeError(f"{args.gt}: neither COCO annotations nor the shapes format ({exc!r})") from None
    raw = _read_json(args.predictions)
    if not isinstance(raw, list):
        raise RuntimeError(f"{args.predictions}: expected a list of COCO results (detect --save-json writes one)")
    predictions = matched_predictions(raw, ground_truth)
    if len(predictions) < len(raw):
        print(
            f"note: {len(raw) - len(predictions)} predictions are of images {args.gt} lacks; left out", file=sys.stderr
        )
    figures = score(predictions, ground_truth)
    if args.json:
        print(json.dumps(figures))
    else:
        for name, value in figures.items():
            print(f"{name:<16} {value:.4f}")
    return 0
