"""The ``inferline`` command: run the stack, run one stage, and call the public API."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import importlib.util
import json
import logging
import os
import signal
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
from google.protobuf import json_format

from inferline.common.errors import InferlineError
from inferline.common.generated import types_pb2
from inferline.common.logs import configure_logging
from inferline.common.server import serve
from inferline.common.settings import GATEWAY, STAGES, Settings
from inferline.services import client
from inferline.services.inference.repository import BUILTIN_REPOSITORY, ModelConfig, load_repository
from inferline.services.inference.weights import find_local
from inferline.services.stack import UP_ORDER, LocalStack, parse_replicas

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

    serve_cmd = commands.add_parser("serve", help="run one stage (or the HTTP gateway) in the foreground")
    serve_cmd.add_argument("stage", choices=(*STAGES, GATEWAY))
    serve_cmd.add_argument("--port", type=int, help="default: INFERLINE_<STAGE>_PORT")
    serve_cmd.add_argument(
        "--exit-with-parent", type=int, metavar="PID",
        help="stop (as on SIGTERM) when process PID, which started this one, exits even by SIGKILL "
             "(how `inferline up` starts its stages, so none outlives it holding its port; Linux)",
    )
    _add_inprocess(serve_cmd)
    serve_cmd.set_defaults(handler=cmd_serve)

    up = commands.add_parser(
        "up", help="run the four stages and the HTTP gateway as local processes until Ctrl-C, restarting any that exits"
    )
    _add_inprocess(up)
    up.add_argument(
        "--replicas", action="append", default=[], metavar="STAGE=N",
        help="run N copies of a stage on ports of their own, its callers spread over them "
             "(repeatable: --replicas inference=2 --replicas postprocess=2)",
    )
    up.set_defaults(handler=cmd_up)

    detect = commands.add_parser("detect", help="detect objects in images through the running stack")
    detect.add_argument("images", nargs="+", help="image files or directories")
    detect.add_argument("--model", default="yolov8n")
    detect.add_argument("--format", choices=("json", "csv", "png"), default="json")
    detect.add_argument("--out", type=Path, help="output file (json, csv) or directory (png); default stdout")
    _add_target(detect)
    detect.add_argument("--conf", type=float, help="confidence threshold (model default: 0.25)")
    detect.add_argument("--iou", type=float, help="NMS IoU threshold (model default: 0.7)")
    detect.add_argument("--max-det", type=int, help="most detections per image (model default: 300)")
    detect.add_argument("--classes", type=int, nargs="+", default=[], help="keep only these class ids")
    detect.add_argument("--batch", type=int, default=16, help="images per request")
    _add_timeout(detect)
    detect.add_argument("--classify-with", default="", help="re-label each box with this zero-shot model")
    detect.add_argument("--labels", type=_labels, default=[], help='labels for --classify-with: "a car,a dog"')
    detect.set_defaults(handler=cmd_detect)

    classify = commands.add_parser("classify", help="zero-shot classify images against your labels")
    classify.add_argument("images", nargs="+", help="image files or directories")
    classify.add_argument("--labels", type=_labels, required=True, help='comma-separated: "a bus,a dog"')
    classify.add_argument("--model", default="clip-vit-b-32")
    classify.add_argument("--top-k", type=int, default=0, help="labels per image (default: all)")
    classify.add_argument("--format", choices=("json", "csv"), default="json")
    classify.add_argument("--out", type=Path, help="output file; default stdout")
    _add_target(classify)
    _add_timeout(classify)
    classify.set_defaults(handler=cmd_classify)

    embed = commands.add_parser("embed", help="L2-normalised embeddings of images and texts")
    embed.add_argument("--image", action="append", default=[], help="an image file or directory (repeatable)")
    embed.add_argument("--text", action="append", default=[], help="a text (repeatable)")
    embed.add_argument("--model", default="clip-vit-b-32")
    embed.add_argument("--cluster", type=int, default=0, metavar="K", help="k-means the batch into K clusters")
    embed.add_argument("--threshold", type=float, default=0.0, help="group items with cosine >= this (near-duplicates)")
    embed.add_argument("--format", choices=("json", "csv"), default="json")
    embed.add_argument("--out", type=Path, help="output file; default stdout")
    _add_target(embed)
    _add_timeout(embed)
    embed.set_defaults(handler=cmd_embed)

    export = commands.add_parser("export", help="export a model of the repository to ONNX")
    export.add_argument("--model", required=True, help="a model name from the repository")
    export.add_argument("--format", choices=("onnx",), default="onnx")
    export.add_argument("--dynamic-batch", action="store_true", help="a batch dimension of any size (else 1)")
    export.add_argument("--half", action="store_true", help="fp16 weights (for GPUs)")
    export.add_argument("--out", type=Path, help="output file (default: MODEL.onnx here)")
    export.set_defaults(handler=cmd_export)

    bench = commands.add_parser("bench", help="drive the running stack with concurrent requests; throughput, latency, memory")
    bench.add_argument("--model", default="yolov8n", help="a detect or embed model")
    bench.add_argument("--images", nargs="+", required=True, help="image files or directories")
    bench.add_argument("--concurrency", type=int, default=8, help="requests in flight (closed loop)")
    bench.add_argument("--duration", type=float, default=20.0, help="seconds measured, after the warm-up")
    bench.add_argument("--warmup", type=float, default=3.0, help="seconds sent first and not counted")
    bench.add_argument("--batch", type=int, default=1, help="images per request")
    bench.add_argument("--honour-retry", action="store_true",
                       help="after a refusal, wait the server's RetryInfo hint before the next call (as gRPC's retry pushback does)")
    bench.add_argument("--pid", action="append", default=[], metavar="STAGE=PID",
                       help="a stage's process for the memory figures (default: found by command line)")
    bench.add_argument("--json", action="store_true", help="one JSON object instead of text")
    _add_target(bench)
    _add_timeout(bench)
    bench.set_defaults(handler=cmd_bench)

    models = commands.add_parser("models", help="list the served models")
    models.add_argument("--json", action="store_true", help="full metadata as JSON")
    _add_target(models)
    models.set_defaults(handler=cmd_models)

    profile = commands.add_parser("profile", help="PyTorch profiler trace of the inference stage's next N batches")
    profile.add_argument("--batches", type=int, default=10, help="forward passes to capture")
    profile.add_argument("--model", default="", help="only this model's passes (default: the first to run)")
    profile.add_argument("--metrics", help="the inference stage's metrics address (default: localhost:INFERLINE_INFERENCE_METRICS_PORT)")
    profile.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the batches")
    profile.set_defaults(handler=cmd_profile)

    demo = commands.add_parser("demo", help="start the stack, detect the sample images, stop the stack")
    demo.add_argument("--images", nargs="*", default=[], help="more images or directories")
    demo.add_argument("--out", type=Path, default=Path("out/demo"))
    demo.add_argument("--model", default="yolov8n")
    demo.set_defaults(handler=cmd_demo)
    return parser


def _add_inprocess(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--inprocess", action="store_true",
        help="the controller runs the three stages' code in its own process, without gRPC between "
             "them (INFERLINE_INPROCESS=true): for measuring what the service boundaries cost",
    )


def _add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="localhost:50051", help="controller address")


def _add_timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline per request, seconds")


def _labels(raw: str) -> list[str]:
    labels = [part.strip() for part in raw.split(",") if part.strip()]
    if not labels:
        raise argparse.ArgumentTypeError("give at least one label")
    return labels


def _write(text: str, out: Path | None) -> None:
    if out is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)


def _exit_with_parent(parent: int) -> None:
    """SIGTERM this process when its parent exits; armed here, after exec, rather than in a
    preexec_fn, which is unsafe in a parent with threads. A parent already gone ends it now."""
    if sys.platform != "linux":
        return
    import ctypes  # noqa: PLC0415 - Linux only

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        raise SystemExit(f"the process that started this one ({parent}) has already exited")


def cmd_serve(args: argparse.Namespace) -> int:
    if args.exit_with_parent is not None:
        _exit_with_parent(args.exit_with_parent)
    settings = Settings.from_env()
    if args.inprocess:
        if args.stage != "controller":
            print("error: --inprocess is a mode of the controller (inferline serve controller --inprocess)", file=sys.stderr)
            return EXIT_RPC_ERROR
        settings = dataclasses.replace(settings, inprocess=True)
    configure_logging(settings.log_level, args.stage, settings.log_format)
    if args.stage == GATEWAY:
        return serve_gateway(settings, args.port)
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


def serve_gateway(settings: Settings, port: int | None) -> int:
    """`inferline serve gateway`: the HTTP gateway in front of the controller at INFERLINE_CONTROLLER_TARGET."""
    from inferline.services.gateway.server import serve as serve_http  # FastAPI only where it is used

    if port is not None:
        settings = dataclasses.replace(settings, gateway_port=port)
    asyncio.run(serve_http(settings))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    """Arms the inference stage's profiler (docs/monitoring.md) and prints where the trace went."""
    address = args.metrics or f"localhost:{Settings.from_env().inference_metrics_port}"
    query = urllib.parse.urlencode({"batches": args.batches, "timeout": args.timeout, **({"model": args.model} if args.model else {})})
    request = urllib.request.Request(f"http://{address}/debug/profile?{query}", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout + 10) as reply:
            print(reply.read().decode())
    except urllib.error.HTTPError as exc:
        print(f"error: {json.loads(exc.read()).get('error', exc.reason)}", file=sys.stderr)
        return EXIT_RPC_ERROR
    except OSError as exc:
        print(f"error: cannot reach the inference stage's metrics port at {address} ({exc}); "
              "pass --metrics HOST:PORT", file=sys.stderr)
        return EXIT_RPC_ERROR
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    """The stack, supervised: a process that exits is restarted (services/stack.py) until
    SIGTERM or Ctrl-C stops `inferline up` itself."""
    settings = Settings.from_env()
    configure_logging(settings.log_level, "up")
    replicas = parse_replicas(args.replicas)
    # The gateway finds the controller where this stack puts it, unless told otherwise.
    env = {"INFERLINE_CONTROLLER_TARGET": f"localhost:{settings.controller_port}", **os.environ}
    if args.inprocess:  # one controller process holding the three stages, and the gateway
        if set(replicas) - {"controller"}:
            print("error: with --inprocess only the controller has replicas (--replicas controller=N)", file=sys.stderr)
            return EXIT_RPC_ERROR
        env["INFERLINE_INPROCESS"] = "true"
        stack = LocalStack(settings, env=env, stages=("controller", "gateway"), replicas=replicas, supervise=True)
    else:
        stack = LocalStack(settings, env=env, stages=UP_ORDER, replicas=replicas, supervise=True)
    stopping = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    stack.start()
    log.info(
        "inferline is up: controller at %s, gateway at http://localhost:%d (Ctrl-C stops it)",
        stack.controller_target, settings.gateway_port,
    )
    while not stopping.wait(0.5):  # the signal handler runs on this thread, between waits
        pass
    codes = stack.stop()
    log.info("stopped (%s)", ", ".join(f"{k}={v}" for k, v in codes.items()))
    return 0


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
            channel, paths, model=args.model, options=_options(args), png=png, batch=args.batch, timeout=args.timeout,
            classify_with=args.classify_with, labels=args.labels,
        )
    if png:
        written = write_pngs(outcomes, args.out)
        for path in written:
            print(path)
    else:
        _write(client.to_json(outcomes) if args.format == "json" else client.to_csv(outcomes), args.out)
    failed = [o for o in outcomes if o.error is not None]
    for outcome in failed:
        print(f"error: {outcome.path}: {outcome.error[0]}: {outcome.error[1]}", file=sys.stderr)
    return EXIT_SOME_IMAGES_FAILED if failed else 0


