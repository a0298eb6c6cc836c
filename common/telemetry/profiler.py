"""PyTorch profiler traces of the next N forward passes of a model, on request.

Off unless ``INFERLINE_PROFILING=true``, and then answered only on this host (the metrics port
it shares is scraped from anywhere): profiling slows the passes it captures and writes files, so
nobody else may arm it. ``POST /debug/profile?batches=N[&model=NAME][&timeout=S]`` on the
inference stage's metrics port (or ``inferline profile``) arms it; the model's thread that runs
the next pass starts the profiler and stops it after its N-th pass, so the trace holds exactly
those passes and nothing else pays for it (with several instances of a model, the passes of one
instance). The answer names the Chrome trace file (open in Perfetto or chrome://tracing).
torch is imported only when a capture runs: the other stages never load it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from inferline.common.errors import InvalidInput
from inferline.common.telemetry.metrics import Route, loopback_only, reply

log = logging.getLogger(__name__)

MAX_BATCHES = 1000


class Capture:
    def __init__(self, batches: int, model: str | None, out_dir: Path):
        self.batches = batches
        self.model = model
        self.out_dir = out_dir
        self.seen = 0
        self.path: Path | None = None
        self.error: str | None = None
        self.done = threading.Event()
        self._profile: Any = None
        self._thread: int | None = None  # the profiler starts and stops on one thread


class BatchProfiler:
    """At most one capture at a time; ``around`` is called on the model's thread per pass."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._capture: Capture | None = None

    def arm(self, batches: int, model: str | None, out_dir: Path) -> Capture:
        if not 1 <= batches <= MAX_BATCHES:
            raise InvalidInput(f"batches must be between 1 and {MAX_BATCHES}, got {batches}")
        with self._lock:
            if self._capture is not None and not self._capture.done.is_set():
                raise InvalidInput("a profile capture is already running; wait for it to finish")
            self._capture = Capture(batches, model, out_dir)
            return self._capture

    def cancel(self, capture: Capture) -> None:
        """Gives up a capture that timed out: a started one is written after the next pass."""
        with self._lock:
            if capture._profile is None:
                capture.done.set()
            else:
                capture.batches = capture.seen

    def around(self, model: str, fn: Callable[[list[Any]], list[Any]], items: list[Any]) -> list[Any]:
        capture = self._capture
        if capture is None or capture.done.is_set() or capture.model not in (None, model):
            return fn(items)
        with self._lock:
            if capture.model is None:
                capture.model = model  # the first model to run owns the capture
            if capture.model != model or capture._thread not in (None, threading.get_ident()):
                return fn(items)  # another model, or another instance's thread of this one
            if capture._profile is None:
                capture._profile = _start_profiler()
                capture._thread = threading.get_ident()
        try:
            return fn(items)
        finally:
            capture.seen += 1
            if capture.seen >= capture.batches:
                self._finish(capture)

    def _finish(self, capture: Capture) -> None:
        try:
            capture._profile.stop()
            capture.out_dir.mkdir(parents=True, exist_ok=True)
            path = capture.out_dir / f"torch-{capture.model}-{time.strftime('%Y%m%dT%H%M%S')}-{capture.batches}b.json"
            capture._profile.export_chrome_trace(str(path))
            capture.path = path.resolve()
            log.info("profiler trace of %d batches of %s written to %s", capture.batches, capture.model, capture.path)
        except Exception as exc:  # a failed export must not fail the batch
            capture.error = f"could not write the profiler trace: {exc}"
            log.exception("profiler export failed")
        finally:
            capture.done.set()


def _start_profiler() -> Any:
    import torch  # noqa: PLC0415 - torch only where a profile is asked for

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profile = torch.profiler.profile(activities=activities, record_shapes=True)
    profile.start()
    return profile


PROFILER = BatchProfiler()


def profile_route(out_dir: Path, *, enabled: bool, profiler: BatchProfiler = PROFILER) -> dict[tuple[str, str], Route]:
    """The HTTP route that arms a capture and answers when it is written (or times out), to
    callers on this host; when profiling is off, one that says how to turn it on and arms nothing."""

    def disabled(handler: Any) -> None:
        _json(handler, 404, {"error": "profiling is off on this stage; start it with INFERLINE_PROFILING=true "
                                      "(the endpoint then answers on this host only)"})

    def handle(handler: Any) -> None:
        query = parse_qs(urlsplit(handler.path).query)
        try:
            batches = int(query.get("batches", ["10"])[0])
            timeout = float(query.get("timeout", ["120"])[0])
            capture = profiler.arm(batches, query.get("model", [None])[0], out_dir)
        except (ValueError, InvalidInput) as exc:
            _json(handler, 400, {"error": str(exc), "usage": "POST /debug/profile?batches=N[&model=NAME][&timeout=S]"})
            return
        if not capture.done.wait(timeout):
            profiler.cancel(capture)
            _json(handler, 504, {"error": f"only {capture.seen} of {batches} batches ran within {timeout:g} s; "
                                 "send traffic while profiling, or raise timeout", "batches_seen": capture.seen})
            return
        if capture.error:
            _json(handler, 500, {"error": capture.error})
            return
        _json(handler, 200, {"trace": str(capture.path), "model": capture.model, "batches": capture.batches})

    return {("POST", "/debug/profile"): loopback_only(handle) if enabled else disabled}


def _json(handler: Any, status: int, body: dict[str, Any]) -> None:
    reply(handler, status, "application/json", json.dumps(body).encode())
