"""A small synchronous client of the public API, shared by the CLI, the demo and benchmarks."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from inferline.common.detections import Detection, detections_from_proto
from inferline.common.generated import controller_pb2, controller_pb2_grpc, inference_pb2, types_pb2
from inferline.common.status import code_from_status
from inferline.services.postprocess.renderers import RenderInput, result_dict, write_csv

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def collect_images(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, and the images inside any directory (sorted, not recursive)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"no such image or directory: {path}")
    if not found:
        raise FileNotFoundError("no images found in " + ", ".join(map(str, paths)))
    return found


def open_channel(target: str) -> grpc.Channel:
    return grpc.insecure_channel(
        target,
        options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)],
    )


@dataclass(frozen=True)
class ImageOutcome:
    path: Path
    width: int
    height: int
    detections: list[Detection]
    error: tuple[str, str] | None  # (status code name, message)
    png: bytes
    timings_ms: dict[str, float]

    def as_render_input(self) -> RenderInput:
        return RenderInput(str(self.path), self.width, self.height, self.detections)

    def to_dict(self) -> dict[str, Any]:
        data = result_dict(self.as_render_input())
        if self.error is not None:
            data["error"] = {"code": self.error[0], "message": self.error[1]}
        data["timings_ms"] = {k: round(v, 2) for k, v in sorted(self.timings_ms.items())}
        return data


def detect(
    channel: grpc.Channel,
    paths: Sequence[Path],
    *,
    model: str,
    options: types_pb2.DetectOptions,
    png: bool = False,
    batch: int = 16,
    timeout: float | None = None,
    classify_with: str = "",
    labels: Sequence[str] = (),
) -> list[ImageOutcome]:
    stub = controller_pb2_grpc.ControllerServiceStub(channel)
    outcomes: list[ImageOutcome] = []
    for start in range(0, len(paths), batch):
        chunk = paths[start : start + batch]
        request = controller_pb2.DetectRequest(
            model=model,
            images=[types_pb2.Image(data=p.read_bytes(), name=str(p)) for p in chunk],
            options=options,
            render=[types_pb2.RENDER_FORMAT_PNG] if png else [],
            classify_with=classify_with,
            labels=labels,
        )
        outcomes.extend(detect_outcomes(chunk, stub.Detect(request, timeout=timeout)))
    return outcomes


def detect_outcomes(names: Sequence[str | Path], response: controller_pb2.DetectResponse) -> list[ImageOutcome]:
    """One outcome per image of a Detect response; the HTTP gateway shares it, so its JSON is the CLI's."""
    outcomes = []
    for name, result in zip(names, response.results):
        error = None
        if result.status.code != 0:
            error = (code_from_status(result.status).name, result.status.message)
        outcomes.append(
            ImageOutcome(
                path=Path(name),
                width=result.width,
                height=result.height,
                detections=detections_from_proto(result.detections),
                error=error,
                png=next((r.content for r in result.renderings if r.format == types_pb2.RENDER_FORMAT_PNG), b""),
                timings_ms=dict(response.timings_ms),
            )
        )
    return outcomes


def to_json(outcomes: Sequence[ImageOutcome]) -> str:
    return json.dumps({"results": [o.to_dict() for o in outcomes]}, indent=2)


def to_csv(outcomes: Sequence[ImageOutcome]) -> str:
    out = io.StringIO()
    write_csv([o.as_render_input() for o in outcomes], out)
    return out.getvalue()


def list_models(channel: grpc.Channel, timeout: float | None = None) -> list[inference_pb2.ModelMetadataResponse]:
    stub = controller_pb2_grpc.ControllerServiceStub(channel)
    return list(stub.ListModels(inference_pb2.ListModelsRequest(), timeout=timeout).models)


def _error(status) -> dict[str, str] | None:
    if status.code == 0:
        return None
    return {"code": code_from_status(status).name, "message": status.message}


