"""Goodput under overload: the default stack, YOLOv8n, closed loop, at 4x and 10x saturation.

Starts the four stages as `inferline up` does (the default configuration: every model of the
built-in repository, PyTorch YOLOv8n), on free ports (or ``--port-base``), loopback only. Then:

1. a short sweep of closed-loop concurrencies finds the saturating one: the smallest whose
   goodput (OK images/s) reaches 95% of the best seen; its goodput is the saturated throughput
   and its OK p99 the saturated p99;
2. runs ``--rounds`` interleaved rounds of the saturating concurrency and 4x and 10x it (a
   shared 2-core machine varies by +-10% between short runs, so ratios compare runs side by
   side and medians are quoted), overload with a deadline of ``--deadline`` seconds per call
   (default: 1.5x the saturated p99, at least 1 s: a deadline the stack meets when it is not
   overloaded, with little to spare), and reports goodput / saturated goodput, calls by status, images
   that failed inside OK calls, refusal p50/p99, OK p50/p99, DEADLINE_EXCEEDED, the inference
   stage's ``inferline_wasted_items_total`` delta (model runs for callers already gone) and
   each stage's peak RSS.

The load generator runs in this process at ``--client-nice`` (default 5) once the stack is up:
on a small machine it shares the stack's cores, and clients on other machines (as in
production) would not take the stack's CPU. Each overload level runs twice: with clients that
honour a refusal's RetryInfo hint (as gRPC's retry pushback does) and with clients that send
again at once (the worst client). Writes
bench/results/overload-cpu.{json,md} (``--quick``: a shorter run to overload-cpu-quick.*).
About 6 minutes in full, 2 in ``--quick`` (one round)::

    INFERLINE_MODEL_DIR=../shared/models:.cache/standins .venv/bin/python bench/overload.py
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from inferline.common.api import DetectRequest
from inferline.common.settings import GATEWAY, STAGES, Settings
from inferline.services import loadgen
from inferline.services.client import Client, defaults, image_inputs
from inferline.services.stack import LocalStack

MODEL = defaults.DETECT_MODEL
DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"
WASTED = "inferline_wasted_items_total"


def stack_env(port_base: int | None) -> dict[str, str]:
    """This process's environment with every gRPC and metrics port set: consecutive ports from
    ``port_base``, or ports the OS says are free now. The metrics ports are fixed so the bench
    can scrape the inference stage."""
    names = [*STAGES, GATEWAY, *(f"{s}_metrics" for s in STAGES)]
    if port_base is None:
        sockets = [socket.socket() for _ in names]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        ports = [s.getsockname()[1] for s in sockets]
        for s in sockets:
            s.close()
    else:
        ports = list(range(port_base, port_base + len(names)))
    env = dict(os.environ)
    env.setdefault("INFERLINE_LOG_LEVEL", "WARNING")
    for name, port in zip(names, ports, strict=True):
        env[f"INFERLINE_{name.upper()}_PORT"] = str(port)
        if name in STAGES:
            env[f"INFERLINE_{name.upper()}_TARGET"] = f"localhost:{port}"
    return env


def environment() -> dict[str, str]:
    """What a reader needs to rerun and compare: CPU, library versions, the commit."""
    import torch  # noqa: PLC0415 - only for its version

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")),
                platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    return {"cpu": cpu, "python": platform.python_version(), "torch": torch.__version__, "commit": commit}


def scrape(port: int, name: str, *labels: str) -> float:
    """The sum of the samples of ``name`` on a stage's /metrics whose labels include every one
    of ``labels`` (``'code="OK"'``); 0 when it has none yet."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and all(label in line for label in labels):
            total += float(line.rsplit(" ", 1)[1])
    return total


