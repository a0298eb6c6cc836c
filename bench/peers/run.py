"""The serving peers side by side in one run: same weights, images, thresholds and load generator.

Contenders, one after another on one machine state (issue 17):

* references, each in a fresh interpreter (bench/peers/ultralytics_loop.py): ultralytics'
  in-process loop on ``yolov8n.pt`` and on its own ONNX export, one image per call;
* each peer (bench/peers/servers/, installed by bench/peers/install.sh into .cache/peers/<peer>/)
  in the configuration its docs recommend for speed, JPEG bytes in over its native HTTP API;
* inferline (``inferline up`` as local processes: four stages and the gateway), through its
  HTTP gateway and through gRPC (``inferline bench``'s load generator, services/loadgen.py),
  for each ``--inferline`` variant (bench/compare.py's names; default: what ``inferline up``
  serves, ONNX Runtime with threads that follow the load, and the PyTorch backend).

Before any contender is timed its detections on every image are checked against ultralytics'
``YOLO("yolov8n.pt").predict`` at the same conf/iou: the same classes in the same order, every
box corner within ``--box-tol`` pixels and every score within ``--score-tol``. The peers and
inferline's gateway are driven by the same closed-loop HTTP generator below (N connections, each
sending its next request when the last one answered; warm-up not counted; requests answered
inside the window counted). Everything listens on 127.0.0.1, on ports from ``--port-base``.

Writes ``<out>/<stem>.json``, ``<out>/<stem>.md`` and ``<out>/<stem>-latency-throughput.png``.

    bash bench/peers/install.sh                               # once: the peers' venvs
    .venv/bin/python bench/peers/run.py                       # 20 s per row: ~20 min on 2 cores
    .venv/bin/python bench/peers/run.py --duration 5 --peers mosec --inferline
    .venv/bin/python bench/peers/run.py --replot                # plot and Markdown again from the JSON
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SHARED = REPO.parent / "shared"
PEERS_ROOT = REPO / ".cache" / "peers"
MODEL = "yolov8n"
RAY_SERVE_NOTE = (
    "Ray Serve is left out: it sends its internal traffic to the machine's non-loopback address, "
    "which this benchmark's network rule (loopback only) forbids."
)


# ---- the contenders --------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """One peer variant: which venv and server script, its framework settings, how to call it."""

    name: str
    label: str
    venv: str
    script: str
    backend: str  # "onnx" or "torch"
    workers: int = 2
    max_batch: int = 8
    batch_wait_ms: float = 10.0
    path: str = "/predict"
    body: str = "jpeg"  # how the JPEG travels: "jpeg" (the raw body), "multipart" or "json" (base64)
    extra_env: Mapping[str, str] = field(default_factory=dict)

    def command(self) -> list[str]:
        return [str(PEERS_ROOT / self.venv / "bin" / "python"), str(HERE / "servers" / self.script)]


PEERS = {
    p.name: p
    for p in (
        Peer("litserve-onnx", "LitServe, ONNX, 2 workers, batching", "litserve", "litserve_server.py", "onnx",
             body="json"),
        Peer("litserve-torch", "LitServe, PyTorch, 2 workers, batching", "litserve", "litserve_server.py", "torch",
             body="json"),
        Peer("mosec-onnx", "Mosec, ONNX, 2 workers, batching", "mosec", "mosec_server.py", "onnx",
             path="/inference"),
        Peer("bentoml-onnx", "BentoML, ONNX, 2 workers, batchable", "bentoml", "bentoml_server.py", "onnx",
             path="/detect", body="multipart"),
        Peer("kserve-onnx", "KServe Python server, ONNX, 2 workers", "kserve", "kserve_server.py", "onnx",
             path=f"/v1/models/{MODEL}:predict", max_batch=1),
    )
}
INFERLINE_VARIANTS = ("default", "torch")  # bench/compare.py's names: what `inferline up` serves, and PyTorch


def default_weights() -> Path:
    """The first yolov8n.pt on INFERLINE_MODEL_DIR (as inferline finds it), else ../shared/models'."""
    folders = [Path(part) for part in os.environ.get("INFERLINE_MODEL_DIR", "").split(os.pathsep) if part]
    found = [folder / f"{MODEL}.pt" for folder in folders if (folder / f"{MODEL}.pt").is_file()]
    return found[0] if found else SHARED / "models" / f"{MODEL}.pt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", nargs="+", type=Path, default=sorted((SHARED / "data").glob("*.jpg")))
    p.add_argument("--weights", type=Path, default=default_weights(), help="the .pt weights")
    p.add_argument("--duration", type=float, default=20.0, help="seconds measured per row")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds not counted before each row")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--peers", nargs="*", default=list(PEERS), choices=list(PEERS), help="peer variants to run")
    p.add_argument("--inferline", nargs="*", default=list(INFERLINE_VARIANTS),
                   help="inferline variants (bench/compare.py's names); none: skip inferline")
    p.add_argument("--skip-references", action="store_true", help="no ultralytics speed rows (parity still runs)")
    p.add_argument("--box-tol", type=float, default=1e-3, help="pixels: largest allowed box-corner difference")
    p.add_argument("--score-tol", type=float, default=1e-4, help="largest allowed score difference")
    p.add_argument("--port-base", type=int, default=24000, help="ports used: base .. base+99")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds a server may take to answer")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--stem", default="peers-cpu")
    p.add_argument("--work", type=Path, default=PEERS_ROOT / "work", help="where the ONNX exports are kept")
    p.add_argument("--replot", action="store_true", help="redraw the plot and the Markdown from <out>/<stem>.json")
    return p.parse_args(argv)


