"""Idle resident memory of each stage after repeated overload episodes (does memory ratchet?).

Starts the four stages as local processes, as `inferline up` does, warms them with a few calls,
records each stage's idle VmRSS (less shared memory), then runs N overload episodes: closed-loop clients far beyond
the stack's saturation (loopback only) for a few seconds each. After every episode it waits
until the stack is idle (no calls left, every stage's CPU quiet, RSS steady) and records each
stage's VmRSS again. A stack with bounded memory returns to about the same idle level after
every episode; a ratchet shows as idle RSS climbing episode after episode.

The bench measures whatever the stack does under overload (queueing, refusing early, timing
out): it reports every call's final status per episode, and asserts nothing.

    INFERLINE_MODEL_DIR=../shared/models:.cache/standins .venv/bin/python bench/memory_episodes.py \
        --episodes 5 --clients 200 --seconds 6

Writes bench/results/memory-episodes.{json,md} (``--out``, ``--name`` to change them). The
allocator settings that bound memory can be turned off to see the ratchet:
``INFERLINE_MALLOC_ARENA_MAX=0 INFERLINE_MEMORY_TRIM_IDLE_S=0``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shlex
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from inferline.common.api import DetectRequest
from inferline.common.errors import InferlineError
from inferline.common.settings import STAGES, Settings
from inferline.services import loadgen
from inferline.services.client import AsyncClient, Client, defaults, image_inputs
from inferline.services.stack import LocalStack, free_port_env

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO.parent / "shared" / "data"


def rss_mib(pid: int) -> float:
    """The process's own resident memory now, in MiB: VmRSS less its resident shared memory
    (RssShmem). The controller's tensor pool in /dev/shm (issue 16) is a fixed-size object that
    the preprocess and inference stages map; its pages join each mapper's VmRSS as slots are
    first used, which is neither growth nor theirs. The pool's size is bounded by its settings."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssShmem"):
            fields[name] = int(value.split()[0])
    if "VmRSS" not in fields:
        raise RuntimeError(f"no VmRSS for pid {pid}")
    return (fields["VmRSS"] - fields.get("RssShmem", 0)) / 1024


def wait_idle(pids: Mapping[str, int], *, quiet_cpu_s: float = 0.05, steady: float = 0.01, seconds: int = 6,
              timeout: float = 90.0) -> dict[str, float]:
    """Each stage's RSS once the stack is idle: for ``seconds`` one-second samples in a row,
    every stage used under ``quiet_cpu_s`` of CPU and its RSS moved by less than ``steady`` (a
    fraction); or after ``timeout`` s, whatever it is then. Long enough that a stage's own idle
    housekeeping (the trims 2 s and 8 s after the last call, INFERLINE_MEMORY_TRIM_IDLE_S) is
    over before the figure is taken."""
    expires = time.monotonic() + timeout
    cpu = loadgen.cpu_seconds(pids)
    rss = {stage: rss_mib(pid) for stage, pid in pids.items()}
    calm = 0
    while True:
        time.sleep(1.0)
        cpu_now = loadgen.cpu_seconds(pids)
        rss_now = {stage: rss_mib(pid) for stage, pid in pids.items()}
        busy = [s for s in pids if cpu_now[s] - cpu[s] >= quiet_cpu_s]
        moving = [s for s in pids if abs(rss_now[s] - rss[s]) > steady * rss[s]]
        calm = 0 if busy or moving else calm + 1
        if calm >= seconds or time.monotonic() > expires:
            return {stage: round(value, 1) for stage, value in rss_now.items()}
        cpu, rss = cpu_now, rss_now


@dataclass
class Episode:
    clients: int
    seconds: float
    codes: dict[str, int] = field(default_factory=dict)
    images_ok: int = 0
    idle_rss_mib: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: dict[str, float] = field(default_factory=dict)


async def _closed_loop(target: str, model: str, images: Sequence[Path], *, clients: int, seconds: float,
                       timeout: float) -> Counter:
    """``clients`` callers, each sending its next Detect as soon as its last one answered, until
    ``seconds`` have passed; every call's final status is counted, however late it ends."""
    _, requests = loadgen.build_requests(model, "detect", images, batch=1)
    codes: Counter = Counter()
    async with AsyncClient(target) as client:
        stop_at = time.monotonic() + seconds

        async def caller(offset: int) -> None:
            sent = offset
            while time.monotonic() < stop_at:
                try:
                    result = await client.detect(requests[sent % len(requests)], timeout=timeout)  # type: ignore[arg-type]
                    codes["OK" if result.images[0].error is None else "ITEM_FAILED"] += 1
                except InferlineError as exc:
                    codes[loadgen.code_of(exc)] += 1
                sent += clients

        await asyncio.gather(*(caller(i) for i in range(clients)))
    return codes