def server_refusals(port: int) -> tuple[float, float]:
    """The controller's own count of refused Detect calls, and of those answered within 50 ms
    (its RPC histogram): refusal latency without the load generator's scheduling in it."""
    refused = ('method="Detect"', 'code="RESOURCE_EXHAUSTED"', 'service="controller"')
    return (scrape(port, "inferline_rpc_duration_seconds_count", *refused),
            scrape(port, "inferline_rpc_duration_seconds_bucket", *refused, 'le="0.05"'))


def drive(target: str, images: list[Path], concurrency: int, duration: float, deadline: float,
          honour: bool) -> dict[str, Any]:
    result = asyncio.run(loadgen.drive(
        target, MODEL, images, concurrency=concurrency, duration=duration, warmup=min(3.0, duration / 3),
        timeout=deadline, honour_retry=honour,
    ))
    d = result.to_dict()
    print(f"  c={concurrency:<4} goodput {d['img_per_s']:6.2f} img/s  calls {d['calls']}  "
          f"OK {d['ok_ms']}  refused {d['refused_ms']}", flush=True)
    return d


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--quick", action="store_true", help="shorter sweep and runs (about 2 minutes)")
    parser.add_argument("--sweep", type=int, nargs="+", default=None, help="concurrencies of the sweep")
    parser.add_argument("--deadline", type=float, default=None, help="seconds per call under overload")
    parser.add_argument("--client-nice", type=int, default=5,
                        help="niceness of the load generator (0: same as the stack)")
    parser.add_argument("--port-base", type=int, default=None, help="consecutive ports from here (9 in all)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every level (medians are quoted)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    sweep = args.sweep or ([1, 4, 8] if args.quick else [1, 2, 4, 6, 8, 12])
    sweep_s, overload_s = (5.0, 8.0) if args.quick else (8.0, 12.0)
    if args.quick:
        args.rounds = min(args.rounds, 1)
    images = sorted(args.images.glob("*.jpg")) if args.images.is_dir() else [args.images]
    env = stack_env(args.port_base)
    settings = Settings.from_env(env)
    metrics_port = int(env["INFERLINE_INFERENCE_METRICS_PORT"])
    controller_metrics = int(env["INFERLINE_CONTROLLER_METRICS_PORT"])
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with other work: figures are noisy)",
        **environment(),
        "model": MODEL,
        "client_nice": args.client_nice,
    }
    with LocalStack(settings, env=env) as stack:
        pids = {stage: p.pid for stage, p in stack.processes.items()}
        os.nice(args.client_nice)  # after the stages started: they keep the priority they had
        with Client(stack.controller_target, settings, timeout=120) as client:
            for path in images[:4]:  # warm the model (first passes allocate)
                client.detect(DetectRequest(MODEL, image_inputs([path])))
        print(f"sweep {sweep} ({sweep_s:g} s each)", flush=True)
        points = [{"concurrency": c, **drive(stack.controller_target, images, c, sweep_s, 60.0, True)} for c in sweep]
        best = max(p["img_per_s"] for p in points)
        saturated = next(p for p in points if p["img_per_s"] >= 0.95 * best)
        sat_c, sat_rate = saturated["concurrency"], saturated["img_per_s"]
        sat_p99 = saturated["ok_ms"].get("p99", float("nan"))
        deadline = args.deadline or max(1.0, math.ceil(1.5 * sat_p99 / 100) / 10)
        report["sweep"] = points
        report["saturation"] = {"concurrency": sat_c, "img_per_s": sat_rate, "ok_p99_ms": sat_p99}
        report["deadline_s"] = deadline
        print(f"saturated at c={sat_c}: {sat_rate} img/s, OK p99 {sat_p99} ms; overload deadline {deadline} s",
              flush=True)
        # Side by side, in rounds: the saturated level is measured again beside each overload
        # level, so a ratio compares runs minutes apart, not a sweep point with a later run; on a
        # shared machine one short run varies by +-10%, so each figure is the median of the rounds.
        levels = [(1, True), (4, True), (10, True), (4, False), (10, False)]
        rounds: dict[tuple[int, bool], list[dict[str, Any]]] = {level: [] for level in levels}
        for number in range(args.rounds):
            print(f"round {number + 1} of {args.rounds}", flush=True)
            for factor, honour in levels:
                rounds[(factor, honour)].append(
                    measure(stack.controller_target, images, factor, honour, sat_c, overload_s,
                            deadline if factor > 1 else 60.0, metrics_port, controller_metrics)
                )
        baseline = _median([r["goodput_img_per_s"] for r in rounds[(1, True)]])
        report["saturated_in_rounds"] = {"img_per_s_median": baseline, "runs": rounds[(1, True)]}
        runs = [summarise(rounds[level], baseline) for level in levels if level[0] > 1]
        report["overload"] = runs
        report["peak_rss_mb"] = loadgen.stage_memory(pids)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    stem = "overload-cpu-quick" if args.quick else "overload-cpu"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    md = to_markdown(report)
    (out / f"{stem}.md").write_text(md)
    print(md)
    return 0