# ---- parity ----------------------------------------------------------------------------------


def compare_detections(found: Mapping[str, Any], expected: Mapping[str, Any]) -> dict[str, Any]:
    """How one image's answer differs from ultralytics': same classes (in order), and the largest
    box-corner and score differences (None when the classes differ: nothing to compare)."""
    same = list(found.get("classes", [])) == list(expected["classes"])
    if not same:
        return {"same_classes": False, "box_diff_px": None, "score_diff": None}
    if not expected["classes"]:
        return {"same_classes": True, "box_diff_px": 0.0, "score_diff": 0.0}
    box = float(np.abs(np.asarray(found["boxes"], float) - np.asarray(expected["boxes"], float)).max())
    score = float(np.abs(np.asarray(found["scores"], float) - np.asarray(expected["scores"], float)).max())
    return {"same_classes": True, "box_diff_px": box, "score_diff": score}


def parity(found: Mapping[str, Mapping[str, Any]], expected: Mapping[str, Mapping[str, Any]],
           box_tol: float, score_tol: float) -> dict[str, Any]:
    """The parity verdict over all images: passed, the worst differences, the images that failed."""
    per_image = {name: compare_detections(found[name], expected[name]) for name in expected}
    same = [d for d in per_image.values() if d["same_classes"]]
    failed = sorted(name for name, d in per_image.items()
                    if not (d["same_classes"] and d["box_diff_px"] <= box_tol and d["score_diff"] <= score_tol))
    return {
        "passed": not failed,
        "box_tol_px": box_tol,
        "score_tol": score_tol,
        # Over the images whose classes agree (the others are listed as failed).
        "max_box_diff_px": max((d["box_diff_px"] for d in same), default=None),
        "max_score_diff": max((d["score_diff"] for d in same), default=None),
        "failed_images": failed,
    }


def gateway_detections(document: Mapping[str, Any]) -> dict[str, Any]:
    """inferline's /v1/detect JSON (one image) in the peers' answer shape."""
    (result,) = document["results"]
    found = result.get("detections", [])
    return {
        "boxes": [d["box"] for d in found],
        "scores": [d["score"] for d in found],
        "classes": [d["class_id"] for d in found],
    }


# ---- the closed-loop HTTP load generator -----------------------------------------------------


@dataclass(frozen=True)
class HttpCall:
    """A request ready to send: the same bytes every time for one image, built once up front."""

    url: str
    body: bytes
    headers: Mapping[str, str]


def peer_call(peer: Peer, port: int, jpeg: bytes) -> HttpCall:
    url = f"http://127.0.0.1:{port}{peer.path}"
    if peer.body == "multipart":
        return multipart_call(url, "images", jpeg)
    if peer.body == "json":
        return HttpCall(url, json.dumps({"image": base64.b64encode(jpeg).decode()}).encode(),
                        {"Content-Type": "application/json"})
    return HttpCall(url, jpeg, {"Content-Type": "image/jpeg"})


def multipart_call(url: str, field_name: str, jpeg: bytes, filename: str = "image.jpg") -> HttpCall:
    boundary = "inferline-peers-boundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; filename="{filename}"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n"
    ).encode() + jpeg + f"\r\n--{boundary}--\r\n".encode()
    return HttpCall(url, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})