def classify(
    channel: grpc.Channel,
    paths: Sequence[Path],
    *,
    model: str,
    labels: Sequence[str],
    top_k: int = 0,
    batch: int = 16,
    timeout: float | None = None,
) -> list[dict[str, Any]]:
    """One dict per image in the CLI's JSON shape: image, labels (best first), error if any."""
    stub = controller_pb2_grpc.ControllerServiceStub(channel)
    results = []
    for start in range(0, len(paths), batch):
        chunk = paths[start : start + batch]
        response = stub.Classify(
            controller_pb2.ClassifyRequest(
                model=model, labels=labels, top_k=top_k,
                images=[types_pb2.Image(data=p.read_bytes(), name=str(p)) for p in chunk],
            ),
            timeout=timeout,
        )
        results.extend(classify_results(chunk, response))
    return results


def classify_results(names: Sequence[str | Path], response: controller_pb2.ClassifyResponse) -> list[dict[str, Any]]:
    results = []
    for name, result in zip(names, response.results):
        entry: dict[str, Any] = {
            "image": str(name),
            "labels": [{"label": ls.label, "score": round(float(ls.score), 5)} for ls in result.labels],
        }
        if (error := _error(result.status)) is not None:
            entry["error"] = error
        results.append(entry)
    return results


def classify_csv(results: Sequence[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(("image", "rank", "label", "score"))
    for result in results:
        for rank, entry in enumerate(result["labels"], start=1):
            writer.writerow((result["image"], rank, entry["label"], entry["score"]))
    return out.getvalue()


def embed(
    channel: grpc.Channel,
    *,
    model: str,
    images: Sequence[Path] = (),
    texts: Sequence[str] = (),
    cluster_k: int = 0,
    cluster_threshold: float = 0.0,
    timeout: float | None = None,
) -> dict[str, Any]:
    stub = controller_pb2_grpc.ControllerServiceStub(channel)
    response = stub.Embed(
        controller_pb2.EmbedRequest(
            model=model,
            images=[types_pb2.Image(data=p.read_bytes(), name=str(p)) for p in images],
            texts=texts,
            cluster=types_pb2.ClusterOptions(k=cluster_k, threshold=cluster_threshold),
        ),
        timeout=timeout,
    )
    return embed_result(images, texts, response)


def embed_result(
    images: Sequence[str | Path], texts: Sequence[str], response: controller_pb2.EmbedResponse
) -> dict[str, Any]:
    """The CLI's JSON shape of an Embed response, given the names of the images sent."""

    def entry(key: str, value: str, item) -> dict[str, Any]:
        data: dict[str, Any] = {key: value, "embedding": [round(float(v), 6) for v in item.embedding]}
        if (error := _error(item.status)) is not None:
            data["error"] = error
        return data

    result: dict[str, Any] = {
        "model": response.model,
        "images": [entry("image", str(p), item) for p, item in zip(images, response.images)],
        "texts": [entry("text", t, item) for t, item in zip(texts, response.texts)],
    }
    if response.clusters:
        result["clusters"] = list(response.clusters)
    if response.rankings:
        result["rankings"] = [
            {"text": r.text, "images": [str(images[i]) for i in r.images], "scores": [round(float(s), 5) for s in r.scores]}
            for r in response.rankings
        ]
    return result


def embed_csv(result: dict[str, Any]) -> str:
    """One row per embedded item: kind, name, cluster (when clustered), then the vector."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    rows = [("image", e["image"], e) for e in result["images"]] + [("text", e["text"], e) for e in result["texts"]]
    width = max((len(e["embedding"]) for _, _, e in rows), default=0)
    writer.writerow(("kind", "name", "cluster", *(f"e{i}" for i in range(width))))
    clusters = result.get("clusters", [])
    for position, (kind, name, entry) in enumerate(rows):
        cluster = clusters[position] if position < len(clusters) else ""
        writer.writerow((kind, name, cluster, *entry["embedding"]))
    return out.getvalue()
