"""The embedded default: all four stages (and, for `inferline up`, the HTTP gateway) as local
processes, started and stopped together."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferline.common.settings import GATEWAY, STAGES, Settings

log = logging.getLogger(__name__)

# Start order: the controller last, so it is reachable only once the stages are.
START_ORDER = ("preprocess", "inference", "postprocess", "controller")
# `inferline up`: the gateway after the controller, whose readiness its /readyz reports.
UP_ORDER = (*START_ORDER, GATEWAY)


def _terminate_with_parent() -> None:
    """In the child, before exec: SIGTERM it when the parent dies, even by SIGKILL, so a killed
    `inferline up` leaves no stage behind holding its port."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def wait_serving(target: str, timeout: float, alive: callable = lambda: True) -> None:
    """Blocks until the server at ``target`` reports SERVING on the standard health service."""
    expires = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if not alive():
                raise RuntimeError(f"the server for {target} exited while starting")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > expires:
                raise TimeoutError(f"{target} did not become SERVING within {timeout:.0f} s")
            time.sleep(0.1)


def wait_http_ready(url: str, timeout: float, alive: callable = lambda: True) -> None:
    """Blocks until ``url`` (the gateway's /readyz) answers 200."""
    expires = time.monotonic() + timeout
    while True:
        if not alive():
            raise RuntimeError(f"the server for {url} exited while starting")
        try:
            with urllib.request.urlopen(url, timeout=2.0) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > expires:
            raise TimeoutError(f"{url} did not answer 200 within {timeout:.0f} s")
        time.sleep(0.1)


def _wait_ready(stage: str, port: int, timeout: float, alive: callable) -> None:
    if stage == GATEWAY:
        wait_http_ready(f"http://localhost:{port}/readyz", timeout, alive)
    else:
        wait_serving(f"localhost:{port}", timeout, alive)


@dataclass
class LocalStack:
    """Four ``inferline serve`` child processes sharing one environment."""

    settings: Settings
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    stages: Sequence[str] = START_ORDER
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def controller_target(self) -> str:
        return f"localhost:{self.settings.port('controller')}"

    def start(self, timeout: float = 180.0) -> None:
        for stage in self.stages:
            if stage not in (*STAGES, GATEWAY):
                raise ValueError(f"unknown stage {stage!r}")
            self.processes[stage] = subprocess.Popen(
                [sys.executable, "-m", "inferline.services.cli", "serve", stage],
                env=dict(self.env),
                preexec_fn=_terminate_with_parent if sys.platform == "linux" else None,
            )
        try:
            for stage in self.stages:
                process = self.processes[stage]
                try:
                    _wait_ready(stage, self.settings.port(stage), timeout, alive=lambda p=process: p.poll() is None)
                except RuntimeError:
                    raise RuntimeError(f"the {stage} stage exited while starting; its log above says why") from None
        except BaseException:
            self.stop()
            raise

    def stop(self) -> dict[str, int]:
        """SIGTERM to every stage (each drains its calls), then wait; returns exit codes."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = {}
        for stage, process in self.processes.items():
            try:
                codes[stage] = process.wait(timeout=self.settings.grace_period_s + 10)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time; killing it", stage)
                process.kill()
                codes[stage] = process.wait()
        self.processes.clear()
        return codes

    def exited(self) -> str | None:
        """The first stage whose process has ended, if any."""
        for stage, process in self.processes.items():
            if process.poll() is not None:
                return stage
        return None

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with every stage and the gateway on a port the OS says is free now.

    For a second stack beside a running one (tests, benchmarks); another process may take a
    port between this call and the bind, which then fails with a clear error.
    """
    sockets = [socket.socket() for _ in (*STAGES, GATEWAY)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        ports = [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
    result = dict(os.environ if env is None else env)
    for stage, port in zip(STAGES, ports):
        result[f"INFERLINE_{stage.upper()}_PORT"] = str(port)
        result[f"INFERLINE_{stage.upper()}_TARGET"] = f"localhost:{port}"
    result["INFERLINE_GATEWAY_PORT"] = str(ports[-1])
    for stage in STAGES:  # metrics on free ports too, so a second stack does not clash on 9101-9104
        result[f"INFERLINE_{stage.upper()}_METRICS_PORT"] = "0"
    return result