def gateway_call(port: int, jpeg: bytes) -> HttpCall:
    body = json.dumps({"model": MODEL, "images": [{"data": base64.b64encode(jpeg).decode()}]}).encode()
    return HttpCall(f"http://127.0.0.1:{port}/v1/detect", body, {"Content-Type": "application/json"})


def post(call: HttpCall, timeout: float = 120.0) -> dict[str, Any]:
    """One request, its JSON answer (an HTTP error status raises); a one-item list (BentoML's
    batchable API answers a list per request) is unwrapped."""
    answer = httpx.post(call.url, content=call.body, headers=dict(call.headers), timeout=timeout)
    answer.raise_for_status()
    document = answer.json()
    return dict(document[0] if isinstance(document, list) and len(document) == 1 else document)


async def http_load(calls: Sequence[HttpCall], concurrency: int, duration: float, warmup: float,
                    timeout: float = 120.0) -> dict[str, Any]:
    """``concurrency`` connections in a closed loop over ``calls`` (cycled); what loadgen measures.

    Every answer is read and parsed as JSON, as a real client would. A request answered inside
    the window counts (even if sent during the warm-up); none starts after the window ends."""
    import aiohttp  # noqa: PLC0415 - the driver's only async HTTP client, loaded when a row runs

    latencies: list[float] = []
    errors: dict[str, int] = {}
    start = time.perf_counter()
    window = (start + warmup, start + warmup + duration)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:

        async def worker(offset: int) -> None:
            i = offset
            while time.perf_counter() < window[1]:
                call = calls[i % len(calls)]
                i += 1
                t0 = time.perf_counter()
                try:
                    async with session.post(call.url, data=call.body, headers=dict(call.headers)) as answer:
                        payload = await answer.read()
                        status = answer.status
                    json.loads(payload)
                    code = "OK" if status == 200 else f"HTTP {status}"
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    code = type(exc).__name__
                done = time.perf_counter()
                if window[0] <= done <= window[1]:
                    if code == "OK":
                        latencies.append(done - t0)
                    else:
                        errors[code] = errors.get(code, 0) + 1

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return summary_of(latencies, errors, duration)


def summary_of(latencies: Sequence[float], errors: Mapping[str, int], duration: float) -> dict[str, Any]:
    ms = np.asarray(latencies, float) * 1000

    def pct(q: float) -> float | None:
        return round(float(np.percentile(ms, q)), 2) if len(ms) else None

    return {
        "img_per_s": round(len(ms) / duration, 2),
        "p50_ms": pct(50),
        "p95_ms": pct(95),
        "p99_ms": pct(99),
        "requests": len(ms),
        "errors": sum(errors.values()),
        "error_codes": dict(errors),
    }


# ---- processes -------------------------------------------------------------------------------


def _clean_env() -> dict[str, str]:
    """This environment without thread pins, so every contender gets its own defaults."""
    return {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def wait_answering(call: HttpCall, alive: Callable[[], bool], timeout: float) -> None:
    """Until the server answers a real detect request (every peer's own health route differs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the server for {call.url} exited while starting; its log says why")
        try:
            post(call, timeout=30)
            return
        except (httpx.HTTPError, ValueError):
            time.sleep(0.5)
    raise RuntimeError(f"{call.url} did not answer within {timeout:.0f} s")


def stop_group(process: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM to the server's process group (peers spawn workers), SIGKILL after ``grace``."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextmanager
def peer_server(peer: Peer, port: int, weights: Path, log: Path) -> Iterator[subprocess.Popen]:
    if not (PEERS_ROOT / peer.venv / ".installed").exists():
        raise RuntimeError(f"{peer.venv} is not installed: run bash bench/peers/install.sh {peer.venv}")
    env = {
        **_clean_env(), **peer.extra_env,
        "PEER_PORT": str(port), "PEER_WEIGHTS": str(weights), "PEER_BACKEND": peer.backend,
        "PEER_WORKERS": str(peer.workers), "PEER_MAX_BATCH": str(peer.max_batch),
        "PEER_BATCH_WAIT_MS": str(peer.batch_wait_ms),
        "BENTOML_DO_NOT_TRACK": "true", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1",
    }
    with log.open("wb") as out:
        process = subprocess.Popen(peer.command(), env=env, stdout=out, stderr=subprocess.STDOUT,
                                   cwd=HERE / "servers", start_new_session=True)
    try:
        yield process
    finally:
        stop_group(process)


# ---- the run ---------------------------------------------------------------------------------


def inferline_export(args: argparse.Namespace) -> Path:
    """inferline's ONNX export (what the peers' ONNX variants serve), made once, kept in ``--work``."""
    args.work.mkdir(parents=True, exist_ok=True)
    ours = args.work / f"{MODEL}-inferline.onnx"
    if not ours.exists():
        command = [sys.executable, "-m", "inferline.services.cli", "export", "--model", MODEL, "--dynamic-batch"]
        subprocess.run([*command, "--out", str(ours)], check=True, env=_clean_env())
    return ours


def ultralytics_export(args: argparse.Namespace) -> Path:
    """ultralytics' own ONNX export of ``--weights`` (its ONNX reference loop), made once."""
    theirs = args.work / "ultralytics" / f"{MODEL}.onnx"
    if not theirs.exists():
        theirs.parent.mkdir(parents=True, exist_ok=True)
        source = theirs.parent / args.weights.name
        source.write_bytes(args.weights.read_bytes())
        code = f"from ultralytics import YOLO; YOLO({str(source)!r}).export(format='onnx', simplify=False)"
        subprocess.run([sys.executable, "-c", code], check=True, env=_clean_env(), capture_output=True)
    return theirs


