"""``inferline classify | embed | models``: the public API from the command line (``detect``
has its own module, ``detect.py``, for its sources and outputs).

Images are read as ``detect`` reads its sources (``sources.py``: folders, globs, URLs, stdin,
lists, video frames) and sent in requests of ``BATCH``; the client returns domain results
and the presentation module prints them, in the same shapes the HTTP gateway answers with.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from google.protobuf import json_format

from inferline.common.api import (
    ClassifyRequest,
    ClassifyResult,
    ClusterOptions,
    DetectRequest,
    DetectResult,
    EmbedRequest,
    ImageInput,
)
from inferline.services.cli import shared, sources
from inferline.services.client import Client, defaults, image_inputs
from inferline.services.presentation import documents

# Images per request unless --batch says otherwise.
BATCH = 16


def add_commands(commands: argparse._SubParsersAction) -> None:
    classify = commands.add_parser("classify", help="zero-shot classify images against your labels")
    classify.add_argument("images", nargs="+", help="images as detect takes them: files, folders, globs, URLs, ...")
    classify.add_argument("--labels", type=shared.labels, required=True, help='comma-separated: "a bus,a dog"')
    classify.add_argument("--model", default=defaults.EMBED_MODEL)
    classify.add_argument("--top-k", type=int, default=0, help="labels per image (default: all)")
    classify.add_argument("--format", choices=documents.TABLE_FORMATS, default="json")
    classify.add_argument("--out", type=Path, help="output file; default stdout")
    shared.add_target(classify)
    shared.add_timeout(classify)
    classify.set_defaults(handler=cmd_classify)

    embed = commands.add_parser("embed", help="L2-normalised embeddings of images and texts")
    embed.add_argument("--image", action="append", default=[], help="images as detect takes them (repeatable)")
    embed.add_argument("--text", action="append", default=[], help="a text (repeatable)")
    embed.add_argument("--model", default=defaults.EMBED_MODEL)
    embed.add_argument("--cluster", type=int, default=0, metavar="K", help="k-means the batch into K clusters")
    embed.add_argument("--threshold", type=float, default=0.0, help="group items with cosine >= this (near-duplicates)")
    embed.add_argument("--format", choices=documents.TABLE_FORMATS, default="json")
    embed.add_argument("--out", type=Path, help="output file; default stdout")
    shared.add_target(embed)
    shared.add_timeout(embed)
    embed.set_defaults(handler=cmd_embed)

    models = commands.add_parser("models", help="list the served models")
    models.add_argument("--json", action="store_true", help="full metadata as JSON")
    shared.add_target(models)
    models.set_defaults(handler=cmd_models)


def detect_paths(
    client: Client, request: DetectRequest, paths: Sequence[Path], batch: int = BATCH
) -> list[DetectResult]:
    """``request`` for every image of ``paths``, ``batch`` images per call."""
    return [
        client.detect(dataclasses.replace(request, images=image_inputs(paths[start : start + batch])))
        for start in range(0, len(paths), batch)
    ]


def classify_paths(
    client: Client, request: ClassifyRequest, paths: Sequence[Path], batch: int = BATCH
) -> list[ClassifyResult]:
    return classify_inputs(client, request, image_inputs(paths), batch)


def classify_inputs(
    client: Client, request: ClassifyRequest, images: Sequence[ImageInput], batch: int = BATCH
) -> list[ClassifyResult]:
    return [
        client.classify(dataclasses.replace(request, images=tuple(images[start : start + batch])))
        for start in range(0, len(images), batch)
    ]


def source_inputs(specs: Sequence[str]) -> tuple[ImageInput, ...]:
    """Every image and video frame of the sources, as ``detect`` reads them (sources.py)."""
    return tuple(ImageInput(frame.data, frame.name) for frame in sources.all_frames(sources.resolve(specs)))


def write_pngs(results: Sequence[DetectResult], out_dir: Path) -> list[Path]:
    """Each annotated image the server rendered, as ``<out_dir>/<image stem>.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for result in results:
        for image in result.images:
            if png := documents.png_of(image):
                path = out_dir / f"{Path(image.name).stem}.png"
                path.write_bytes(png)
                written.append(path)
    return written


def cmd_classify(args: argparse.Namespace) -> int:
    images = source_inputs(args.images)
    request = ClassifyRequest(model=args.model, images=(), labels=tuple(args.labels), top_k=args.top_k)
    with shared.client(args) as client:
        results = classify_inputs(client, request, images)
    if args.format == "json":
        shared.write(json.dumps({"results": documents.classify_results(results)}, indent=2), args.out)
    else:
        shared.write(documents.classify_csv(results), args.out)
    return shared.report_failures((image.name, image.error) for result in results for image in result.images)


def cmd_embed(args: argparse.Namespace) -> int:
    if not args.image and not args.text:
        return shared.fail("give --image and/or --text")
    request = EmbedRequest(
        model=args.model, images=source_inputs(args.image) if args.image else (), texts=tuple(args.text),
        cluster=ClusterOptions(k=args.cluster, threshold=args.threshold),
    )
    with shared.client(args) as client:
        result = client.embed(request)
    if args.format == "json":
        shared.write(json.dumps(documents.embed_document(result)), args.out)
    else:
        shared.write(documents.embed_csv(result), args.out)
    return shared.report_failures((item.key, item.error) for item in result.images + result.texts)


def cmd_models(args: argparse.Namespace) -> int:
    with shared.client(args) as client:
        models = client.models(timeout=30)
    if args.json:
        metadata = [json_format.MessageToDict(m, preserving_proto_field_name=True) for m in models]
        print(json.dumps({"models": metadata}, indent=2))
        return 0
    print(f"{'model':<40} {'task':<8} {'backend':<8} {'version':<8} weights")
    for m in models:
        weights = "official" if m.weights.official else "not official"
        versions = ",".join(m.versions)
        print(f"{m.name:<40} {m.task:<8} {m.platform:<8} {versions:<8} {weights} ({Path(m.weights.path).name})")
    return 0