def cmd_classify(args: argparse.Namespace) -> int:
    paths = client.collect_images(args.images)
    with client.open_channel(args.target) as channel:
        results = client.classify(channel, paths, model=args.model, labels=args.labels, top_k=args.top_k, timeout=args.timeout)
    text = json.dumps({"results": results}, indent=2) if args.format == "json" else client.classify_csv(results)
    _write(text, args.out)
    return _report_failures([(r["image"], r.get("error")) for r in results])


def cmd_embed(args: argparse.Namespace) -> int:
    if not args.image and not args.text:
        print("error: give --image and/or --text", file=sys.stderr)
        return EXIT_RPC_ERROR
    paths = client.collect_images(args.image) if args.image else []
    with client.open_channel(args.target) as channel:
        result = client.embed(
            channel, model=args.model, images=paths, texts=args.text,
            cluster_k=args.cluster, cluster_threshold=args.threshold, timeout=args.timeout,
        )
    _write(json.dumps(result) if args.format == "json" else client.embed_csv(result), args.out)
    return _report_failures([(e.get("image") or e.get("text"), e.get("error")) for e in result["images"] + result["texts"]])


def cmd_export(args: argparse.Namespace) -> int:
    from inferline.services.inference.export import export_onnx
    from inferline.services.inference.weights import resolve_weights

    settings = Settings.from_env()
    configs = load_repository(settings.model_repository or BUILTIN_REPOSITORY)
    if args.model not in configs:
        print(f"error: no model {args.model!r} in the repository (models: {', '.join(sorted(configs))})", file=sys.stderr)
        return EXIT_RPC_ERROR
    config = configs[args.model]
    weights = resolve_weights(
        config.weights, model=config.name, model_dir=settings.model_dir, allow_download=settings.allow_download,
        trusted=settings.trusted_weights,
    )
    out = args.out or Path(f"{config.name}.onnx")
    try:
        path = export_onnx(config, weights.path, out, dynamic_batch=args.dynamic_batch, half=args.half)
    except (NotImplementedError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_RPC_ERROR
    print(path)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from inferline.services import loadgen  # noqa: PLC0415 - numpy-heavy, only for this command

    if args.concurrency < 1 or args.batch < 1 or args.duration <= 0 or args.warmup < 0:
        print("error: --concurrency and --batch must be >= 1, --duration > 0, --warmup >= 0", file=sys.stderr)
        return EXIT_RPC_ERROR
    try:
        pids = loadgen.parse_pids(args.pid) if args.pid else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_RPC_ERROR
    try:
        result = loadgen.run(
            args.target, args.model, client.collect_images(args.images), concurrency=args.concurrency,
            duration=args.duration, batch=args.batch, warmup=args.warmup, timeout=args.timeout,
            honour_retry=args.honour_retry, pids=pids,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_RPC_ERROR
    report = result.to_dict()
    print(json.dumps(report) if args.json else result.to_text())
    if not result.images_ok:
        print(f"error: no image was answered in {args.duration:g} s (failures by code: {report['error_codes'] or 'per-image statuses'})", file=sys.stderr)
        return EXIT_RPC_ERROR
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    with client.open_channel(args.target) as channel:
        models = client.list_models(channel, timeout=30)
    if args.json:
        print(json.dumps({"models": [json_format.MessageToDict(m, preserving_proto_field_name=True) for m in models]}, indent=2))
        return 0
    print(f"{'model':<40} {'task':<8} {'backend':<8} {'version':<8} weights")
    for m in models:
        weights = "official" if m.weights.official else "not official"
        print(f"{m.name:<40} {m.task:<8} {m.platform:<8} {','.join(m.versions):<8} {weights} ({Path(m.weights.path).name})")
    return 0


def _report_failures(items: list[tuple[str, dict | None]]) -> int:
    failed = [(name, error) for name, error in items if error]
    for name, error in failed:
        print(f"error: {name}: {error['code']}: {error['message']}", file=sys.stderr)
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


# Labels for the demo's zero-shot step: the stand-in detectors were trained on these shapes.
DEMO_LABELS = ["a circle", "a triangle", "a square", "a star"]


def demo_models(settings: Settings) -> tuple[dict[str, ModelConfig], list[str]]:
    """The repository's models whose weights are on disk here, and the names of the rest."""
    configs = load_repository(settings.model_repository or BUILTIN_REPOSITORY, settings.models)
    if settings.models:
        return configs, []
    present = {name: c for name, c in configs.items() if find_local(c.weights, settings.model_dir) is not None}
    return present, [name for name in configs if name not in present]


def cmd_demo(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    paths = sample_images() + (client.collect_images(args.images) if args.images else [])
    if not paths:
        print("error: no sample images (install ultralytics, or pass --images DIR)", file=sys.stderr)
        return EXIT_RPC_ERROR
    models, skipped = demo_models(settings)
    detectors = [name for name, c in models.items() if c.task == "detect"]
    zero_shot = [name for name, c in models.items() if c.task == "embed" and c.postprocess.params.get("text_model") in models]
    if not detectors:
        where = os.pathsep.join(map(str, settings.model_dir)) or "INFERLINE_MODEL_DIR (unset)"
        print(f"error: no detection model has its weights in {where}; put yolov8n.pt there", file=sys.stderr)
        return EXIT_RPC_ERROR
    where = os.pathsep.join(map(str, settings.model_dir)) or "the default locations"
    print(f"starting the stack with {', '.join(models)} (weights from {where}) ...", flush=True)
    if skipped:
        print(f"  (skipping {', '.join(skipped)}: no weights here)", flush=True)
    # The stages log warnings only (the weights check among them), so the demo's output reads.
    env = {"INFERLINE_LOG_LEVEL": "WARNING", **os.environ, "INFERLINE_MODELS": ",".join(models)}
    failed = []
    with LocalStack(settings, env=env) as stack, client.open_channel(stack.controller_target) as channel:
        served = {m.name: m for m in client.list_models(channel, timeout=30)}
        for model in detectors:
            outcomes = client.detect(
                channel, paths, model=model, options=types_pb2.DetectOptions(), png=True, timeout=300,
                classify_with=zero_shot[0] if zero_shot else "", labels=DEMO_LABELS if zero_shot else (),
            )
            folder = args.out / model
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "detections.json").write_text(client.to_json(outcomes))
            pngs = write_pngs(outcomes, folder / "annotated")
            print(f"\n{model}: {folder / 'detections.json'}, {len(pngs)} annotated PNGs in {folder / 'annotated'}")
            for outcome in outcomes:
                summary = ", ".join(f"{d.label} {d.score:.2f}" for d in outcome.detections[:5]) or "nothing"
                more = f" (+{len(outcome.detections) - 5} more)" if len(outcome.detections) > 5 else ""
                print(f"  {outcome.path.name}: {summary}{more}")
            failed += [(str(o.path), {"code": o.error[0], "message": o.error[1]}) for o in outcomes if o.error]
        for model in zero_shot:
            results = client.classify(channel, paths, model=model, labels=DEMO_LABELS, top_k=1, timeout=300)
            path = args.out / model / "classify.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"results": results}, indent=2))
            print(f"\n{model} zero-shot against {DEMO_LABELS}: {path}")
            failed += [(r["image"], r.get("error")) for r in results]
    print()
    for name in models:
        weights = served[name].weights if name in served else None
        if weights is not None:
            verdict = "the official release" if weights.official else "NOT the official release (a stand-in or custom file)"
            print(f"weights of {name}: {weights.path} are {verdict}")
    return _report_failures(failed)


if __name__ == "__main__":
    sys.exit(main())