def ultralytics_loop(weights: Path, args: argparse.Namespace, duration: float) -> dict[str, Any]:
    command = [sys.executable, str(HERE / "ultralytics_loop.py"), str(weights), *map(str, args.images),
               "--duration", str(duration), "--warmup", str(args.warmup)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=_clean_env()).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


class Recorder:
    """The rows and parity verdicts of one run, printed as they come."""

    def __init__(self, expected: Mapping[str, Any], args: argparse.Namespace) -> None:
        self.expected, self.args = expected, args
        self.rows: list[dict[str, Any]] = []
        self.parity: dict[str, dict[str, Any]] = {}

    def check(self, contender: str, found: Mapping[str, Any]) -> None:
        verdict = parity(found, self.expected, self.args.box_tol, self.args.score_tol)
        self.parity[contender] = verdict
        print(f"parity  {contender:52} {'ok' if verdict['passed'] else 'FAILED ' + str(verdict['failed_images'])}"
              f"  max box diff {_g(verdict['max_box_diff_px'])} px, score {_g(verdict['max_score_diff'])}", flush=True)

    def row(self, contender: str, kind: str, concurrency: int, report: Mapping[str, Any]) -> None:
        keep = ("img_per_s", "p50_ms", "p95_ms", "p99_ms", "requests", "errors", "error_codes", "cpu_ms_per_image")
        self.rows.append({"contender": contender, "kind": kind, "concurrency": concurrency,
                          **{k: report[k] for k in keep if k in report}})
        print(f"{kind:10} {contender:52} c={concurrency:<3} {report['img_per_s']:7.2f} img/s  "
              f"p50 {_g(report['p50_ms'])} ms  p95 {_g(report['p95_ms'])} ms  errors {report['errors']}", flush=True)


def _g(value: float | None) -> str:
    """A figure for a line of text ('-' when there is none, e.g. a row with no answer)."""
    return "-" if value is None else f"{value:.3g}"


def run_peer(peer: Peer, port: int, weights: Mapping[str, Path], images: Mapping[str, bytes],
             recorder: Recorder, logs: Path, args: argparse.Namespace) -> None:
    served = weights["pt"] if peer.backend == "torch" else weights["inferline_onnx"]
    calls = [peer_call(peer, port, jpeg) for jpeg in images.values()]
    log = logs / f"{peer.name}.log"
    with peer_server(peer, port, served, log) as process:
        wait_answering(calls[0], lambda: process.poll() is None, args.start_timeout)
        recorder.check(peer.label, {name: post(call) for name, call in zip(images, calls, strict=True)})
        for concurrency in args.concurrency:
            report = asyncio.run(http_load(calls, concurrency, args.duration, args.warmup))
            recorder.row(peer.label, "peer", concurrency, report)


