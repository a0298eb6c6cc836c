"""End-to-end Detect benchmark: the four-service pipeline vs ultralytics' own predict, one run.

Contenders, measured in the same process run and interleaved round by round so that they share
the machine's noise (the order rotates each round so none always goes first):

* ``ultralytics``      ``YOLO(weights).predict(source=str(image), verbose=False, device="cpu")``,
                       one image at a time, default conf/iou: the reference.
* ``inferline-c1``     one image per Detect request, one client, sequential requests, through
                       a LocalStack (the four services as local processes on free ports).
* ``inferline-cN``     N concurrent clients (threads, each with its own channel), each sending
                       its own sequential one-image requests over the whole image list.

Per contender: images/s (median of the per-round throughputs, and the pooled figure), p50/p95
latency per request (pooled over the measured rounds), ratios to ultralytics, and the
per-stage ``timings_ms`` the Detect response carries, averaged per stage.

Writes ``<out>/baseline-detect-cpu.json`` and ``<out>/baseline-detect-cpu.md``.

    .venv/bin/python bench/e2e_detect.py                      # shared images + bus/zidane
    .venv/bin/python bench/e2e_detect.py --images ../shared/data --rounds 5 --concurrency 1 4
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
RESULT_STEM = "baseline-detect-cpu"
MODEL = "yolov8n"
WEIGHTS_FILE = "yolov8n.pt"
# The only yolov8n.pt files this benchmark will unpickle.
KNOWN_WEIGHTS = {
    "33f4216002cafa403a4588a328e025d1542f2acda1e632c2f7ba8a9a95359b3b": "stand-in (../shared/models/MANIFEST.md)",
    "f59b3d833e2ff32e194b5bb8e08d211dc7c5bdf144b90d2c8412c47ccfc83b36": "official ultralytics v8 release",
}
STAGE_KEYS = ("preprocess", "inference", "postprocess", "total")
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


# --------------------------------------------------------------------------------------------
# Arguments and inputs


def default_images() -> list[str]:
    found = []
    if (SHARED / "data").is_dir():
        found.append(str(SHARED / "data"))
    try:
        import ultralytics

        assets = Path(ultralytics.__file__).parent / "assets"
        found += [str(assets / name) for name in ("bus.jpg", "zidane.jpg") if (assets / name).is_file()]
    except ImportError:
        pass
    return found


def default_model_dir() -> str:
    return os.environ.get("INFERLINE_MODEL_DIR") or str(SHARED / "models")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", nargs="+", default=None,
                   help="image files or directories (default: ../shared/data if present, plus "
                        "ultralytics' bundled bus.jpg and zidane.jpg)")
    p.add_argument("--rounds", type=int, default=5, help="measured passes over the images (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up passes, not measured (default 1)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4],
                   help="client counts for the inferline contenders (default: 1 4)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="results directory")
    p.add_argument("--model-dir", default=None, help="directory holding yolov8n.pt (default: $INFERLINE_MODEL_DIR "
                                                   "or ../shared/models)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch intra-op threads for BOTH ultralytics (this process) and the inference stage "
                        "(default 1: what ultralytics itself uses, as it sets OMP_NUM_THREADS=1 on import)")
    p.add_argument("--start-timeout", type=float, default=180.0, help="seconds to wait for the stack to serve")
    p.add_argument("--request-timeout", type=float, default=60.0, help="deadline of each Detect call (s)")
    args = p.parse_args(argv)
    if args.images is None:
        args.images = default_images()
    if args.model_dir is None:
        args.model_dir = default_model_dir()
    if args.rounds < 1 or args.warmup < 0:
        p.error("--rounds must be >= 1 and --warmup >= 0")
    if args.torch_threads < 1:
        p.error("--torch-threads must be >= 1")
    if any(n < 1 for n in args.concurrency):
        p.error("--concurrency values must be >= 1")
    args.concurrency = sorted(set(args.concurrency))
    return args


# --------------------------------------------------------------------------------------------
# Measurements


@dataclass
class Pass:
    """One contender's pass over the images in one round."""

    wall_s: float
    latencies_ms: list[float]
    timings: list[dict[str, float]] = field(default_factory=list)  # server timings_ms or ultralytics speed
    detections: dict[str, int] = field(default_factory=dict)  # image name -> number of boxes

    @property
    def images_per_s(self) -> float:
        return len(self.latencies_ms) / self.wall_s


