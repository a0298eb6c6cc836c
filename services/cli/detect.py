"""``inferline detect``: ultralytics' ``yolo predict`` through the running stack.

Any source ``sources.py`` reads (files, folders, globs, URLs, stdin, ``.txt`` lists, videos,
streams, cameras), sent in requests of ``--batch`` frames with at most ``--inflight`` requests
outstanding (threads of the blocking client: the work is waiting on the network, and a bound
keeps a long video from piling frames up in memory), answered in order. Besides the JSON or CSV
on stdout it writes what ``yolo predict`` writes under a save directory: annotated images in the
source's format (an annotated video for a video), label files, crops, and COCO JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import json_format

from inferline.common.api import DetectRequest, DetectResult, ImageDetections, ImageInput
from inferline.common.detections import DetectOptions
from inferline.common.errors import Overloaded
from inferline.services.cli import shared, sources
from inferline.services.client import Client, defaults
from inferline.services.presentation import documents, exports

# Frames per request unless --batch says otherwise.
BATCH = 16
INFLIGHT = 2  # requests outstanding when a caller names none (the CLI's default: cli_inflight)
SAVE_DIR = Path("runs/detect/predict")
VIDEO_FOURCC = "mp4v"


def add_commands(commands: argparse._SubParsersAction) -> None:
    detect = commands.add_parser(
        "detect",
        help="detect objects in images and videos through the running stack",
        description="Flags or ultralytics-style key=value arguments: "
        "inferline detect source=bus.jpg imgsz=640 conf=0.3 save_txt=True",
    )
    detect.add_argument("source", nargs="*", help="files, folders, quoted globs, URLs, -, a .txt list, videos, 0")
    detect.add_argument("--model", default=defaults.DETECT_MODEL)
    detect.add_argument("--format", choices=documents.DETECT_FORMATS, default="json")
    detect.add_argument("--out", type=Path, help="output file (json, csv) or directory (png); default stdout")
    shared.add_target(detect)
    detect.add_argument("--conf", type=float, help="confidence threshold (model default: 0.25)")
    detect.add_argument("--iou", type=float, help="NMS IoU threshold (model default: 0.7)")
    detect.add_argument("--max-det", type=int, help="most detections per image (model default: 300)")
    detect.add_argument("--classes", type=int, nargs="+", default=[], help="keep only these class ids")
    detect.add_argument("--agnostic-nms", action="store_true", help="suppress overlapping boxes across classes")
    detect.add_argument("--imgsz", type=int, help="the model's input size; checked against the served model's")
    detect.add_argument("--batch", type=int, default=BATCH, help="frames per request")
    detect.add_argument("--inflight", type=int, help="requests outstanding at once (INFERLINE_CLI_INFLIGHT, 2)")
    shared.add_timeout(detect)
    detect.add_argument("--classify-with", default="", help="re-label each box with this zero-shot model")
    detect.add_argument("--labels", type=shared.labels, default=[], help='labels for --classify-with: "a car,a dog"')
    saving = detect.add_argument_group("files written under --save-dir, as yolo predict writes them")
    saving.add_argument("--save-dir", type=Path, help=f"default: {SAVE_DIR}, {SAVE_DIR}2, ... (a new one each run)")
    saving.add_argument("--save", action="store_true", help="annotated images in the source's format; videos as .mp4")
    saving.add_argument("--save-txt", action="store_true", help="labels/<stem>.txt: class xc yc w h, normalised")
    saving.add_argument("--save-conf", action="store_true", help="with --save-txt: the score at the end of each line")
    saving.add_argument("--save-crop", action="store_true", help="crops/<label>/<stem>.jpg of every detection")
    saving.add_argument("--save-json", action="store_true", help="predictions.json: COCO results (inferline eval)")
    detect.add_argument(
        "--url-max-mb", type=float, help="largest download a URL source may send (INFERLINE_CLI_URL_MAX_MB, 64)"
    )
    detect.add_argument(
        "--url-timeout", type=float, help="seconds a URL source may take (INFERLINE_CLI_URL_TIMEOUT_S, 30)"
    )
    detect.set_defaults(handler=cmd_detect)


def detect_frames(
    client: Client,
    request: DetectRequest,
    frames: Iterable[sources.Frame],
    batch: int = BATCH,
    inflight: int = INFLIGHT,
    retry_for_s: float = 60.0,
) -> Iterator[tuple[sources.Frame, ImageDetections, DetectResult]]:
    """Each frame with its detections (and the call's result, for its timings), in order;
    at most ``inflight`` calls of ``batch`` frames outstanding."""
    pending: deque[tuple[list[sources.Frame], Future[DetectResult]]] = deque()
    with ThreadPoolExecutor(max_workers=inflight, thread_name_prefix="detect") as pool:
        iterator = iter(frames)
        while chunk := list(itertools.islice(iterator, batch)):
            images = tuple(ImageInput(frame.data, frame.name) for frame in chunk)
            call = dataclasses.replace(request, images=images)
            pending.append((chunk, pool.submit(detect_retrying, client, call, retry_for_s)))
            if len(pending) >= inflight:
                yield from _answered(*pending.popleft())
        while pending:
            yield from _answered(*pending.popleft())


def detect_retrying(client: Client, request: DetectRequest, retry_for_s: float) -> DetectResult:
    """``client.detect``, called again after the server's hinted delay while it refuses for load
    (RESOURCE_EXHAUSTED with RetryInfo, as gRPC's retry pushback), for up to ``retry_for_s``: a
    video sends faster than a CPU stack detects, and its frames should wait, not fail."""
    started, backoff = time.monotonic(), 0.1
    while True:
        try:
            return client.detect(request)
        except Overloaded as exc:
            wait = exc.retry_after_s if exc.retry_after_s is not None else backoff
            if time.monotonic() - started + wait > retry_for_s:
                raise
            time.sleep(wait)
            backoff = min(backoff * 2, 2.0)


def _answered(
    chunk: list[sources.Frame], future: Future[DetectResult]
) -> Iterator[tuple[sources.Frame, ImageDetections, DetectResult]]:
    result = future.result()
    for frame, image in zip(chunk, result.images, strict=True):
        yield frame, image, result


def cmd_detect(args: argparse.Namespace) -> int:
    if not args.source:
        return shared.fail("give a source: files, folders, globs, URLs, -, a .txt list, videos or 0")
    settings = shared.settings(args)
    inflight = settings.cli_inflight if args.inflight is None else args.inflight
    if args.batch < 1 or inflight < 1:
        return shared.fail("--batch and --inflight must be >= 1")
    png = args.format == "png"
    if png and args.out is None:
        return shared.fail("--format png needs --out DIR")
    max_mb = settings.cli_url_max_mb if args.url_max_mb is None else args.url_max_mb
    timeout = settings.cli_url_timeout_s if args.url_timeout is None else args.url_timeout
    limits = sources.UrlLimits(max_bytes=int(max_mb * 1024 * 1024), timeout_s=timeout)
    found = sources.resolve(args.source, limits=limits)
    saving = args.save or args.save_txt or args.save_crop or args.save_json
    request = DetectRequest(
        model=args.model,
        images=(),
        options=DetectOptions(
            conf=args.conf, iou=args.iou, max_det=args.max_det, classes=tuple(args.classes), agnostic=args.agnostic_nms
        ),
        render=("png",) if png or args.save else (),
        classify_with=args.classify_with,
        labels=tuple(args.labels),
    )
    with shared.client(args) as client:
        if args.imgsz is not None:
            check_imgsz(client, args.model, args.imgsz)
        writer = SaveDir(args.save_dir or increment(SAVE_DIR), args) if saving else None
        answered = []
        try:
            answers = detect_frames(client, request, sources.all_frames(found), args.batch, inflight, args.timeout)
            for frame, image, result in answers:
                answered.append((frame, image, result))
                if writer is not None:
                    writer.add(frame, image)
        except KeyboardInterrupt:  # a stream or camera runs until Ctrl-C: keep what was answered
            print(f"interrupted after {len(answered)} frames", file=sys.stderr)
        finally:
            if writer is not None:
                writer.close()
    if writer is not None:
        print(f"results saved to {writer.root}", file=sys.stderr)
    results = [dataclasses.replace(result, images=[image]) for _, image, result in answered]
    if png:
        args.out.mkdir(parents=True, exist_ok=True)
        for frame, image, _ in answered:
            if content := documents.png_of(image):
                path = args.out / f"{frame.stem}.png"
                path.write_bytes(content)
                print(path)
    elif args.format == "json":
        shared.write(json.dumps({"results": result_documents(answered)}, indent=2), args.out)
    else:
        shared.write(documents.detect_csv(results), args.out)
    return shared.report_failures((image.name, image.error) for _, image, _ in answered)


def result_documents(answered: Sequence[tuple[sources.Frame, ImageDetections, DetectResult]]) -> list[dict[str, Any]]:
    """The documented JSON object per image; a video frame's adds its ``frame`` (from 0) and
    ``timestamp_s`` (frame / the video's fps)."""
    documents_ = []
    for frame, image, result in answered:
        (document,) = documents.detect_results([dataclasses.replace(result, images=[image])])
        if frame.frame is not None:
            document["frame"] = frame.frame
            document["timestamp_s"] = frame.timestamp_s
        documents_.append(document)
    return documents_


def check_imgsz(client: Client, model: str, imgsz: int) -> None:
    """The served model's input size is its config's (one compiled graph per size, as Triton's
    model configs): a different ``imgsz`` is refused rather than silently ignored."""
    metadata = client.model(model)
    size: Any = json_format.MessageToDict(metadata.preprocess.params).get("size")
    served = [int(v) for v in size] if isinstance(size, list) else [int(size)] if size else []
    if served and set(served) != {imgsz}:
        shown = "x".join(map(str, served))
        raise RuntimeError(
            f"{model} is served at imgsz {shown}, not {imgsz}: the size is the model's config "
            f"(preprocess size in its config.yaml), so serve a model configured for {imgsz} or drop imgsz"
        )


def increment(path: Path) -> Path:
    """``path``, or ``path2``, ``path3``... the first that does not exist (ultralytics' runs)."""
    if not path.exists():
        return path
    return next(p for n in itertools.count(2) if not (p := path.with_name(f"{path.name}{n}")).exists())


class SaveDir:
    """What ``yolo predict`` saves, under one directory, written as answers arrive (so a long
    video is never held in memory)."""

    def __init__(self, root: Path, args: argparse.Namespace):
        import cv2  # noqa: PLC0415 - image files only where they are written

        self.cv2: Any = cv2
        self.root = root
        self.args = args
        self.coco: list[dict[str, Any]] = []
        self.videos: dict[str, Any] = {}
        root.mkdir(parents=True, exist_ok=True)

    def add(self, frame: sources.Frame, image: ImageDetections) -> None:
        if image.error is not None:
            return
        if self.args.save:
            self._annotated(frame, image)
        if self.args.save_txt and (
            lines := exports.yolo_lines(image.detections, image.width, image.height, save_conf=self.args.save_conf)
        ):
            labels = self.root / "labels"
            labels.mkdir(exist_ok=True)
            with (labels / f"{frame.stem}.txt").open("a") as out:
                out.writelines(line + "\n" for line in lines)
        if self.args.save_crop and image.detections:
            self._crops(frame, image)
        if self.args.save_json:
            self.coco.extend(exports.coco_entries(frame.stem, Path(frame.name).name, image.detections))

    def _annotated(self, frame: sources.Frame, image: ImageDetections) -> None:
        pixels = self.cv2.imdecode(np.frombuffer(documents.png_of(image), np.uint8), self.cv2.IMREAD_COLOR)
        if frame.frame is None:
            self.cv2.imwrite(str(self.root / f"{frame.stem}{frame.suffix}"), pixels)
            return
        writer = self.videos.get(frame.source)
        if writer is None:
            stem = frame.stem.rsplit("_", 1)[0]
            writer = self.cv2.VideoWriter(
                str(self.root / f"{stem}.mp4"),
                self.cv2.VideoWriter.fourcc(*VIDEO_FOURCC),
                frame.fps or sources.DEFAULT_FPS,
                (pixels.shape[1], pixels.shape[0]),
            )
            self.videos[frame.source] = writer
        writer.write(pixels)

    def _crops(self, frame: sources.Frame, image: ImageDetections) -> None:
        from PIL import Image  # noqa: PLC0415 - ultralytics saves crops with Pillow; so do we

        original = self.cv2.imdecode(np.frombuffer(frame.data, np.uint8), self.cv2.IMREAD_COLOR)
        for detection in image.detections:
            cut = exports.crop(original, detection)
            folder = self.root / "crops" / detection.label
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{frame.stem}.jpg"
            if path.exists():
                path = next(p for n in itertools.count(2) if not (p := folder / f"{frame.stem}{n}.jpg").exists())
            Image.fromarray(np.ascontiguousarray(cut[..., ::-1])).save(path, quality=95, subsampling=0)

    def close(self) -> None:
        for writer in self.videos.values():
            writer.release()
        if self.args.save_json:
            (self.root / "predictions.json").write_text(json.dumps(self.coco))