def measure(target: str, images: list[Path], factor: int, honour: bool, sat_c: int, seconds: float,
            deadline: float, metrics_port: int, controller_metrics: int) -> dict[str, Any]:
    """One closed-loop run at ``factor`` x the saturating concurrency, with its server-side counts."""
    wasted_before = scrape(metrics_port, WASTED)
    refused_before = server_refusals(controller_metrics)
    d = drive(target, images, factor * sat_c, seconds, deadline, honour)
    refused_after = server_refusals(controller_metrics)
    server_count = refused_after[0] - refused_before[0]
    calls = d["calls"]
    refusals = sum(n for code, n in calls.items() if code != "OK")
    return {
        "factor": factor,
        "honour_retry": honour,
        "concurrency": factor * sat_c,
        "goodput_img_per_s": d["img_per_s"],
        "calls": calls,
        "non_ok_not_resource_exhausted": refusals - calls.get(loadgen.REFUSED, 0),
        "refusals_with_retry_hint": d["refusals_with_retry_hint"],
        "refused_ms": d["refused_ms"],
        "server_refusals": server_count,
        "server_refusals_within_50ms": round((refused_after[1] - refused_before[1]) / server_count,
                                             4) if server_count else None,
        "ok_ms": d["ok_ms"],
        "failed_images_in_ok_calls": d["failed_images_in_ok_calls"],
        "deadline_exceeded": (
            calls.get("DEADLINE_EXCEEDED", 0) + d["failed_images_in_ok_calls"].get("DEADLINE_EXCEEDED", 0)
        ),
        "wasted_model_runs": scrape(metrics_port, WASTED) - wasted_before,
    }