class Ultralytics:
    name = "ultralytics"
    label = "ultralytics `YOLO.predict`, 1 image/call"

    def __init__(self, weights: Path):
        from ultralytics import YOLO

        self.model = YOLO(str(weights))

    def run(self, images: list[Path], _request_timeout: float) -> Pass:
        latencies, speeds, counts = [], [], {}
        started = time.perf_counter()
        for image in images:
            t0 = time.perf_counter()
            result = self.model.predict(source=str(image), verbose=False, device="cpu")[0]
            latencies.append((time.perf_counter() - t0) * 1000)
            speeds.append(dict(result.speed))
            counts[image.name] = len(result.boxes)
        return Pass(time.perf_counter() - started, latencies, speeds, counts)


class Inferline:
    """N clients, each with its own channel, each sending one-image Detect requests in turn."""

    def __init__(self, target: str, clients: int, payloads: dict[Path, bytes]):
        import grpc

        from inferline.common.generated import controller_pb2, controller_pb2_grpc, types_pb2

        self.clients = clients
        self.name = f"inferline-c{clients}"
        self.label = (f"inferline Detect, 1 image/request, {clients} "
                      + ("client, sequential" if clients == 1 else "concurrent clients"))
        self.requests = {
            p: controller_pb2.DetectRequest(model=MODEL, images=[types_pb2.Image(data=data, name=p.name)],
                                            options=types_pb2.DetectOptions())
            for p, data in payloads.items()
        }
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            # A connection of its own per client, as N separate callers would have.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        self.channels = [grpc.insecure_channel(target, options=options) for _ in range(clients)]
        self.stubs = [controller_pb2_grpc.ControllerServiceStub(c) for c in self.channels]

    def close(self) -> None:
        for c in self.channels:
            c.close()

    def run(self, images: list[Path], request_timeout: float) -> Pass:
        n = self.clients
        per_client: list[list[tuple[float, dict[str, float], str, int]]] = [[] for _ in range(n)]
        errors: list[BaseException] = []
        barrier = threading.Barrier(n + 1)
        done = [0.0] * n

        def client(k: int) -> None:
            # Each client walks the whole list, starting at a different image.
            order = images[k % len(images):] + images[: k % len(images)]
            stub = self.stubs[k]
            barrier.wait()
            try:
                for image in order:
                    t0 = time.perf_counter()
                    response = stub.Detect(self.requests[image], timeout=request_timeout)
                    latency = (time.perf_counter() - t0) * 1000
                    result = response.results[0]
                    if result.status.code != 0:
                        raise RuntimeError(f"{image.name}: status {result.status.code}: {result.status.message}")
                    per_client[k].append((latency, dict(response.timings_ms), image.name, len(result.detections)))
            except BaseException as exc:  # reported by the caller
                errors.append(exc)
            finally:
                done[k] = time.perf_counter()

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(n)]
        for t in threads:
            t.start()
        barrier.wait()
        started = time.perf_counter()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        wall = max(done) - started
        rows = [row for rows in per_client for row in rows]
        return Pass(wall, [r[0] for r in rows], [r[1] for r in rows], {r[2]: r[3] for r in rows})


# --------------------------------------------------------------------------------------------
# Statistics and reports


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q))


def summarize(passes: list[Pass]) -> dict:
    lat = [x for p in passes for x in p.latencies_ms]
    rates = [p.images_per_s for p in passes]
    return {
        "images_per_round": len(passes[0].latencies_ms),
        "requests": len(lat),
        "images_per_s_median": statistics.median(rates),
        "images_per_s_pooled": len(lat) / sum(p.wall_s for p in passes),
        "images_per_s_min": min(rates),
        "images_per_s_max": max(rates),
        "images_per_s_rounds": [round(r, 3) for r in rates],
        "latency_ms_p50": pct(lat, 50),
        "latency_ms_p95": pct(lat, 95),
        "latency_ms_mean": statistics.fmean(lat),
        "latency_ms_min": min(lat),
        "latency_ms_max": max(lat),
        "latencies_ms": [round(x, 2) for x in lat],
    }