def inferline_env(base: int, repo: Path) -> dict[str, str]:
    """Every stage and the gateway on fixed ports from ``base``, metrics on free ones."""
    from inferline.common.settings import STAGES  # noqa: PLC0415 - inferline's names, only when it runs

    env = _clean_env()
    for offset, stage in enumerate(STAGES):
        env[f"INFERLINE_{stage.upper()}_PORT"] = str(base + offset)
        env[f"INFERLINE_{stage.upper()}_TARGET"] = f"127.0.0.1:{base + offset}"
        env[f"INFERLINE_{stage.upper()}_METRICS_PORT"] = "0"
    env["INFERLINE_GATEWAY_PORT"] = str(base + len(STAGES))
    env.update(INFERLINE_MODEL_REPOSITORY=str(repo), INFERLINE_MODELS=MODEL, INFERLINE_LOG_LEVEL="WARNING",
               INFERLINE_DEVICE="cpu")
    return env


def grpc_detections(target: str, settings: Any, paths: Sequence[Path]) -> dict[str, Any]:
    """inferline's detections of each image, one Detect call per image, in the peers' answer shape."""
    from inferline.common.api import DetectRequest  # noqa: PLC0415 - inferline's names, only when it runs
    from inferline.services.client import Client, image_inputs  # noqa: PLC0415

    found = {}
    with Client(target, settings, timeout=120) as client:
        for path in paths:
            (image,) = client.detect(DetectRequest(MODEL, image_inputs([path]))).images
            found[path.name] = {
                "boxes": [[float(v) for v in d.box] for d in image.detections],
                "scores": [float(d.score) for d in image.detections],
                "classes": [int(d.class_id) for d in image.detections],
            }
    return found