def summarise(runs: list[dict[str, Any]], baseline: float) -> dict[str, Any]:
    """Medians over the rounds of one level (goodput, latencies), totals of what must be zero."""
    def median_of(key: str, field: str) -> float | str:
        values = [r[key][field] for r in runs if field in r[key]]
        return round(_median(values), 2) if values else "-"

    goodput = _median([r["goodput_img_per_s"] for r in runs])
    calls: dict[str, int] = {}
    for r in runs:
        for code, n in r["calls"].items():
            calls[code] = calls.get(code, 0) + n
    fast = [r["server_refusals_within_50ms"] for r in runs if r["server_refusals_within_50ms"] is not None]
    return {
        "factor": runs[0]["factor"],
        "honour_retry": runs[0]["honour_retry"],
        "concurrency": runs[0]["concurrency"],
        "goodput_img_per_s": round(goodput, 2),
        "goodput_ratio": round(goodput / baseline, 3) if baseline else None,
        "goodput_ratio_per_round": [round(r["goodput_img_per_s"] / baseline, 3) for r in runs] if baseline else [],
        "calls": calls,
        "non_ok_not_resource_exhausted": sum(r["non_ok_not_resource_exhausted"] for r in runs),
        "refused_ms": {"p50": median_of("refused_ms", "p50"), "p99": median_of("refused_ms", "p99")},
        "server_refusals_within_50ms": min(fast) if fast else None,
        "ok_ms": {"p50": median_of("ok_ms", "p50"), "p99": median_of("ok_ms", "p99")},
        "deadline_exceeded": sum(r["deadline_exceeded"] for r in runs),
        "wasted_model_runs": sum(r["wasted_model_runs"] for r in runs),
        "rounds": runs,
    }


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def to_markdown(report: dict[str, Any]) -> str:
    sat = report["saturation"]
    lines = [
        "# Overload: goodput at 4x and 10x saturation (YOLOv8n, default configuration, closed loop)",
        "",
        f"Measured {report['date']} on {report['machine']}, {report['cpu']}; python {report['python']}, "
        f"torch {report['torch']}, commit {report['commit']}.",
        f"Command: `{report['command']}`. The load generator ran at nice {report['client_nice']} "
        "(clients on other machines would not share the stack's cores).",
        "",
        "Sweep (goodput = OK images/s):",
        "",
        "| concurrency | goodput (img/s) | OK p50 (ms) | OK p99 (ms) | calls |",
        "|---:|---:|---:|---:|---|",
        *(
            f"| {p['concurrency']} | {p['img_per_s']} | {p['ok_ms'].get('p50', '')} | {p['ok_ms'].get('p99', '')} "
            f"| {p['calls']} |"
            for p in report["sweep"]
        ),
        "",
        f"Saturated at concurrency {sat['concurrency']} in the sweep: {sat['img_per_s']} img/s, "
        f"OK p99 {sat['ok_p99_ms']} ms. "
        f"Deadline per call under overload: {report['deadline_s']} s.",
        "",
        f"Then {len(report['saturated_in_rounds']['runs'])} interleaved rounds of every level below, the saturated "
        f"concurrency included (its median goodput, {report['saturated_in_rounds']['img_per_s_median']} img/s, is the "
        "denominator of each ratio): goodput and latencies are medians over the rounds, counts are totals.",
        "",
        "DEADLINE_EXCEEDED counts calls and images failed inside OK calls; \"honours hint\": a refused client",
        "waits the RetryInfo delay before its next call (gRPC retry pushback), else it sends again at once.",
        "",
        "Refusal latency as the clients saw it, and the share of refusals the controller answered within",
        "50 ms by its own RPC histogram (no client scheduling in it).",
        "",
        "| load | honours hint | concurrency | goodput (img/s) | / saturated (per round) | refusal p50 / p99 (ms) "
        "| server refusals <= 50 ms | OK p50 / p99 (ms) | DEADLINE_EXCEEDED | other non-OK | wasted model runs "
        "| calls |",
        "|---|---|---:|---:|---:|---|---:|---|---:|---:|---:|---|",
    ]
    for run in report["overload"]:
        refused = run["refused_ms"]
        ok = run["ok_ms"]
        lines.append(
            f"| {run['factor']}x | {'yes' if run['honour_retry'] else 'no'} | {run['concurrency']} "
            f"| {run['goodput_img_per_s']} | {run['goodput_ratio']} "
            f"({', '.join(map(str, run['goodput_ratio_per_round']))}) | "
            f"{refused.get('p50', '-')} / {refused.get('p99', '-')} | {run['server_refusals_within_50ms']} | "
            f"{ok.get('p50', '-')} / {ok.get('p99', '-')} | "
            f"{run['deadline_exceeded']} "
            f"| {run['non_ok_not_resource_exhausted'] - run['calls'].get('DEADLINE_EXCEEDED', 0)} | "
            f"{run['wasted_model_runs']:g} | {run['calls']} |"
        )
    lines += ["", "Peak RSS (MB): " + ", ".join(f"{k} {v}" for k, v in report["peak_rss_mb"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