def stage_breakdown(passes: list[Pass], keys: tuple[str, ...]) -> dict:
    """Mean and median of each timing key over every request, plus the client's own latency."""
    lat = [x for p in passes for x in p.latencies_ms]
    timings = [t for p in passes for t in p.timings]
    out = {}
    for key in keys:
        values = [t.get(key, 0.0) for t in timings]
        out[key] = {"mean": statistics.fmean(values), "p50": statistics.median(values)}
    out["client_latency"] = {"mean": statistics.fmean(lat), "p50": statistics.median(lat)}
    return out


def environment(weights: Path, digest: str) -> dict:
    import grpc
    import torch
    import ultralytics

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import cv2

        cv2_version = cv2.__version__
    except ImportError:
        cv2_version = None
    git = {}
    try:
        git["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                       check=True).stdout.strip()
        git["dirty"] = bool(subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True,
                                           text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    python = sys.executable
    if not os.path.relpath(python).startswith(".."):
        python = os.path.relpath(python)
    command = shlex.join([python, *sys.argv])
    env_prefix = " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in ("INFERLINE_MODEL_DIR",) if k in os.environ)
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": (env_prefix + " " + command).strip(),
        "cwd": os.getcwd(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads_ultralytics": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "ultralytics": ultralytics.__version__,
        "grpcio": grpc.__version__,
        "numpy": np.__version__,
        "opencv": cv2_version,
        "git": git,
        "weights": {"path": str(weights), "sha256": digest, "kind": KNOWN_WEIGHTS[digest]},
    }


def fmt(x: float, digits: int = 1) -> str:
    return f"{x:.{digits}f}"


def write_markdown(path: Path, report: dict) -> None:
    env = report["environment"]
    c = report["contenders"]
    ref = c["ultralytics"]["summary"]
    lines = [
        "# Baseline: end-to-end Detect on CPU, inferline pipeline vs ultralytics",
        "",
        f"Measured {env['date_utc']} on {env['cpu_model']} ({env['cpu_affinity']} usable cores, shared machine), "
        f"torch {env['torch']}, ultralytics {env['ultralytics']}, grpcio {env['grpcio']}, "
        f"Python {env['python']}, {env['torch_threads_ultralytics']} torch thread(s) for ultralytics and "
        f"{env['torch_threads_inference_stage']} for the inference stage; git {env['git'].get('commit', '?')[:12]}"
        f"{' (with uncommitted changes)' if env['git'].get('dirty') else ''}.",
        "",
        "Command:",
        "",
        "```",
        env["command"],
        "```",
        "",
        f"{report['images']['count']} images ({', '.join(report['images']['names'])}); "
        f"{report['rounds']} measured round(s) after {report['warmup']} warm-up round(s); each round every "
        "contender makes one pass over the images (an N-client contender: each client one pass, so N x the "
        "images), in an order that rotates each round. Weights: "
        f"{env['weights']['kind']} `yolov8n.pt` (sha256 `{env['weights']['sha256'][:16]}...`).",
        "",
        "## Throughput and latency",
        "",
        "images/s is the median of the per-round figures (min-max in brackets); latencies are per request "
        "(one image), pooled over the measured rounds. Ratios are to ultralytics in this same run: "
        "throughput ratio > 1 and p50 ratio < 1 are better than ultralytics; 'per-round' is the median of the "
        "ratios taken within each round.",
        "",
        "| contender | images/s | p50 ms | p95 ms | throughput ratio | per-round ratio | p50 ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, entry in c.items():
        s = entry["summary"]
        r = entry.get("vs_ultralytics", {})
        lines.append(
            f"| {entry['label']} | {fmt(s['images_per_s_median'], 2)} "
            f"({fmt(s['images_per_s_min'], 2)}-{fmt(s['images_per_s_max'], 2)}) | {fmt(s['latency_ms_p50'])} | "
            f"{fmt(s['latency_ms_p95'])} | "
            + (f"{r['throughput_ratio']:.2f}x | {r['throughput_ratio_per_round_median']:.2f}x | "
               f"{r['p50_ratio']:.2f}x |" if r else "1.00x (reference) | - | 1.00x |")
        )
    lines += [
        "",
        "## Where the time goes (per request, ms)",
        "",
        "inferline: the controller's `timings_ms` (each stage is timed by the controller around its gRPC call, "
        "so it includes that hop and (de)serialisation; `total` is the controller's whole handler). "
        "'outside controller' = client latency - `total`: the client-to-controller hop, protobuf and queueing "
        "before the handler runs. 'controller other' = `total` - (preprocess + inference + postprocess): metadata "
        "lookup and request assembly. ultralytics: its own `Results.speed` (preprocess excludes reading and "
        "decoding the file, which falls in 'other').",
        "",
        "| contender | statistic | preprocess | inference | postprocess | controller other | outside controller / other | client latency |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, entry in c.items():
        b = entry["stages_ms"]
        for stat in ("mean", "p50"):
            pre, inf, post = (b[k][stat] for k in ("preprocess", "inference", "postprocess"))
            client = b["client_latency"][stat]
            if name == "ultralytics":
                other_ctrl, outside = "-", fmt(client - pre - inf - post)
            else:
                total = b["total"][stat]
                other_ctrl, outside = fmt(total - pre - inf - post), fmt(client - total)
            lines.append(f"| {name} | {stat} | {fmt(pre)} | {fmt(inf)} | {fmt(post)} | {other_ctrl} | {outside} | "
                         f"{fmt(client)} |")
    lines += ["", "## Notes", ""]
    lines += [f"- {note}" for note in report["notes"]]
    lines.append("")
    path.write_text("\n".join(lines))


def analysis_notes(report: dict) -> list[str]:
    """Observations computed from this run's numbers (nothing here is assumed)."""
    c = report["contenders"]
    ref = c["ultralytics"]
    rb = ref["stages_ms"]
    cores = report["environment"]["cpu_affinity"]
    notes = [
        "This is the baseline that later work (request batching, ONNX Runtime, fewer copies between stages) "
        "is measured against: rerun the same command and compare the ratios to ultralytics from one run, "
        "not absolute numbers from different runs; the machine is shared and noisy.",
    ]
    c1 = c.get("inferline-c1")
    if c1:
        b = c1["stages_ms"]
        inf, total, client = b["inference"]["p50"], b["total"]["p50"], b["client_latency"]["p50"]
        pre, post = b["preprocess"]["p50"], b["postprocess"]["p50"]
        ref_client, ref_inf = rb["client_latency"]["p50"], rb["inference"]["p50"]
        parts = {"inference stage": inf, "preprocess stage": pre, "postprocess stage": post,
                 "controller other": max(total - pre - inf - post, 0.0), "outside the controller": client - total}
        top = max(parts, key=parts.get)
        notes.append(
            f"What dominates (1 client, medians): the {top} ({fmt(parts[top])} of {fmt(client)} ms, "
            f"{100 * parts[top] / client:.0f}%); the rest is preprocess {fmt(pre)} ms, postprocess {fmt(post)} ms, "
            f"controller bookkeeping {fmt(parts['controller other'])} ms and the client-to-controller hop "
            f"{fmt(parts['outside the controller'])} ms. ultralytics' own forward pass is {fmt(ref_inf)} ms of its "
            f"{fmt(ref_client)} ms call."
        )
        notes.append(
            f"The pipeline's median request is {fmt(client - ref_client)} ms "
            f"({100 * (client / ref_client - 1):+.0f}%) longer than ultralytics' call (p50 ratio "
            f"{c1['vs_ultralytics']['p50_ratio']:.2f}x). The inference stage as the controller sees it "
            f"({fmt(inf)} ms) is {fmt(inf - ref_inf)} ms more than ultralytics' bare forward pass: that is what the "
            "stage adds around the model (the gRPC hop carrying the uint8 image tensor in and the 84 x N float32 "
            "output back, (de)serialisation and copies, the hand-off to the model thread, and the uint8-to-float "
            "conversion that ultralytics counts as preprocess), plus noise; this benchmark does not split it further."
        )
        single = c1["summary"]["images_per_s_median"]
        for name, entry in c.items():
            if name in ("ultralytics", "inferline-c1"):
                continue
            n = entry["clients"]
            rate = entry["summary"]["images_per_s_median"]
            eb = entry["stages_ms"]
            notes.append(
                f"{n} concurrent clients: {rate:.2f} images/s, {rate / single:.2f}x the single client and "
                f"{entry['vs_ultralytics']['throughput_ratio']:.2f}x ultralytics, at p50 "
                f"{fmt(entry['summary']['latency_ms_p50'])} ms (p95 {fmt(entry['summary']['latency_ms_p95'])} ms). "
                f"Per request the inference stage now takes {fmt(eb['inference']['p50'])} ms (p50; "
                f"{eb['inference']['p50'] / inf:.1f}x the {fmt(inf)} ms with one client) and preprocess "
                f"{fmt(eb['preprocess']['p50'])} ms: the inference "
                f"stage runs one forward pass at a time (a single model thread, no batching across requests yet) "
                f"and on {cores} cores the stages and torch's threads compete for the CPU, so extra clients "
                "mostly overlap the non-model work and otherwise queue."
            )
    parity = report["parity"]
    if parity["mismatches"]:
        notes.append(f"Detection counts differ from ultralytics on: {parity['mismatches']} (see the JSON).")
    else:
        notes.append(f"Sanity check: inferline returned the same number of detections as ultralytics on all "
                     f"{len(parity['ultralytics'])} images (counts: {parity['ultralytics']}).")
    notes.append(
        f"Weights: the {report['environment']['weights']['kind']}. Same architecture and compute as the official "
        "YOLOv8n, so the timings carry over; the detections on natural photos (bus, zidane) do not, and NMS has "
        "few boxes to sort here, so postprocess time is a lower bound."
    )
    notes.append(
        "The benchmark process (ultralytics, and the gRPC client threads) shares the cores with the four "
        "services; contenders never run at the same time. The services run with default settings apart from "
        "free ports, INFERLINE_MODELS=yolov8n, INFERLINE_DEVICE=cpu, INFERLINE_ALLOW_DOWNLOAD=false and "
        f"INFERLINE_TORCH_THREADS=OMP_NUM_THREADS={report['environment']['torch_threads_inference_stage']} (the same "
        "torch thread count as ultralytics here; without it the inference stage would use torch's default of one "
        "thread per core while ultralytics sets OMP_NUM_THREADS=1 on import). "
        f"Load average at start {report['environment']['loadavg_at_start']}, at end "
        f"{report['environment']['loadavg_at_end']}."
    )
    return notes


# --------------------------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    loadavg_at_start = list(os.getloadavg())
    import torch

    # The same thread count on both sides; the services get it through their environment below.
    os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)
    torch.set_num_threads(args.torch_threads)
    from inferline.common.settings import Settings
    from inferline.services.client import collect_images
    from inferline.services.inference.weights import sha256_of
    from inferline.services.stack import LocalStack, free_port_env

    images = collect_images(args.images)
    model_dir = Path(args.model_dir).expanduser().resolve()
    weights = model_dir / WEIGHTS_FILE
    if not weights.is_file():
        print(f"error: no {WEIGHTS_FILE} in {model_dir} (--model-dir or INFERLINE_MODEL_DIR)", file=sys.stderr)
        return 2
    digest = sha256_of(weights)
    if digest not in KNOWN_WEIGHTS:
        print(f"error: {weights} has sha256 {digest}, not a known yolov8n.pt; refusing to unpickle it",
              file=sys.stderr)
        return 2
    payloads = {p: p.read_bytes() for p in images}
    print(f"{len(images)} images, {args.rounds} rounds (+{args.warmup} warm-up), concurrency {args.concurrency}, "
          f"torch threads {args.torch_threads}, "
          f"weights {KNOWN_WEIGHTS[digest]}", flush=True)

    env = free_port_env()
    env.update({
        "INFERLINE_MODEL_DIR": str(model_dir),
        "INFERLINE_MODELS": MODEL,
        "INFERLINE_DEVICE": "cpu",
        "INFERLINE_ALLOW_DOWNLOAD": "false",
        "INFERLINE_TORCH_THREADS": str(args.torch_threads),
        "OMP_NUM_THREADS": str(args.torch_threads),
    })
    service_env = {k: v for k, v in env.items() if k.startswith("INFERLINE_") or k == "OMP_NUM_THREADS"}
    reference = Ultralytics(weights)
    stack = LocalStack(Settings.from_env(env), env=env)
    t0 = time.perf_counter()
    stack.start(timeout=args.start_timeout)
    print(f"stack serving at {stack.controller_target} after {time.perf_counter() - t0:.1f} s", flush=True)
    contenders: list = [reference]
    try:
        contenders += [Inferline(stack.controller_target, n, payloads) for n in args.concurrency]
        passes: dict[str, list[Pass]] = {c.name: [] for c in contenders}
        warm: dict[str, list[Pass]] = {c.name: [] for c in contenders}
        bench_started = time.perf_counter()
        for r in range(args.warmup + args.rounds):
            measured = r >= args.warmup
            k = (r - args.warmup) % len(contenders) if measured else 0
            order = contenders[k:] + contenders[:k]
            line = []
            for contender in order:
                result = contender.run(images, args.request_timeout)
                (passes if measured else warm)[contender.name].append(result)
                line.append(f"{contender.name} {result.images_per_s:.2f} img/s")
            tag = f"round {r - args.warmup + 1}/{args.rounds}" if measured else f"warm-up {r + 1}/{args.warmup}"
            print(f"{tag}: " + ", ".join(line), flush=True)
            if stack.exited():
                raise RuntimeError(f"the {stack.exited()} stage exited during the benchmark")
        bench_wall = time.perf_counter() - bench_started
    finally:
        for c in contenders[1:]:
            c.close()
        codes = stack.stop()

    env_info = environment(weights, digest)
    env_info["loadavg_at_start"] = loadavg_at_start
    env_info["loadavg_at_end"] = list(os.getloadavg())
    env_info["torch_threads_inference_stage"] = args.torch_threads
    env_info["service_env"] = service_env
    env_info["stack_exit_codes"] = codes
    env_info["bench_wall_s"] = round(bench_wall, 1)
    report: dict = {
        "benchmark": "e2e_detect",
        "environment": env_info,
        "images": {"count": len(images), "names": [p.name for p in images], "paths": [str(p) for p in images]},
        "rounds": args.rounds,
        "warmup": args.warmup,
        "concurrency": args.concurrency,
        "contenders": {},
    }
    ref_passes = passes[reference.name]
    ref_summary = summarize(ref_passes)
    for c in contenders:
        summary = summarize(passes[c.name])
        entry = {
            "label": c.label,
            "summary": summary,
            "stages_ms": stage_breakdown(passes[c.name], ("preprocess", "inference", "postprocess")
                                         if c is reference else STAGE_KEYS),
        }
        if c is not reference:
            entry["clients"] = c.clients
            per_round = [p.images_per_s / q.images_per_s for p, q in zip(passes[c.name], ref_passes)]
            entry["vs_ultralytics"] = {
                "throughput_ratio": summary["images_per_s_median"] / ref_summary["images_per_s_median"],
                "throughput_ratio_per_round_median": statistics.median(per_round),
                "throughput_ratio_per_round": [round(x, 3) for x in per_round],
                "p50_ratio": summary["latency_ms_p50"] / ref_summary["latency_ms_p50"],
                "p95_ratio": summary["latency_ms_p95"] / ref_summary["latency_ms_p95"],
            }
        report["contenders"][c.name] = entry

    ref_counts = warm[reference.name][0].detections if warm[reference.name] else ref_passes[0].detections
    parity = {"ultralytics": ref_counts, "mismatches": {}}
    for c in contenders[1:]:
        counts = (warm[c.name] or passes[c.name])[0].detections
        for name, n in counts.items():
            if ref_counts.get(name) != n:
                parity["mismatches"].setdefault(c.name, {})[name] = {"inferline": n, "ultralytics": ref_counts.get(name)}
    report["parity"] = parity
    report["notes"] = analysis_notes(report)

    args.out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out / f"{RESULT_STEM}.json", args.out / f"{RESULT_STEM}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(md_path, report)

    print()
    print(f"{'contender':<16} {'img/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'thr ratio':>10} {'p50 ratio':>10}")
    for name, entry in report["contenders"].items():
        s, r = entry["summary"], entry.get("vs_ultralytics")
        thr = "{:.2f}x".format(r["throughput_ratio"]) if r else "-"
        p50 = "{:.2f}x".format(r["p50_ratio"]) if r else "-"
        print(f"{name:<16} {s['images_per_s_median']:>8.2f} {s['latency_ms_p50']:>8.1f} {s['latency_ms_p95']:>8.1f} "
              f"{thr:>10} {p50:>10}")
    print(f"\nwrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