def bench_compare() -> Any:
    """bench/compare.py, whose variants (and their model repositories) inferline's rows reuse."""
    spec = importlib.util.spec_from_file_location("bench_compare", REPO / "bench" / "compare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def variant_repository(compare: Any, variant: Any, root: Path) -> Path:
    """bench/compare.py's repository for the variant: the built-in one for the default (the
    .pt served by ONNX Runtime through its verified export cache), a changed copy otherwise.
    The weights resolve as ``inferline up`` resolves them (INFERLINE_MODEL_DIR; a stand-in file
    needs its INFERLINE_TRUSTED_WEIGHTS pin), and the parity check says if they differ from
    ``--weights``."""
    return Path(compare.repository(root, variant))


def run_inferline(variant_name: str, base: int, images: Mapping[str, bytes], recorder: Recorder,
                  args: argparse.Namespace, root: Path) -> None:
    compare = bench_compare()
    from inferline.common.settings import Settings  # noqa: PLC0415
    from inferline.services import loadgen  # noqa: PLC0415
    from inferline.services.stack import UP_ORDER, LocalStack  # noqa: PLC0415

    variant = compare.VARIANTS[variant_name]
    env = inferline_env(base, variant_repository(compare, variant, root))
    if variant.torch_threads:
        env["INFERLINE_TORCH_THREADS"] = str(variant.torch_threads)
    settings = Settings.from_env(env)
    running = LocalStack(settings, env=env, stages=UP_ORDER)
    running.start(timeout=args.start_timeout)
    try:
        gateway = settings.port("gateway")
        calls = [gateway_call(gateway, jpeg) for jpeg in images.values()]
        label = f"inferline {variant.label.removeprefix('four services, ')}"
        # Parity over gRPC: the gateway's JSON rounds boxes to 0.01 px and scores to 1e-5 (its documents).
        recorder.check(label, grpc_detections(running.controller_target, settings, args.images))
        for name, call in zip(images, calls, strict=True):  # the gateway answers the same detections
            if gateway_detections(post(call))["classes"] != recorder.expected[name]["classes"]:
                raise RuntimeError(f"inferline's gateway found other classes than ultralytics in {name}")
        for concurrency in args.concurrency:
            report = asyncio.run(http_load(calls, concurrency, args.duration, args.warmup))
            recorder.row(f"{label}, HTTP gateway", "inferline", concurrency, report)
        paths = list(args.images)
        for concurrency in args.concurrency:
            result = loadgen.run(running.controller_target, MODEL, paths, concurrency=concurrency,
                                 duration=args.duration, warmup=args.warmup, timeout=120, pids={})
            report = result.to_dict()
            # The latency of answered calls, as the HTTP loop measures: refusals (RESOURCE_EXHAUSTED,
            # counted in errors) answer in a few ms and would pull loadgen's all-call percentiles down.
            ok = report["ok_ms"]
            report.update(p50_ms=ok.get("p50"), p95_ms=ok.get("p95"), p99_ms=ok.get("p99"))
            recorder.row(f"{label}, gRPC", "inferline", concurrency, report)
    finally:
        running.stop()


def environment(peers: Sequence[str]) -> dict[str, Any]:
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    versions: dict[str, str] = {}
    for package in ("torch", "ultralytics", "onnxruntime", "numpy", "aiohttp", "grpcio"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    for venv in sorted({PEERS[p].venv for p in peers}):
        installed = PEERS_ROOT / venv / ".installed"
        if installed.exists():
            versions[f"{venv} venv"] = installed.read_text().strip()
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True,
                                text=True, check=False).stdout.strip())
    return {
        "cpu": cpu,
        "usable_cores": len(os.sched_getaffinity(0)),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "versions": versions,
        "commit": commit + (" (with uncommitted changes)" if dirty else ""),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        document = json.loads((args.out / f"{args.stem}.json").read_text())
        plot = args.out / f"{args.stem}-latency-throughput.png"
        draw(document["rows"], plot)
        (args.out / f"{args.stem}.md").write_text(markdown(document, plot.name))
        return 0
    loadavg_at_start = os.getloadavg()
    images = {path.name: path.read_bytes() for path in args.images}
    weights = {"pt": args.weights, "inferline_onnx": inferline_export(args)}
    reference = ultralytics_loop(weights["pt"], args, 0.0 if args.skip_references else args.duration)
    recorder = Recorder(reference.pop("detections"), args)
    if not args.skip_references:
        recorder.row("ultralytics loop, yolov8n.pt", "reference", 1, reference)
        onnx = ultralytics_loop(ultralytics_export(args), args, args.duration)
        recorder.check("ultralytics loop, yolov8n.onnx", onnx.pop("detections"))
        recorder.row("ultralytics loop, yolov8n.onnx", "reference", 1, onnx)

    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.work / "logs"  # each peer's server log of the last run, kept for a failed start
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="inferline-peers-") as tmp:
        for offset, name in enumerate(args.peers):
            try:
                run_peer(PEERS[name], args.port_base + 100 + offset, weights, images, recorder, logs, args)
            except (RuntimeError, httpx.HTTPError) as exc:  # one peer that fails leaves the others' rows
                tail = (logs / f"{name}.log").read_text(errors="replace")[-3000:]
                print(f"{name}: {exc}\n{tail}", file=sys.stderr, flush=True)
                recorder.parity[PEERS[name].label] = {"passed": False, "error": str(exc)}
        for offset, name in enumerate(args.inferline):
            try:
                run_inferline(name, args.port_base + 200 + 10 * offset, images, recorder, args, Path(tmp))
            except (RuntimeError, httpx.HTTPError) as exc:
                print(f"inferline {name}: {exc}", file=sys.stderr, flush=True)
                recorder.parity[f"inferline {name}"] = {"passed": False, "error": str(exc)}

    arguments = argv if argv is not None else sys.argv[1:]
    meta = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": ("python bench/peers/run.py " + " ".join(shlex.quote(a) for a in arguments)).strip(),
        **environment(args.peers),
        "loadavg_at_start": [round(x, 2) for x in loadavg_at_start],
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "images": len(images),
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "left_out": RAY_SERVE_NOTE,
    }
    document = {"meta": meta, "parity": recorder.parity, "rows": recorder.rows}
    (args.out / f"{args.stem}.json").write_text(json.dumps(document, indent=2) + "\n")
    plot = args.out / f"{args.stem}-latency-throughput.png"
    draw(recorder.rows, plot)
    (args.out / f"{args.stem}.md").write_text(markdown(document, plot.name))
    return 0


# ---- the report ------------------------------------------------------------------------------


