"""``inferline bench``: an async load generator for a running stack, and what it measures.

N workers share one ``AsyncClient`` (one grpc.aio channel) to the controller, each sending its
next request as soon as its previous one answered (closed loop, so concurrency is exactly N).
Requests cycle through the given images, ``batch`` images per request. The first ``warmup``
seconds are not counted; of the ``duration`` seconds after them, every request that completes
inside that window is (a request sent during the warm-up but answered inside the window counts,
so long batches are not lost to short windows; no new request starts after the window): latency
per request, images answered, errors (an RPC that failed counts each of its images; an image
whose own status failed counts once), and the per-stage ``timings_ms`` each answer carries.
``img_per_s`` is goodput: images answered OK per second. Calls are counted by status, and the
latency of OK calls and of refusals (RESOURCE_EXHAUSTED) is reported apart, since a server under
overload answers both and they must not blur. With ``honour_retry`` a worker refused with a
``RetryInfo`` hint sleeps that long before its next call, as gRPC's retry pushback does; without
it, it sends again at once (the worst client). Peak resident memory (``VmHWM``) is read from
/proc for the stages this host runs, found by their ``inferline serve <stage>`` command lines
unless pids are given.

The JSON form (``--json``) is one object, stable for scripts::

    {"img_per_s": .., "p50_ms": .., "p95_ms": .., "p99_ms": .., "errors": .., "rss_mb": {stage: MB},
     "calls": {code: n}, "ok_ms": {"p50": .., ..}, "refused_ms": {"p50": .., ..},
     "stages_ms": {"preprocess": {"mean": .., "p50": ..}, .., "total": .., "client": ..}, ...}
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inferline.common.api import DetectRequest, DetectResult, EmbedRequest, EmbedResult, ImageInput
from inferline.common.errors import InferlineError
from inferline.common.settings import GATEWAY, STAGES, Settings
from inferline.common.status import status_for
from inferline.common.tasks import tasks_for
from inferline.services.client import AsyncClient

STAGE_NAMES = (*STAGES, GATEWAY)
REFUSED = "RESOURCE_EXHAUSTED"


@dataclass
class Sample:
    finished: float  # perf_counter at completion
    latency_s: float
    images: int
    failed_images: int
    code: str  # gRPC status name of the call
    image_codes: tuple[str, ...] = ()  # status names of the images that failed in an OK call
    timings_ms: dict[str, float] = field(default_factory=dict)  # the answer's per-stage times (OK calls)


@dataclass
class BenchResult:
    model: str
    operation: str
    concurrency: int
    batch: int
    duration_s: float
    samples: list[Sample] = field(default_factory=list)
    honour_retry: bool = False
    # Refusals that carried a RetryInfo hint (all of them, when the server behaves).
    hinted: int = 0
    rss_mb: dict[str, float] = field(default_factory=dict)
    # CPU seconds (user + system) each stage process spent inside the measured window.
    cpu_s: dict[str, float] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return len(self.samples)

    @property
    def images_ok(self) -> int:
        return sum(s.images - s.failed_images for s in self.samples if s.code == "OK")

    @property
    def errors(self) -> int:
        return sum(s.images if s.code != "OK" else s.failed_images for s in self.samples)

    def percentile_ms(self, q: float, code: str | None = None) -> float:
        """Latency percentile of every call, or of the calls that ended with ``code``."""
        latencies = [s.latency_s for s in self.samples if code is None or s.code == code]
        if not latencies:
            return float("nan")
        return float(np.percentile(latencies, q) * 1000)

    def latency_ms(self, code: str) -> dict[str, float]:
        return {f"p{q}": round(self.percentile_ms(q, code), 2) for q in (50, 95, 99)} if self.calls.get(code) else {}

    @property
    def calls(self) -> dict[str, int]:
        return dict(Counter(s.code for s in self.samples))

    def stages_ms(self) -> dict[str, dict[str, float]]:
        """Mean and median of each stage's time per OK call, as the controller timed it (its call
        to the stage: the hop and (de)serialisation included; ``total``: its whole handler), and
        the client's latency (``client``). ``client`` - ``total`` is the hop to the controller
        and the wait before its handler runs: what a boundary costs, next to the stages' times."""
        ok = [s for s in self.samples if s.code == "OK"]
        if not ok:
            return {}
        keys = sorted({key for s in ok for key in s.timings_ms})
        columns = {key: [s.timings_ms.get(key, 0.0) for s in ok] for key in keys}
        columns["client"] = [s.latency_s * 1000 for s in ok]
        return {
            key: {"mean": round(float(np.mean(values)), 2), "p50": round(float(np.median(values)), 2)}
            for key, values in columns.items()
        }

    @property
    def failed_image_codes(self) -> dict[str, int]:
        """Images that failed on their own inside OK calls, by status."""
        return dict(Counter(code for s in self.samples for code in s.image_codes))

    def to_dict(self) -> dict[str, Any]:
        codes = Counter(s.code for s in self.samples if s.code != "OK")
        return {
            "img_per_s": round(self.images_ok / self.duration_s, 2),
            "p50_ms": round(self.percentile_ms(50), 2),
            "p95_ms": round(self.percentile_ms(95), 2),
            "p99_ms": round(self.percentile_ms(99), 2),
            "errors": self.errors,
            "rss_mb": self.rss_mb,
            "model": self.model,
            "operation": self.operation,
            "concurrency": self.concurrency,
            "batch": self.batch,
            "duration_s": self.duration_s,
            "requests": self.requests,
            "images": self.images_ok,
            "error_codes": dict(codes),
            "calls": self.calls,
            "failed_images_in_ok_calls": self.failed_image_codes,
            "ok_ms": self.latency_ms("OK"),
            "refused_ms": self.latency_ms(REFUSED),
            "refusals_with_retry_hint": self.hinted,
            "honour_retry": self.honour_retry,
            "stages_ms": self.stages_ms(),
            # What each stage costs per answered image, whatever else shares the machine: the
            # per-stage breakdown that says where a CPU-bound pipeline's time goes.
            "cpu_ms_per_image": {
                stage: round(seconds * 1000 / self.images_ok, 2) for stage, seconds in self.cpu_s.items()
            } if self.images_ok else {},
        }

    def to_text(self) -> str:
        d = self.to_dict()
        lines = [
            f"{self.operation} {self.model}: concurrency {self.concurrency}, {self.batch} image(s)/request, "
            f"{self.duration_s:.0f} s measured",
            f"  throughput   {d['img_per_s']:.1f} images/s ({d['requests']} requests, {d['images']} images)",
            f"  latency      p50 {d['p50_ms']:.1f} ms   p95 {d['p95_ms']:.1f} ms   p99 {d['p99_ms']:.1f} ms",
            f"  errors       {d['errors']}" + (f" {d['error_codes']}" if d["error_codes"] else ""),
        ]
        if d["ok_ms"]:
            lines.append("  OK latency   " + "   ".join(f"{k} {v:.1f} ms" for k, v in d["ok_ms"].items()))
        if d["refused_ms"]:
            lines.append(
                "  refusals     " + "   ".join(f"{k} {v:.1f} ms" for k, v in d["refused_ms"].items())
                + f"   ({self.hinted} with a retry hint" + (", honoured)" if self.honour_retry else ")")
            )
        if self.rss_mb:
            lines.append("  peak RSS     " + "   ".join(f"{k} {v:.0f} MB" for k, v in self.rss_mb.items()))
        if d["cpu_ms_per_image"]:
            lines.append("  CPU/image    " + "   ".join(f"{k} {v:.1f} ms" for k, v in d["cpu_ms_per_image"].items()))
        if d["stages_ms"]:
            lines.append("  stages p50   " + "   ".join(f"{k} {v['p50']:.1f} ms" for k, v in d["stages_ms"].items()))
        return "\n".join(lines)


