"""The public API's results as the documents users read: JSON objects and CSV tables.

The CLI prints them, the HTTP gateway answers with them (its JSON is the CLI's object, as
FastAPI serialises it), so both edges show the same shapes from the same code. A failed item
shows its error as ``{"code": <gRPC status name>, "message": ...}``: the status table
(``common/status.py``) names the domain error's code, as it does on the wire.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

from inferline.common.api import ClassifyResult, DetectResult, Embedded, EmbedResult, ImageDetections
from inferline.common.status import status_for
from inferline.services.presentation.renderers import RENDERERS, RenderInput, result_dict, write_csv

# The formats a user may ask for, per operation: every renderer for detect (its JSON, CSV and
# annotated PNG); the tables only for classify and embed, which have no image to draw on.
DETECT_FORMATS: tuple[str, ...] = tuple(RENDERERS)
TABLE_FORMATS: tuple[str, ...] = ("json", "csv")

CLASSIFY_CSV_HEADER = ("image", "rank", "label", "score")


def error_dict(error: Exception | None) -> dict[str, str] | None:
    """A failed item's error as users see it; None for an item that succeeded."""
    if error is None:
        return None
    code, message = status_for(error)
    return {"code": code.name, "message": message}


# ---- detect ---------------------------------------------------------------------------------


def render_input(image: ImageDetections) -> RenderInput:
    return RenderInput(image.name, image.width, image.height, image.detections)


def detect_results(results: Sequence[DetectResult]) -> list[dict[str, Any]]:
    """One object per image of one or more Detect results (the CLI sends a long list in several
    requests): the server-side JSON renderer's object, the image's error if it failed, and the
    stage timings of the request it came in."""
    documents = []
    for result in results:
        timings = {key: round(value, 2) for key, value in sorted(result.timings_ms.items())}
        for image in result.images:
            data = result_dict(render_input(image))
            if (error := error_dict(image.error)) is not None:
                data["error"] = error
            data["timings_ms"] = timings
            documents.append(data)
    return documents


def detect_csv(results: Sequence[DetectResult]) -> str:
    """One row per detection of every image, after one header (the CSV renderer's rows)."""
    out = io.StringIO()
    write_csv([render_input(image) for result in results for image in result.images], out)
    return out.getvalue()


def png_of(image: ImageDetections) -> bytes:
    """The annotated PNG the server rendered for this image (b"" when none was asked for)."""
    return next((r.content for r in image.renderings if r.format == "png"), b"")


# ---- classify -------------------------------------------------------------------------------


def classify_results(results: Sequence[ClassifyResult]) -> list[dict[str, Any]]:
    """One object per image: its name, its labels best first, and its error if it failed."""
    documents = []
    for result in results:
        for image in result.images:
            entry: dict[str, Any] = {
                "image": image.name,
                "labels": [{"label": label, "score": round(float(score), 5)} for label, score in image.labels],
            }
            if (error := error_dict(image.error)) is not None:
                entry["error"] = error
            documents.append(entry)
    return documents


def classify_csv(results: Sequence[ClassifyResult]) -> str:
    """One row per (image, label), best first, with the JSON's rounded scores."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CLASSIFY_CSV_HEADER)
    for document in classify_results(results):
        for rank, entry in enumerate(document["labels"], start=1):
            writer.writerow((document["image"], rank, entry["label"], entry["score"]))
    return out.getvalue()


# ---- embed ----------------------------------------------------------------------------------


def _embedded(key: str, item: Embedded) -> dict[str, Any]:
    data: dict[str, Any] = {key: item.key, "embedding": [round(float(v), 6) for v in item.embedding]}
    if (error := error_dict(item.error)) is not None:
        data["error"] = error
    return data


def embed_document(result: EmbedResult) -> dict[str, Any]:
    """The embeddings by item, then clusters and text-to-image rankings when there are any
    (rankings name the images, not their indices)."""
    document: dict[str, Any] = {
        "model": result.model,
        "images": [_embedded("image", item) for item in result.images],
        "texts": [_embedded("text", item) for item in result.texts],
    }
    if result.clusters:
        document["clusters"] = list(result.clusters)
    if result.rankings:
        document["rankings"] = [
            {
                "text": ranking.text,
                "images": [result.images[i].key for i in ranking.images],
                "scores": [round(float(s), 5) for s in ranking.scores],
            }
            for ranking in result.rankings
        ]
    return document


def embed_csv(result: EmbedResult) -> str:
    """One row per embedded item: kind, name, cluster (when clustered), then the JSON's vector."""
    document = embed_document(result)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    rows = [("image", e["image"], e) for e in document["images"]] + [("text", e["text"], e) for e in document["texts"]]
    width = max((len(e["embedding"]) for _, _, e in rows), default=0)
    writer.writerow(("kind", "name", "cluster", *(f"e{i}" for i in range(width))))
    clusters = document.get("clusters", [])
    for position, (kind, name, entry) in enumerate(rows):
        cluster = clusters[position] if position < len(clusters) else ""
        writer.writerow((kind, name, cluster, *entry["embedding"]))
    return out.getvalue()

