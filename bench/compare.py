"""One run, same images, every contender: the pipeline against what users would otherwise run.

Contenders (each measured for ``--duration`` seconds after ``--warmup``, one after another, so
the ratios come from one run on one machine state; with ``--rounds N`` every contender is
measured N times, the rounds interleaved (every pipeline stack started once and kept up, the
order reversed every other round), and each figure is the median of its rounds: on a shared
machine whose speed drifts by 10-30% from minute to minute, a ratio of two rows measured minutes
apart says more about the drift than about the contenders):

* references, each in a fresh process (bench/reference.py): ultralytics predict one image per
  call and batched, ultralytics' own ONNX export (``YOLO("yolov8n.onnx").predict``, one image per
  call), torchvision's Faster R-CNN loop, open_clip's image loop; and the model-forward limit
  (usable cores / the CPU ms of one forward pass on one ONNX Runtime thread, measured here) beside
  the forward ceiling (one such loop per usable core, all at once: what the cores really give to
  forward passes that share nothing else);
* the four-service pipeline (``inferline up`` as local processes) as it ships (ONNX Runtime on
  the cached export, threads following the load), with the PyTorch backend and dynamic batching,
  the same with the preprocessed tensors inline in the messages (``torch-inline``,
  ``default-inline``: as before issue 16's shared memory), the same with batching off
  (``max_batch_size: 1``: the issue-3 baseline's configuration),
  ONNX Runtime with fixed threads, and the controller's ``--inprocess`` mode (the same stage code
  without gRPC between the stages); each at concurrency 1, 8 and 32 with ``inferline bench``'s
  load generator (``services/loadgen.py``), with the model's busy share read from the stage's
  ``/metrics`` before and after (``model_busy``);
* Faster R-CNN and CLIP through the pipeline at concurrency 1 and 8 (``--other-concurrency``).

Beside throughput and latency it records where a request's time goes (each Detect answer's
per-stage ``timings_ms``, ultralytics' own ``Results.speed``), checks that every YOLO variant
finds as many boxes per image as ultralytics does, and notes the machine, library versions and
commit it ran on.

Writes ``<out>/<stem>.json``, ``<out>/<stem>.md`` and ``<out>/<stem>-latency-throughput.png``.

    .venv/bin/python bench/compare.py                          # ~6 min on 2 cores
    .venv/bin/python bench/compare.py --duration 5 --concurrency 1 8 --skip-references
    .venv/bin/python bench/compare.py --skip-references --only torch torch-inline inprocess   # issue 16
    .venv/bin/python bench/compare.py --rounds 3 --only default inprocess-default   # noisy machine
    .venv/bin/python bench/compare.py --replot                # redraw the PNG from the JSON
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from inferline.common.api import DetectRequest
from inferline.common.settings import CONTROLLER, PIPELINE_STAGES, Settings
from inferline.services import loadgen
from inferline.services.cli.bench import busy_ratio, scrape_busy
from inferline.services.client import Client, collect_images, image_inputs
from inferline.services.inference.backends.onnxruntime_backend import usable_cores
from inferline.services.inference.repository import BUILTIN_REPOSITORY
from inferline.services.stack import START_ORDER, LocalStack, free_port_env, free_ports

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/runs.py, also when loaded by path
from runs import REPO, SHARED, clean_env, commit, references_at_once, versions
from runs import reference as library_loop

# The models the references run (bench/reference.py loads their weight files by these names).
YOLO, FRCNN, CLIP = "yolov8n", "fasterrcnn-mobilenet-v3-large-320-fpn", "clip-vit-b-32"
ULTRALYTICS = "ultralytics predict, 1 image/call"
ULTRALYTICS_ONNX = "ultralytics YOLO('yolov8n.onnx').predict, 1 image/call"
BASELINE = REPO / "bench" / "results" / "baseline-detect-cpu.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", nargs="+", default=[str(SHARED / "data")], help="image files or folders")
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per contender")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds not counted before each")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--stem", default="compare-cpu")
    p.add_argument("--skip-references", action="store_true", help="pipeline contenders only")
    p.add_argument("--only", nargs="*", default=None, help="pipeline variants to run (default: all)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda for a GPU run (references and INFERLINE_DEVICE)")
    p.add_argument("--other-concurrency", type=int, nargs="+", default=[1, 8],
                   help="concurrencies for Faster R-CNN and CLIP through the as-shipped stack")
    p.add_argument("--reference-batch", type=int, default=8, help="images per call of batched ultralytics predict")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every contender this many times, interleaved; report the medians")
    p.add_argument("--replot", action="store_true", help="redraw the plot from <out>/<stem>.json, run nothing")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


# ---- references ----------------------------------------------------------------------------


def reference(library: str, images: list[str], batch: int, args: argparse.Namespace, half: bool = False) -> dict:
    return library_loop(library, images, batch=batch, duration=args.duration, warmup=args.warmup,
                        device=args.device, half=half)


# ---- pipeline variants ---------------------------------------------------------------------


def repository(root: Path, variant: Variant) -> Path:
    """A copy of the built-in repository with yolov8n changed as the variant says (the built-in
    one itself for the default layout)."""
    if (variant.backend == "default" and variant.max_batch_size is None and variant.instances is None
            and not variant.parameters):
        return BUILTIN_REPOSITORY
    repo = root / f"repo-{variant.name}"
    shutil.copytree(BUILTIN_REPOSITORY, repo)
    config_path = repo / YOLO / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    if variant.max_batch_size is not None:
        config["max_batch_size"] = variant.max_batch_size
    if variant.backend != "default":
        config["backend"] = variant.backend
        config["instance_count"] = variant.instances or 1
        # Fixed threads, as before issue 17: one session (ORT's own thread count), or one thread
        # per instance; the weights stay the .pt, exported once into the export cache.
        config["parameters"] = {}
        if variant.backend == "onnxruntime":
            config["parameters"] = {"graph_optimization_level": "all"}
            if (variant.instances or 1) > 1:
                config["parameters"]["intra_op_threads"] = 1
    elif variant.instances is not None:
        config["instance_count"] = variant.instances
    config["parameters"] = {**(config.get("parameters") or {}), **dict(variant.parameters)}
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return repo


@contextmanager
def stack(repo: Path, models: list[str], variant: Variant, device: str = "cpu") -> Iterator[LocalStack]:
    env = free_port_env(clean_env())
    # Known metrics ports (free_port_env lets each stage pick one) for the model-busy scrape.
    for stage, port in zip(("inference", CONTROLLER), free_ports(2), strict=True):
        env[f"INFERLINE_{stage.upper()}_METRICS_PORT"] = str(port)
    env["INFERLINE_DEVICE"] = device
    env.update(INFERLINE_MODEL_REPOSITORY=str(repo), INFERLINE_MODELS=",".join(models), INFERLINE_LOG_LEVEL="WARNING")
    if variant.inprocess:
        env["INFERLINE_INPROCESS"] = "true"
    env["INFERLINE_TENSOR_TRANSPORT"] = variant.tensor_transport
    if variant.torch_threads:
        env["INFERLINE_TORCH_THREADS"] = str(variant.torch_threads)
    env.update(variant.env)
    settings = Settings.from_env(env)
    running = LocalStack(settings, env=env, stages=(CONTROLLER,) if variant.inprocess else START_ORDER)
    running.start(timeout=300)
    try:
        yield running
    finally:
        running.stop()


def drive(running: LocalStack, model: str, images: list[Path], concurrency: int, args: argparse.Namespace) -> dict:
    pids = {stage: p.pid for stage, p in running.processes.items()}
    # The model runs in the inference stage, or in the controller's process with --inprocess.
    port = running.settings.metrics_port("inference" if "inference" in running.processes else CONTROLLER)
    metrics = f"http://127.0.0.1:{port}/metrics" if port else None
    before = scrape_busy(metrics, model) if metrics else None
    result = loadgen.run(
        running.controller_target, model, images, concurrency=concurrency, duration=args.duration,
        warmup=args.warmup, timeout=120, pids=pids,
    )
    after = scrape_busy(metrics, model) if metrics else None
    return {**result.to_dict(), "model_busy": busy_ratio(before, after)}


def detection_counts(running: LocalStack, model: str, images: list[Path]) -> dict[str, int]:
    """Boxes per image (by file name), one image per Detect at the model's default thresholds,
    as ultralytics predict is called: the sanity check beside the speed figures."""
    counts = {}
    with Client(running.controller_target, running.settings, timeout=120) as client:
        for path in images:
            (image,) = client.detect(DetectRequest(model, image_inputs([path]))).images
            counts[path.name] = len(image.detections)
    return counts


def environment() -> dict:
    """What a reader needs to rerun and compare: the machine, the libraries, the commit."""
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return {
        "cpu": cpu,
        "usable_cores": usable_cores(),
        "versions": versions(("torch", "ultralytics", "torchvision", "open-clip-torch", "onnxruntime", "grpcio",
                              "numpy")),
        "commit": commit(),
    }


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    # "default": yolov8n as the repository ships it; "torch" or "onnxruntime" with fixed threads.
    backend: str = "default"
    max_batch_size: int | None = None  # None: the repository's (32)
    instances: int | None = None  # None: the repository's
    torch_threads: int = 0  # 0: torch's default (all cores)
    inprocess: bool = False
    other_models: bool = False  # also measure Faster R-CNN and CLIP on this stack
    tensor_transport: str = "auto"  # issue 16: shared memory between the stages on one host
    parameters: tuple[tuple[str, object], ...] = ()  # merged into yolov8n's config parameters
    env: tuple[tuple[str, str], ...] = ()  # settings of the stack's processes


VARIANTS = {
    v.name: v
    for v in (
        Variant("default", "four services, as shipped (ONNX Runtime, 2 instances, threads follow the load)",
                other_models=True),
        Variant("torch", "four services, PyTorch, dynamic batching", backend="torch"),
        Variant("batch1", "four services, PyTorch, batching off (baseline config)", backend="torch",
                max_batch_size=1),
        Variant("torch-x2", "four services, PyTorch, 2 instances x 1 thread", backend="torch", instances=2,
                torch_threads=1),
        Variant("onnxruntime", "four services, ONNX Runtime, one session", backend="onnxruntime"),
        Variant("onnxruntime-x2", "four services, ONNX Runtime, 2 instances x 1 thread", backend="onnxruntime",
                instances=2),
        Variant("inprocess", "--inprocess controller, PyTorch, dynamic batching", backend="torch", inprocess=True),
        Variant("inprocess-default", "--inprocess controller, as shipped", inprocess=True),
        Variant("default-inline", "four services, as shipped, tensors inline (no shared memory)",
                tensor_transport="inline"),
        Variant("torch-inline", "four services, PyTorch, dynamic batching, tensors inline", backend="torch",
                tensor_transport="inline"),
        Variant("default-nice", "four services, as shipped, the inference stage at niceness 10",
                env=(("INFERLINE_INFERENCE_NICE", "10"),)),
        Variant("default-arena", "four services, as shipped but with ONNX Runtime's CPU memory arena on",
                parameters=(("cpu_mem_arena", True),)),
        Variant("default-spin-stop", "four services, as shipped but the lone pass's threads stop spinning after it",
                parameters=(("force_spinning_stop", True),)),
    )
}


# ---- the run -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        saved = json.loads((args.out / f"{args.stem}.json").read_text())["rows"]
        draw(saved, args.out / f"{args.stem}-latency-throughput.png")
        return 0
    images = [str(p) for p in collect_images(args.images)]
    paths = [Path(p) for p in images]
    measured: list[dict] = []  # every round's rows
    loadavg_at_start = os.getloadavg()
    forwards: list[float] = []  # the forward pass's CPU ms per image, one per round
    ceilings: list[float] = []  # images/s of one forward loop per core, all at once, one per round
    counts: dict[str, dict[str, int]] = {}  # contender -> boxes per image

    def record(family: str, contender: str, concurrency: int | None, batch: int, report: Mapping, round_: int) -> None:
        row = {"family": family, "contender": contender, "concurrency": concurrency, "batch": batch, **report,
               "round": round_}
        measured.append(row)
        print(f"[{round_}] {family:8} {contender:58} c={concurrency!s:4} b={batch:<3} {report['img_per_s']:8.2f} img/s "
              f"p50 {report['p50_ms']:8.1f} ms  p95 {report['p95_ms']:8.1f} ms  errors {report['errors']}", flush=True)

    # Each job measures one contender once (a reference's fresh process, or rows of a running stack).
    jobs: list[Callable[[int], None]] = []

    def reference_job(family: str, contender: str, library: str, batch: int, half: bool = False) -> None:
        def run(round_: int) -> None:
            report = reference(library, images, batch, args, half=half)
            found = report.pop("detections", None)
            # Boxes per image are checked at one image per call (batched predict pads otherwise).
            if found is not None and batch == 1 and contender not in counts:
                counts[contender] = found
            record(family, contender, None, batch, report, round_)

        jobs.append(run)

    if not args.skip_references:
        reference_job("yolo", ULTRALYTICS, "ultralytics", 1)
        if args.device == "cpu":
            reference_job("yolo", ULTRALYTICS_ONNX, "ultralytics-onnx", 1)
            jobs.append(lambda round_: forwards.append(
                reference("forward", images, 1, args)["cpu_ms_per_image"]["reference"]))
            # The same loop on every core at once: what the cores give to forward passes that
            # share nothing else (the limit's arithmetic assumes they scale perfectly).
            jobs.append(lambda round_: ceilings.append(sum(
                report["img_per_s"] for report in references_at_once(
                    "forward", images, usable_cores(), batch=1, duration=args.duration, warmup=args.warmup,
                    device=args.device))))
        gpu = args.device != "cpu"
        label = "ultralytics predict, batched" + (", fp16" if gpu else "")
        reference_job("yolo", label, "ultralytics", args.reference_batch, half=gpu)
        reference_job("frcnn", "torchvision loop, 1 image/call", "torchvision", 1)
        reference_job("clip", "open_clip loop, 1 image/call", "open_clip", 1)

    with tempfile.TemporaryDirectory(prefix="inferline-compare-") as tmp, ExitStack() as stacks:
        root = Path(tmp)
        for name, variant in VARIANTS.items():
            if args.only is not None and name not in args.only:
                continue
            models = [YOLO, FRCNN, CLIP, f"{CLIP}-text"] if variant.other_models else [YOLO]
            # Started once and kept up for every round (an idle stack costs its health polls).
            running = stacks.enter_context(stack(repository(root, variant), models, variant, args.device))
            counts[f"pipeline: {variant.label}"] = detection_counts(running, YOLO, paths)

            def pipeline_job(round_: int, running: LocalStack = running, variant: Variant = variant) -> None:
                for concurrency in args.concurrency:
                    report = drive(running, YOLO, paths, concurrency, args)
                    record("yolo", f"pipeline: {variant.label}", concurrency, 1, report, round_)
                if variant.other_models:
                    for family, model in (("frcnn", FRCNN), ("clip", CLIP)):
                        for concurrency in args.other_concurrency:
                            report = drive(running, model, paths, concurrency, args)
                            record(family, f"pipeline: {variant.label}", concurrency, 1, report, round_)

            jobs.append(pipeline_job)
        for round_ in range(1, args.rounds + 1):
            for job in jobs if round_ % 2 else reversed(jobs):
                job(round_)

    rows = median_rows(measured)
    forward_limit: dict | None = None
    if forwards:
        forward = statistics.median(forwards)
        cores = usable_cores()
        forward_limit = {"forward_cpu_ms_per_image": round(forward, 2), "cores": cores,
                         "img_per_s": round(cores * 1000 / forward, 2)}
    arguments = argv if argv is not None else sys.argv[1:]
    command = "python bench/compare.py " + " ".join(shlex.quote(a) for a in arguments)
    summary = summarise(rows)
    if forward_limit is not None:
        summary["model_forward_limit"] = forward_limit
        best = _best(rows, "yolo", "pipeline: four services")
        if best:
            summary["yolo_best_pipeline_vs_forward_limit"] = round(best["img_per_s"] / forward_limit["img_per_s"], 3)
        if ceilings:
            ceiling = statistics.median(ceilings)
            summary["model_forward_ceiling"] = {
                "processes": forward_limit["cores"], "img_per_s": round(ceiling, 2),
                "vs_limit": round(ceiling / forward_limit["img_per_s"], 3),
                "rounds_img_per_s": [round(c, 2) for c in ceilings],
            }
            if best:
                summary["yolo_best_pipeline_vs_forward_ceiling"] = round(best["img_per_s"] / ceiling, 3)
        onnx_loop_row = _best(rows, "yolo", ULTRALYTICS_ONNX)
        default_c1 = next((r for r in rows if r["contender"] == f"pipeline: {VARIANTS['default'].label}"
                           and r["concurrency"] == 1), None)
        if onnx_loop_row and default_c1:
            summary["default_c1_p50_vs_ultralytics_onnx"] = round(default_c1["p50_ms"] / onnx_loop_row["p50_ms"], 2)
    summary["detection_counts"] = parity(counts)
    meta = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command.strip(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                   f"{platform.python_implementation()} {platform.python_version()}",
        **environment(),
        "loadavg_at_start": [round(x, 2) for x in loadavg_at_start],
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "images": len(images),
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "rounds": args.rounds,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    document = {"meta": meta, "summary": summary, "rows": rows, "rounds": measured if args.rounds > 1 else []}
    (args.out / f"{args.stem}.json").write_text(json.dumps(document, indent=2) + "\n")
    plot = args.out / f"{args.stem}-latency-throughput.png"
    draw(rows, plot)
    (args.out / f"{args.stem}.md").write_text(markdown(meta, summary, rows, plot.name))
    print(json.dumps(summary, indent=2))
    return 0


# The figures a row's median is taken of; the rest of a row (stage times, CPU, RSS) comes from its
# median round by throughput, so that they stay one consistent measurement.
MEDIAN_FIELDS = ("img_per_s", "p50_ms", "p95_ms", "p99_ms", "model_busy")


def median_rows(measured: list[dict]) -> list[dict]:
    """One row per contender and concurrency, in first-measured order: each ``MEDIAN_FIELDS``
    figure the median of its rounds, errors summed over them, and the rounds' throughputs and
    p50s kept (``rounds_img_per_s``, ``rounds_p50_ms``) to show the spread."""
    groups: dict[tuple, list[dict]] = {}
    for row in measured:
        groups.setdefault((row["family"], row["contender"], row["concurrency"], row["batch"]), []).append(row)
    rows = []
    for group in groups.values():
        by_throughput = sorted(group, key=lambda r: r["img_per_s"])
        row = {k: v for k, v in by_throughput[(len(group) - 1) // 2].items() if k != "round"}
        for key in MEDIAN_FIELDS:
            values = [r[key] for r in group if r.get(key) is not None]
            if values:
                row[key] = round(statistics.median(values), 3)
        row["errors"] = sum(r["errors"] for r in group)
        if len(group) > 1:
            row["rounds_img_per_s"] = [r["img_per_s"] for r in group]
            row["rounds_p50_ms"] = [r["p50_ms"] for r in group]
        rows.append(row)
    return rows


def parity(counts: Mapping[str, Mapping[str, int]]) -> dict:
    """Each pipeline variant's boxes per image against ultralytics' (when it ran): the images
    where they differ, by contender; an empty ``mismatches`` is the check passed."""
    reference_counts = counts.get(ULTRALYTICS)
    if reference_counts is None:
        return {"checked": False, "reason": "no ultralytics reference in this run"}
    mismatches = {}
    for contender, found in counts.items():
        differ = {image: {"pipeline": n, "ultralytics": reference_counts.get(image)}
                  for image, n in found.items() if reference_counts.get(image) != n}
        if differ:
            mismatches[contender] = differ
    return {"checked": True, "ultralytics": dict(reference_counts), "mismatches": mismatches}


def _best(rows: list[dict], family: str, contender_prefix: str) -> dict | None:
    found = [r for r in rows if r["family"] == family and r["contender"].startswith(contender_prefix)]
    return max(found, key=lambda r: r["img_per_s"], default=None)


def summarise(rows: list[dict]) -> dict:
    summary: dict = {}
    base = _best(rows, "yolo", ULTRALYTICS)
    four = _best(rows, "yolo", "pipeline: four services")
    if base and four:
        summary["yolo_best_pipeline"] = {key: four[key] for key in ("contender", "concurrency", "img_per_s")}
        summary["yolo_vs_ultralytics"] = round(four["img_per_s"] / base["img_per_s"], 2)
    pairs = (("default", "inprocess-default"), ("default-inline", "inprocess-default"), ("torch", "inprocess"),
             ("torch-inline", "inprocess"))
    for four_name, local_name in pairs:
        for c in sorted({r["concurrency"] for r in rows if r["concurrency"]}):
            four_row, local = (
                next((r for r in rows if r["contender"] == f"pipeline: {VARIANTS[name].label}"
                      and r["concurrency"] == c), None)
                for name in (four_name, local_name)
            )
            if four_row and local and local["img_per_s"]:
                cost = round(1 - four_row["img_per_s"] / local["img_per_s"], 3)
                summary.setdefault(f"boundary_cost_{four_name}", {})[str(c)] = cost
    for family, ref in (("frcnn", "torchvision loop"), ("clip", "open_clip loop")):
        ours, theirs = _best(rows, family, "pipeline"), _best(rows, family, ref)
        if ours and theirs:
            summary[f"{family}_vs_reference"] = round(ours["img_per_s"] / theirs["img_per_s"], 2)
        one = next((r for r in rows if r["family"] == family and r["contender"].startswith("pipeline")
                    and r["concurrency"] == 1), None)
        if one and theirs:
            summary[f"{family}_c1_p50_vs_reference"] = round(one["p50_ms"] / theirs["p50_ms"], 2)
    if BASELINE.is_file():
        baseline = json.loads(BASELINE.read_text())
        summary["issue3_baseline_note"] = baseline.get("summary", baseline.get("ratios", "see " + BASELINE.name))
    return summary


def markdown(meta: dict, summary: dict, rows: list[dict], plot_name: str) -> str:
    base = {r["family"]: r for r in rows if r["concurrency"] is None and r["batch"] == 1}
    # YOLO's reference is the strongest simple alternative when it ran: ultralytics' ONNX loop.
    base.update({r["family"]: r for r in rows if r["contender"] == ULTRALYTICS_ONNX})
    lines = [
        f"# CPU comparison ({meta['date']})",
        "",
        f"Command: `{meta['command']}` on {meta['machine']}; {meta['images']} images, "
        f"{meta['duration_s']:g} s measured per contender after {meta['warmup_s']:g} s warm-up, "
        + ("one run." if meta.get("rounds", 1) == 1 else
           f"{meta['rounds']} interleaved rounds, medians (each round's images/s and p50 in the JSON)."),
        "",
        f"{meta['cpu']} ({meta['usable_cores']} usable cores), load average {meta['loadavg_at_start']} at the "
        f"start and {meta['loadavg_at_end']} at the end; commit {meta['commit']}; "
        + ", ".join(f"{name} {version}" for name, version in meta["versions"].items()) + ".",
        "",
        "| family | contender | concurrency | batch | images/s | vs reference | p50 ms | p95 ms | p99 ms | errors "
        "| model busy | peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ref = base.get(r["family"])
        ratio = f"{r['img_per_s'] / ref['img_per_s']:.2f}x" if ref and ref["img_per_s"] else ""
        rss = ", ".join(f"{k} {v:.0f}" for k, v in (r.get("rss_mb") or {}).items())
        busy = "-" if r.get("model_busy") is None else f"{r['model_busy']:.0%}"
        lines.append(
            f"| {r['family']} | {r['contender']} | {r['concurrency'] or '-'} | {r['batch']} "
            f"| {r['img_per_s']:.2f} | {ratio} "
            f"| {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | {busy} | {rss} |"
        )
    lines += ["", *stage_table(rows)]
    lines += ["", "Summary:", "", "```json", json.dumps(summary, indent=2), "```", ""]
    lines += [f"![latency vs throughput]({plot_name})", ""]
    return "\n".join(lines)


def stage_table(rows: list[dict]) -> list[str]:
    """Where one request's time goes (p50, ms), for the rows that report it at one image per call.

    Pipeline: each stage as the controller timed its call to it (the hop and (de)serialisation
    included); 'controller other' is the controller's handler less its stage calls, 'outside'
    the client's latency less the handler (the client-to-controller hop and the wait before the
    handler runs). ultralytics: its own ``Results.speed``; 'outside' is the rest of its call
    (reading and decoding the file among it)."""
    timed = [r for r in rows if r.get("stages_ms") and r["batch"] == 1 and r["family"] == "yolo"]
    if not timed:
        return []
    lines = [
        "Where the time goes (YOLO, one image per call, p50 ms):",
        "",
        "| contender | concurrency | preprocess | inference | postprocess | controller other | outside "
        "| client latency |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in timed:
        stages = {key: value["p50"] for key, value in r["stages_ms"].items()}
        pre, inf, post = (stages.get(key, 0.0) for key in PIPELINE_STAGES)
        client = stages["client"]
        total = stages.get("total")
        other = "-" if total is None else f"{total - pre - inf - post:.1f}"
        outside = client - (pre + inf + post if total is None else total)
        lines.append(
            f"| {r['contender']} | {r['concurrency'] or '-'} | {pre:.1f} | {inf:.1f} | {post:.1f} | {other} "
            f"| {outside:.1f} | {client:.1f} |"
        )
    return lines


def draw(rows: list[dict], path: Path) -> None:
    import matplotlib  # noqa: PLC0415 - only --replot and the end of a run draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - after choosing the Agg backend

    families = [f for f in ("yolo", "frcnn", "clip") if any(r["family"] == f for r in rows)]
    fig, axes = plt.subplots(1, len(families), figsize=(6 * len(families), 7.5), squeeze=False)
    for ax, family in zip(axes[0], families, strict=True):
        mine = [r for r in rows if r["family"] == family]
        for contender in dict.fromkeys(r["contender"] for r in mine):
            points = sorted((r for r in mine if r["contender"] == contender), key=lambda r: r["concurrency"] or 0)
            xs = [r["img_per_s"] for r in points]
            marker = "*" if points[0]["concurrency"] is None else "o"
            ax.plot(xs, [r["p50_ms"] for r in points], marker=marker, markersize=10 if marker == "*" else 6,
                    label=contender)
            ax.scatter(xs, [r["p95_ms"] for r in points], marker="_", s=120, color=ax.lines[-1].get_color())
            for r in points:
                if r["concurrency"]:
                    ax.annotate(f"c{r['concurrency']}", (r["img_per_s"], r["p50_ms"]), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
        ax.set_title(f"{family}: p50 (line) and p95 (dash) latency vs throughput")
        ax.set_xlabel("images/s")
        ax.set_ylabel("latency per request, ms")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=1, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
