"""What one gRPC hop between two local processes costs, back to back and after an idle gap.

Why: at one client a request crosses four process boundaries (client -> controller -> each of
three stages), and each costs more than its messages' size suggests. This measures the floor
of that cost on the machine at hand, with nothing of the pipeline in it: a unary health Check
from one process to another over loopback, grpc.aio on both ends, once with bare gRPC and once
with inferline's server bootstrap and client channel (their interceptors: telemetry, error
mapping, retry counting; their channel options). Each case is timed back to back and with an
idle gap before every call, the pattern of a stage at one client: it sleeps while the model
runs, then a call wakes it. On a VM an idle core halts and every wake-up pays the hypervisor's
price, so the gap shows what the split costs at low load; at saturation nobody sleeps and the
hop costs CPU time instead (bench/compare.py's cpu_ms_per_image).

    .venv/bin/python bench/hop_latency.py                  # ~1 min; writes bench/results/hop-latency.{json,md}
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
GAPS_MS = (0.0, 5.0, 30.0)


async def _serve(kind: str, port: int) -> None:
    if kind == "bare":
        server = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    else:
        from inferline.common.server import ServerApp, Service  # noqa: PLC0415 - the inferline case only
        from inferline.common.settings import Settings  # noqa: PLC0415 - as above

        settings = Settings.from_env()
        app = ServerApp(Service(name="postprocess", register=lambda server: []), settings, port=port, host="127.0.0.1")
        await app.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def _calls(kind: str, port: int, calls: int, gap_s: float) -> list[float]:
    if kind == "bare":
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    else:
        from inferline.common.channels import create_channel  # noqa: PLC0415 - the inferline case only
        from inferline.common.settings import Settings  # noqa: PLC0415 - as above

        channel = create_channel(f"127.0.0.1:{port}", Settings.from_env(), health_service=None)
    stub: Any = health_pb2_grpc.HealthStub(channel)  # the stubs' types describe the sync channel's
    request = health_pb2.HealthCheckRequest(service="")
    await stub.Check(request, wait_for_ready=True, timeout=30)
    for _ in range(20):  # warm the connection and the code paths
        await stub.Check(request, timeout=10)
    times = []
    for _ in range(calls):
        if gap_s:
            await asyncio.sleep(gap_s)
        started = time.perf_counter()
        await stub.Check(request, timeout=10)
        times.append((time.perf_counter() - started) * 1000)
    await channel.close()
    return times


def _free_port() -> int:
    import socket  # noqa: PLC0415 - one use

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def measure(kind: str, calls: int) -> dict[str, dict[str, float]]:
    """p50 and p90 ms of a Check per gap, the server in its own process."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", kind, "--port", str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the {kind} server did not start")
        out = {}
        for gap in GAPS_MS:
            times = sorted(asyncio.run(_calls(kind, port, calls, gap / 1000)))
            out[f"{gap:g}"] = {"p50_ms": round(statistics.median(times), 3),
                               "p90_ms": round(times[int(0.9 * (len(times) - 1))], 3)}
        return out
    finally:
        server.terminate()
        server.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=300, help="timed calls per case")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--stem", default="hop-latency")
    p.add_argument("--serve", choices=("bare", "inferline"), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        asyncio.run(_serve(args.serve, args.port))
        return 0
    results = {kind: measure(kind, args.calls) for kind in ("bare", "inferline")}
    arguments = argv if argv is not None else sys.argv[1:]
    meta = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python bench/hop_latency.py", *arguments]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {_cpu()}",
        "grpcio": grpc.__version__,
        "calls": args.calls,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    lines = [
        f"# One gRPC hop between two local processes ({meta['date']})",
        "",
        f"Command: `{meta['command']}` on {meta['machine']}; grpcio {meta['grpcio']}; "
        f"{args.calls} unary health Checks per case over loopback, p50 (p90) ms.",
        "",
        "| server and client | " + " | ".join(f"gap {gap:g} ms" for gap in GAPS_MS) + " |",
        "|---|" + "---:|" * len(GAPS_MS),
    ]
    labels = {"bare": "bare grpc.aio", "inferline": "inferline's bootstrap and channel (interceptors)"}
    for kind, by_gap in results.items():
        cells = [f"{v['p50_ms']:.2f} ({v['p90_ms']:.2f})" for v in by_gap.values()]
        lines.append(f"| {labels[kind]} | " + " | ".join(cells) + " |")
    (args.out / f"{args.stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    raise SystemExit(main())