def overload(target: str, model: str, images: Sequence[Path], pids: Mapping[str, int], *, clients: int, seconds: float,
             timeout: float, idle_seconds: int) -> Episode:
    """One episode: ``clients`` closed-loop callers for ``seconds``, then the wait for idle."""
    codes = asyncio.run(_closed_loop(target, model, images, clients=clients, seconds=seconds, timeout=timeout))
    episode = Episode(clients, seconds, codes=dict(codes), images_ok=codes.get("OK", 0))
    episode.peak_rss_mib = loadgen.stage_memory(pids)
    episode.idle_rss_mib = wait_idle(pids, seconds=idle_seconds)
    return episode


def port_env(base: int | None) -> dict[str, str]:
    """The stack's environment: free ports, or ``base``..``base+8`` for the stages, their
    metrics and the gateway (a fixed range beside other stacks on a shared machine)."""
    env = free_port_env()
    if base is not None:
        for i, stage in enumerate(STAGES):
            env[f"INFERLINE_{stage.upper()}_PORT"] = str(base + i)
            env[f"INFERLINE_{stage.upper()}_TARGET"] = f"localhost:{base + i}"
            env[f"INFERLINE_{stage.upper()}_METRICS_PORT"] = str(base + 4 + i)
        env["INFERLINE_GATEWAY_PORT"] = str(base + 8)
    return env


def run(args: argparse.Namespace) -> dict:
    images = sorted(args.images.glob("*.jpg")) if args.images.is_dir() else [args.images]
    if not images:
        raise SystemExit(f"no .jpg images in {args.images}")
    env = port_env(args.port_base)
    env.setdefault("INFERLINE_LOG_LEVEL", "WARNING")
    env["INFERLINE_MODELS"] = args.model
    settings = Settings.from_env(env)
    with LocalStack(settings, env=env) as stack:
        pids = {stage: process.pid for stage, process in stack.processes.items()}
        with Client(stack.controller_target, settings, timeout=120) as client:
            for path in images[:4]:
                client.detect(DetectRequest(args.model, image_inputs([path])))
        warm = wait_idle(pids, seconds=args.idle_seconds)
        print(f"warmed up: {warm}", flush=True)
        episodes = []
        for n in range(1, args.episodes + 1):
            episode = overload(stack.controller_target, args.model, images, pids, clients=args.clients,
                               seconds=args.seconds,
                               timeout=args.timeout, idle_seconds=args.idle_seconds)
            episodes.append(episode)
            print(f"episode {n}: codes {episode.codes}, idle RSS {episode.idle_rss_mib}", flush=True)
        environment = {
            k: v for k, v in sorted(env.items()) if k.startswith(("MALLOC_", "INFERLINE_MALLOC_", "INFERLINE_MEMORY_"))
        }
    first, last = episodes[0].idle_rss_mib, episodes[-1].idle_rss_mib
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "model": args.model,
        "environment": environment,
        "warm_idle_rss_mib": warm,
        "episodes": [vars(e) for e in episodes],
        "last_over_first": {stage: round(last[stage] / first[stage], 3) for stage in first},
    }


def markdown(result: dict) -> str:
    stages = list(result["warm_idle_rss_mib"])
    rows = [f"| warmed up | | | {' | '.join(str(result['warm_idle_rss_mib'][s]) for s in stages)} |"]
    for n, e in enumerate(result["episodes"], 1):
        codes = ", ".join(f"{code} {count}" for code, count in sorted(e["codes"].items()))
        rows.append(
            f"| after episode {n} | {e['images_ok']} | {codes} | "
            f"{' | '.join(str(e['idle_rss_mib'][s]) for s in stages)} |"
        )
    ratio = " | ".join(f"{result['last_over_first'][s]:.3f}" for s in stages)
    return "\n".join(
        [
            "# Idle memory after overload episodes",
            "",
            f"Measured {result['date']} on {result['machine']}, model {result['model']}; "
            f"each episode {result['episodes'][0]['clients']} closed-loop clients "
            f"for {result['episodes'][0]['seconds']:g} s.",
            f"Command: `{result['command']}`. Allocator environment: {result['environment'] or 'none set'}.",
            "",
            f"| idle RSS (MiB) | images OK | calls by status | {' | '.join(stages)} |",
            f"|---|---:|---|{'---:|' * len(stages)}",
            *rows,
            f"| last / first episode | | | {ratio} |",
            "",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--clients", type=int, default=200,
                        help="closed-loop callers per episode (saturation is ~50 on 2 cores)")
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each episode")
    parser.add_argument("--timeout", type=float, default=30.0, help="each call's deadline")
    parser.add_argument("--idle-seconds", type=int, default=6,
                        help="seconds in a row without CPU use or RSS change that count as idle")
    parser.add_argument("--model", default=defaults.DETECT_MODEL)
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--port-base", type=int, help="ports BASE..BASE+8 instead of free ones")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--name", default="memory-episodes", help="file name of the results, without .json/.md")
    args = parser.parse_args()
    if args.episodes < 1 or args.clients < 1 or args.seconds <= 0 or args.idle_seconds < 1:
        parser.error("--episodes, --clients and --idle-seconds must be >= 1, --seconds > 0")
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (args.out / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
