"""``inferline bench``: closed-loop load on a running stack (services/loadgen.py) and its figures.

Beside the client's figures it reads the model's busy time from the inference stage's
``/metrics`` before and after the run (``inferline_model_busy_seconds_total``): at saturation a
model busy well under 100% is starved by the stages around it, not limited by its forward pass.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

from inferline.common.settings import Settings
from inferline.services.cli import procs, shared
from inferline.services.client import collect_images, defaults


def add_commands(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench", help="drive the running stack with concurrent requests; throughput, latency, memory"
    )
    bench.add_argument("--model", default=defaults.DETECT_MODEL, help="a detect or embed model")
    bench.add_argument("--images", nargs="+", required=True, help="image files or directories")
    bench.add_argument("--concurrency", type=int, default=8, help="requests in flight (closed loop)")
    bench.add_argument("--duration", type=float, default=20.0, help="seconds measured, after the warm-up")
    bench.add_argument("--warmup", type=float, default=3.0, help="seconds sent first and not counted")
    bench.add_argument("--batch", type=int, default=1, help="images per request")
    bench.add_argument("--honour-retry", action="store_true",
                       help="after a refusal, wait the server's RetryInfo hint before the next call "
                            "(as gRPC's retry pushback does)")
    bench.add_argument("--pid", action="append", default=[], metavar="STAGE=PID",
                       help="a stage's process for the CPU and memory figures (default: the process "
                            "listening on the stage's port)")
    bench.add_argument("--port", action="append", default=[], metavar="STAGE=PORT",
                       help="a stage's local port, to find its process (default: the controller's from "
                            "--target, the other stages' from INFERLINE_<STAGE>_TARGET)")
    bench.add_argument("--json", action="store_true", help="one JSON object instead of text")
    bench.add_argument("--metrics", default=None, metavar="URL",
                       help="the inference stage's /metrics, for model busy (default: this host's "
                            "INFERLINE_INFERENCE_METRICS_PORT; 'none' reads nothing)")
    shared.add_target(bench)
    shared.add_timeout(bench)
    bench.set_defaults(handler=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from inferline.services import loadgen  # noqa: PLC0415 - numpy-heavy, only for this command

    if args.concurrency < 1 or args.batch < 1 or args.duration <= 0 or args.warmup < 0:
        return shared.fail("--concurrency and --batch must be >= 1, --duration > 0, --warmup >= 0")
    settings = shared.settings(args)
    target = shared.target(args, settings)
    try:
        pids = loadgen.parse_pids(args.pid) if args.pid else measured_pids(target, settings, args.port)
    except ValueError as exc:
        return shared.fail(str(exc))
    if not pids:
        print("note: no stage process found listening on this machine; no CPU or memory figures", file=sys.stderr)
    metrics = _metrics_url(args.metrics, settings)
    before = scrape_busy(metrics, args.model) if metrics else None
    try:
        result = loadgen.run(
            target, args.model, collect_images(args.images), concurrency=args.concurrency,
            duration=args.duration, batch=args.batch, warmup=args.warmup, timeout=args.timeout,
            honour_retry=args.honour_retry, pids=pids, settings=settings,
        )
    except ValueError as exc:
        return shared.fail(str(exc))
    report = result.to_dict()
    after = scrape_busy(metrics, args.model) if metrics else None
    busy = busy_ratio(before, after)
    report["model_busy"] = busy
    text = result.to_text()
    if busy is not None:
        text += f"\n  model busy   {busy:.0%} of its instances' time (warm-up included; {metrics})"
    print(json.dumps(report) if args.json else text)
    if not result.images_ok:
        codes = report["error_codes"] or "per-image statuses"
        return shared.fail(f"no image was answered in {args.duration:g} s (failures by code: {codes})")
    return 0


def measured_pids(target: str, settings: Settings, ports: Sequence[str]) -> dict[str, int]:
    """The processes listening on the stack's ports on this machine: the controller's from the
    target, the other stages' from the settings (or ``--port STAGE=PORT``)."""
    defaults = Settings()
    targets = {
        stage: settings.target(stage) if settings.target(stage) != defaults.target(stage)
        else f"localhost:{settings.port(stage)}"
        for stage in ("preprocess", "inference", "postprocess")
    }
    targets["controller"] = target
    for item in ports:
        stage, _, port = item.partition("=")
        if not port.isdigit():
            raise ValueError(f"--port takes STAGE=PORT, got {item!r}")
        targets[stage] = f"localhost:{port}"
    return procs.stage_pids(targets)
@dataclass(frozen=True)
class BusyReading:
    """The model's busy seconds summed over its instances, how many, and when they were read."""

    seconds: float
    instances: int
    at: float


def _metrics_url(flag: str | None, settings: Settings) -> str | None:
    if flag is not None:
        return None if flag == "none" else flag
    port = settings.metrics_port("inference")
    return f"http://127.0.0.1:{port}/metrics" if port else None


def scrape_busy(url: str, model: str, timeout: float = 5.0) -> BusyReading | None:
    """The model's busy counters from a /metrics page; None when it cannot be read (a stack
    without metrics, another host's port): the bench's other figures stand without it."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415 - only with --metrics

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - the operator's own URL
            page = response.read().decode()
    except (OSError, urllib.error.URLError, ValueError):
        return None
    seconds, instances = 0.0, 0
    for family in text_string_to_metric_families(page):
        if family.name != "inferline_model_busy_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("model") == model:
                seconds += sample.value
                instances += 1
    return BusyReading(seconds, instances, time.monotonic()) if instances else None


def busy_ratio(before: BusyReading | None, after: BusyReading | None) -> float | None:
    """Busy instance-seconds between two readings over the instance-seconds that passed."""
    if after is None or before is None or after.at <= before.at:
        return None
    instances = max(after.instances, before.instances)
    return round(min(1.0, (after.seconds - before.seconds) / ((after.at - before.at) * instances)), 3)