# ---- requests ------------------------------------------------------------------------------

def build_requests(
    model: str, task: str, images: Sequence[Path], batch: int
) -> tuple[str, list[DetectRequest | EmbedRequest]]:
    """One request per ``batch`` consecutive images, cycling so every request is full: Detect for a
    model that Detect serves (detect, segment), Embed for one that Embed serves."""
    operation = next((op for op in ("Detect", "Embed") if task in tasks_for(op)), None)
    if operation is None:
        raise ValueError(
            f"model {model!r} is a {task!r} model; inferline bench drives models that Detect or Embed serve"
        )
    if not images:
        raise ValueError("no images to send")
    encoded = [ImageInput(p.read_bytes(), p.name) for p in images]
    count = max(1, len(encoded) // batch)
    ring = itertools.cycle(encoded)
    groups = [tuple(next(ring) for _ in range(batch)) for _ in range(count)]
    if operation == "Detect":
        return "Detect", [DetectRequest(model, g) for g in groups]
    return "Embed", [EmbedRequest(model, g) for g in groups]


def code_of(error: Exception | None) -> str:
    """The gRPC status name of an outcome ("OK" for none), by the one status table."""
    return "OK" if error is None else status_for(error)[0].name


def _failed_images(result: DetectResult | EmbedResult) -> tuple[str, ...]:
    """The status names of the images of an OK call that failed on their own."""
    items = result.images
    return tuple(code_of(item.error) for item in items if item.error is not None)


# ---- the load ------------------------------------------------------------------------------


async def drive(
    target: str,
    model: str,
    images: Sequence[Path],
    *,
    concurrency: int,
    duration: float,
    batch: int = 1,
    warmup: float = 2.0,
    timeout: float = 30.0,
    honour_retry: bool = False,
    pids: Mapping[str, int] | None = None,
    settings: Settings | None = None,
) -> BenchResult:
    """``settings``: the client's channel settings (TLS, message limit); default plaintext."""
    if concurrency < 1 or batch < 1 or duration <= 0 or warmup < 0:
        raise ValueError("concurrency and batch must be >= 1, duration > 0, warmup >= 0")
    async with AsyncClient(target, settings or Settings()) as client:
        info = await client.model(model, timeout=timeout)
        operation, requests = build_requests(model, info.task, images, batch)
        call = client.detect if operation == "Detect" else client.embed
        result = BenchResult(model, operation, concurrency, batch, duration, honour_retry=honour_retry)
        counter = itertools.count()
        started = time.perf_counter()
        window = (started + warmup, started + warmup + duration)

        async def worker() -> None:
            while True:
                sent = time.perf_counter()
                if sent >= window[1]:
                    return
                request = requests[next(counter) % len(requests)]
                hint = None
                image_codes: tuple[str, ...] = ()
                timings: dict[str, float] = {}
                try:
                    response = await call(request, timeout=timeout)  # type: ignore[arg-type]
                    code = "OK"
                    image_codes = _failed_images(response)
                    failed = len(image_codes)
                    timings = response.timings_ms
                except InferlineError as exc:
                    code, failed = code_of(exc), batch
                    hint = exc.retry_after_s if code == REFUSED else None
                done = time.perf_counter()
                if window[0] <= done <= window[1]:
                    result.samples.append(Sample(done, done - sent, batch, failed, code, image_codes, timings))
                    result.hinted += hint is not None
                if hint is not None and honour_retry:
                    await asyncio.sleep(min(hint, max(0.0, window[1] - done)))

        async def cpu_meter() -> None:
            await asyncio.sleep(max(0.0, window[0] - time.perf_counter()))
            before = cpu_seconds(pids or {})
            await asyncio.sleep(max(0.0, window[1] - time.perf_counter()))
            after = cpu_seconds(pids or {})
            result.cpu_s = {stage: round(after[stage] - before[stage], 3) for stage in after if stage in before}

        await asyncio.gather(cpu_meter(), *(worker() for _ in range(concurrency)))
    return result


# ---- memory of the stages ------------------------------------------------------------------


def find_stage_pids(proc: Path = Path("/proc")) -> dict[str, int]:
    """Stages running on this host, from their command lines (``inferline serve <stage>`` or
    ``-m inferline.services.cli serve <stage>``); the newest process wins when there are several."""
    found: dict[str, int] = {}
    for entry in sorted(proc.glob("[0-9]*"), key=lambda p: int(p.name)):
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv if a]
        if "serve" not in words or not any("inferline" in w for w in words[:3]):
            continue
        position = words.index("serve")
        if position + 1 < len(words) and words[position + 1] in STAGE_NAMES:
            found[words[position + 1]] = int(entry.name)
    return found