def table(rows: Sequence[Mapping[str, Any]], parity_of: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line per contender: p50 and img/s at c=1, the best img/s at the higher concurrencies
    and the errors (refusals included) of that row."""
    lines = [
        "| contender | parity | c=1 p50 ms | c=1 img/s | best img/s at c>1 (at c) | errors in that row |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for contender in dict.fromkeys(r["contender"] for r in rows):
        mine = [r for r in rows if r["contender"] == contender]
        one = next((r for r in mine if r["concurrency"] == 1), None)
        more = max((r for r in mine if r["concurrency"] > 1), key=lambda r: r["img_per_s"], default=None)
        verdict = next((v for name, v in parity_of.items() if contender.startswith(name)), None)
        ok = "-" if verdict is None else ("ok" if verdict.get("passed") else "**failed**")
        best = f"{_n(more['img_per_s'], 1)} ({more['concurrency']}) | {more['errors']}" if more else "- | -"
        lines.append(
            f"| {contender} | {ok} | {_n(one['p50_ms'] if one else None, 0)} | "
            f"{_n(one['img_per_s'] if one else None, 1)} | {best} |"
        )
    return lines


def _codes(codes: Mapping[str, int] | None) -> str:
    """What the errors were, e.g. ' (RESOURCE_EXHAUSTED 12)'; nothing when there were none."""
    return f" ({', '.join(f'{code} {n}' for code, n in codes.items())})" if codes else ""


def _n(value: float | None, digits: int) -> str:
    """A figure for a table cell, rounded as far as it means anything here; '-' when there is none."""
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(document: Mapping[str, Any], plot_name: str) -> str:
    meta, rows = document["meta"], document["rows"]
    lines = [
        "# Serving peers, side by side (CPU)",
        "",
        f"- command: `{meta['command']}` ({meta['duration_s']} s per row after {meta['warmup_s']} s warm-up)",
        f"- date: {meta['date']}; commit {meta['commit']}",
        f"- machine: {meta['cpu']}, {meta['usable_cores']} usable cores; {meta['machine']}; load average "
        f"{meta['loadavg_at_start']} at start, {meta['loadavg_at_end']} at end",
        f"- versions: {json.dumps(meta['versions'])}",
        f"- {meta['images']} images, one JPEG per request; YOLOv8n stand-in, conf 0.25, iou 0.7, max_det 300",
        f"- {meta['left_out']}",
        "",
        *table(rows, document["parity"]),
        "",
        '## Parity with `YOLO("yolov8n.pt").predict`',
        "",
        "Same classes in the same order, box corners within the box tolerance, scores within the score "
        "tolerance. ultralytics' own ONNX export has a fixed 640x640 input, so its loop letterboxes to a "
        "square where the .pt path pads 640x480 scenes to 640x480: its boxes move by up to a few pixels "
        "(a reference for speed, not a contender).",
        "",
        "| contender | passed | max box diff px | max score diff | failed images |",
        "|---|---|---:|---:|---|",
    ]
    for name, v in document["parity"].items():
        if "error" in v:
            lines.append(f"| {name} | no: {v['error']} | - | - | - |")
        else:
            lines.append(f"| {name} | {'yes' if v['passed'] else 'no'} | {_g(v['max_box_diff_px'])} | "
                         f"{_g(v['max_score_diff'])} | {', '.join(v['failed_images']) or '-'} |")
    lines += ["", "## Every row", "", "| contender | c | img/s | p50 ms | p95 ms | p99 ms | errors |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [
        f"| {r['contender']} | {r['concurrency']} | {_n(r['img_per_s'], 2)} | {_n(r['p50_ms'], 1)} | "
        f"{_n(r['p95_ms'], 1)} | {_n(r['p99_ms'], 1)} | {r['errors']}{_codes(r.get('error_codes'))} |"
        for r in rows
    ]
    lines += ["", f"![latency against throughput]({plot_name})", ""]
    return "\n".join(lines)


def draw(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    import matplotlib  # noqa: PLC0415 - only the end of a run and --replot draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - after choosing the Agg backend

    figure, axes = plt.subplots(figsize=(12, 6))
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, 20))
    for index, contender in enumerate(dict.fromkeys(r["contender"] for r in rows)):
        answered = (r for r in rows if r["contender"] == contender and r["p50_ms"] is not None)
        mine = sorted(answered, key=lambda r: r["concurrency"])
        inferline = contender.startswith("inferline")
        axes.plot([r["img_per_s"] for r in mine], [r["p50_ms"] for r in mine], marker="s" if inferline else "o",
                  linestyle="--" if inferline else "-", color=colours[index % len(colours)], label=contender)
        for r in mine:
            axes.annotate(f"c={r['concurrency']}", (r["img_per_s"], r["p50_ms"]), fontsize=7,
                          textcoords="offset points", xytext=(3, 3))
    axes.set_xlabel("throughput (images/s)")
    axes.set_ylabel("p50 latency (ms, log)")
    axes.set_yscale("log")
    axes.set_title("YOLOv8n on CPU: serving peers and inferline, closed loop")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    raise SystemExit(main())
