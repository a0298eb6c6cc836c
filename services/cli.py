"""The ``inferline`` command: run the stack, run one stage, and call the public API."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import logging
import os
import signal
import sys
import time
from pathlib import Path

import grpc

from inferline.common.errors import InferlineError
from inferline.common.generated import types_pb2
from inferline.common.logs import configure_logging
from inferline.common.server import serve
from inferline.common.settings import STAGES, Settings
from inferline.services import client
from inferline.services.stack import LocalStack

log = logging.getLogger("inferline")

EXIT_RPC_ERROR = 1
EXIT_SOME_IMAGES_FAILED = 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return EXIT_RPC_ERROR
    except (InferlineError, FileNotFoundError, RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_RPC_ERROR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inferline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve_cmd = commands.add_parser("serve", help="run one stage in the foreground")
    serve_cmd.add_argument("stage", choices=STAGES)
    serve_cmd.add_argument("--port", type=int, help="default: INFERLINE_<STAGE>_PORT")
    serve_cmd.set_defaults(handler=cmd_serve)

    up = commands.add_parser("up", help="run all four stages as local processes until Ctrl-C")
    up.set_defaults(handler=cmd_up)

    detect = commands.add_parser("detect", help="detect objects in images through the running stack")
    detect.add_argument("images", nargs="+", help="image files or directories")
    detect.add_argument("--model", default="yolov8n")
    detect.add_argument("--format", choices=("json", "csv", "png"), default="json")
    detect.add_argument("--out", type=Path, help="output file (json, csv) or directory (png); default stdout")
    detect.add_argument("--target", default="localhost:50051", help="controller address")
    detect.add_argument("--conf", type=float, help="confidence threshold (model default: 0.25)")
    detect.add_argument("--iou", type=float, help="NMS IoU threshold (model default: 0.7)")
    detect.add_argument("--max-det", type=int, help="most detections per image (model default: 300)")
    detect.add_argument("--classes", type=int, nargs="+", default=[], help="keep only these class ids")
    detect.add_argument("--batch", type=int, default=16, help="images per request")
    detect.add_argument("--timeout", type=float, default=60.0, help="deadline per request, seconds")
    detect.set_defaults(handler=cmd_detect)

    demo = commands.add_parser("demo", help="start the stack, detect the sample images, stop the stack")
    demo.add_argument("--images", nargs="*", default=[], help="more images or directories")
    demo.add_argument("--out", type=Path, default=Path("out/demo"))
    demo.add_argument("--model", default="yolov8n")
    demo.set_defaults(handler=cmd_demo)
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    configure_logging(settings.log_level, args.stage)
    port = args.port if args.port is not None else settings.port(args.stage)
    module = importlib.import_module(f"inferline.services.{args.stage}.servicer")

    async def run() -> None:
        await serve(module.build_service(settings), settings, port=port)

    try:
        asyncio.run(run())
    except InferlineError as exc:
        log.error("%s cannot start: %s", args.stage, exc)
        return 1
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    configure_logging(settings.log_level, "up")
    stack = LocalStack(settings)
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    stack.start()
    log.info("inferline is up: controller at %s (Ctrl-C stops it)", stack.controller_target)
    exited = None
    while not stopping and exited is None:
        exited = stack.exited()
        time.sleep(0.2)
    if exited:
        log.error("%s stopped unexpectedly; stopping the rest", exited)
    codes = stack.stop()
    log.info("stopped (%s)", ", ".join(f"{k}={v}" for k, v in codes.items()))
    return 1 if exited else 0


def _options(args: argparse.Namespace) -> types_pb2.DetectOptions:
    options = types_pb2.DetectOptions(classes=args.classes)
    if args.conf is not None:
        options.conf = args.conf
    if args.iou is not None:
        options.iou = args.iou
    if args.max_det is not None:
        options.max_det = args.max_det
    return options


def cmd_detect(args: argparse.Namespace) -> int:
    paths = client.collect_images(args.images)
    png = args.format == "png"
    if png and args.out is None:
        print("error: --format png needs --out DIR", file=sys.stderr)
        return EXIT_RPC_ERROR
    with client.open_channel(args.target) as channel:
        outcomes = client.detect(
            channel, paths, model=args.model, options=_options(args), png=png, batch=args.batch, timeout=args.timeout
        )
    if png:
        written = write_pngs(outcomes, args.out)
        for path in written:
            print(path)
    else:
        text = client.to_json(outcomes) if args.format == "json" else client.to_csv(outcomes)
        if args.out is None:
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
        else:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)
    failed = [o for o in outcomes if o.error is not None]
    for outcome in failed:
        print(f"error: {outcome.path}: {outcome.error[0]}: {outcome.error[1]}", file=sys.stderr)
    return EXIT_SOME_IMAGES_FAILED if failed else 0


def write_pngs(outcomes: list[client.ImageOutcome], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for outcome in outcomes:
        if outcome.png:
            path = out_dir / f"{outcome.path.stem}.png"
            path.write_bytes(outcome.png)
            written.append(path)
    return written


def sample_images() -> list[Path]:
    """ultralytics ships bus.jpg and zidane.jpg inside its package: samples that need no network.

    Found without importing ultralytics, whose import sets OMP_NUM_THREADS=1 in this process's
    environment, which the stages started next would inherit.
    """
    spec = importlib.util.find_spec("ultralytics")
    if spec is None or not spec.submodule_search_locations:
        return []
    assets = Path(next(iter(spec.submodule_search_locations))) / "assets"
    return [p for p in (assets / "bus.jpg", assets / "zidane.jpg") if p.is_file()]


def cmd_demo(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    configure_logging(settings.log_level, "demo")
    paths = sample_images() + (client.collect_images(args.images) if args.images else [])
    if not paths:
        print("error: no sample images (install ultralytics, or pass --images DIR)", file=sys.stderr)
        return EXIT_RPC_ERROR
    where = os.pathsep.join(map(str, settings.model_dir)) or "the default locations"
    print(f"starting the stack (weights from {where}) ...", flush=True)
    # The stages log warnings only (the weights check among them), so the demo's output reads.
    env = {"INFERLINE_LOG_LEVEL": "WARNING", **os.environ}
    with LocalStack(settings, env=env) as stack, client.open_channel(stack.controller_target) as channel:
        models = {m.name: m for m in client.list_models(channel, timeout=30)}
        outcomes = client.detect(channel, paths, model=args.model, options=types_pb2.DetectOptions(), png=True, timeout=120)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "detections.json"
    json_path.write_text(client.to_json(outcomes))
    pngs = write_pngs(outcomes, args.out / "annotated")
    print()
    for outcome in outcomes:
        summary = ", ".join(f"{d.label} {d.score:.2f}" for d in outcome.detections[:6]) or "nothing"
        more = f" (+{len(outcome.detections) - 6} more)" if len(outcome.detections) > 6 else ""
        print(f"  {outcome.path.name}: {summary}{more}")
    weights = models[args.model].weights if args.model in models else None
    print(f"\ndetections (JSON): {json_path}")
    print(f"annotated images:  {args.out / 'annotated'} ({len(pngs)} PNGs)")
    if weights is not None:
        verdict = "the official release" if weights.official else "NOT the official release (a stand-in or custom file)"
        print(f"weights: {weights.path} (sha256 {weights.sha256[:12]}...) are {verdict}")
    failed = [o for o in outcomes if o.error is not None]
    for outcome in failed:
        print(f"error: {outcome.path}: {outcome.error[0]}: {outcome.error[1]}", file=sys.stderr)
    return EXIT_SOME_IMAGES_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())