def peak_rss_mb(pid: int, proc: Path = Path("/proc")) -> float | None:
    """The process's high-water resident set size (VmHWM), in MiB; None once it is gone."""
    try:
        for line in (proc / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_seconds(pids: Mapping[str, int], proc: Path = Path("/proc")) -> dict[str, float]:
    """User + system CPU seconds each process has used so far (all its threads)."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    used = {}
    for stage, pid in pids.items():
        try:
            fields = (proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
            used[stage] = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14, 15)
        except (OSError, IndexError, ValueError):
            continue
    return used


def stage_memory(pids: Mapping[str, int]) -> dict[str, float]:
    memory = {}
    for stage, pid in pids.items():
        rss = peak_rss_mb(pid)
        if rss is not None:
            memory[stage] = round(rss, 1)
    return memory


def parse_pids(raw: Sequence[str]) -> dict[str, int]:
    pids = {}
    for item in raw:
        stage, _, pid = item.partition("=")
        if not pid.isdigit():
            raise ValueError(f"--pid takes STAGE=PID, got {item!r}")
        pids[stage] = int(pid)
    return pids


def run(
    target: str, model: str, images: Sequence[Path], *, pids: Mapping[str, int] | None = None, **load: Any
) -> BenchResult:
    """``drive`` to completion (``load``: its keyword arguments), then the stages' peak memory;
    without ``pids``, the stages are looked up on this host."""
    if pids is None:
        pids = find_stage_pids() if os.path.isdir("/proc") else {}
    result = asyncio.run(drive(target, model, images, pids=pids, **load))
    result.rss_mb = stage_memory(pids)
    return result
