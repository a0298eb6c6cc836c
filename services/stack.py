"""The embedded default: all four stages (and, for `inferline up`, the HTTP gateway) as local
processes, started and stopped together.

Supervised (as `inferline up` runs it), the stack restarts a process that exits while the stack
is not stopping, whatever the reason (a crash, kill -9, a SIGTERM from outside), as Kubernetes'
``restartPolicy: Always`` would, with an exponential backoff that resets once the process has
stayed up a while. A stage can run as several copies (replicas) on ports of their own; every
caller of the stage is then pointed at all of them, so a copy that dies loses no call.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferline.common.channels import create_blocking_channel
from inferline.common.errors import ConfigError
from inferline.common.settings import CONTROLLER, GATEWAY, PIPELINE_STAGES, STAGES, Settings

log = logging.getLogger(__name__)

# Start order: the controller last, so it is reachable only once the stages are.
START_ORDER = (*PIPELINE_STAGES, CONTROLLER)
# `inferline up`: the gateway after the controller, whose readiness its /readyz reports.
UP_ORDER = (*START_ORDER, GATEWAY)
# Stop order: callers before what they call.
STOP_TIERS = ((GATEWAY,), (CONTROLLER,), PIPELINE_STAGES)


def wait_serving(
    target: str, timeout: float, alive: Callable[[], bool] = lambda: True, settings: Settings | None = None
) -> None:
    """Blocks until the server at ``target`` reports SERVING on the standard health service
    (over TLS when ``settings`` name a CA, as the stages' own channels are)."""
    expires = time.monotonic() + timeout
    with create_blocking_channel(target, settings or Settings(), health_service=None) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if not alive():
                raise RuntimeError(f"the server for {target} exited while starting")
            try:
                reply = stub.Check(  # type: ignore[attr-defined]  # stubs list no methods
                    health_pb2.HealthCheckRequest(service=""), timeout=1.0
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > expires:
                raise TimeoutError(f"{target} did not become SERVING within {timeout:.0f} s")
            time.sleep(0.1)


def wait_http_ready(url: str, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Blocks until ``url`` (the gateway's /readyz) answers 200."""
    expires = time.monotonic() + timeout
    while True:
        if not alive():
            raise RuntimeError(f"the server for {url} exited while starting")
        try:
            with urllib.request.urlopen(url, timeout=2.0) as reply:  # noqa: S310 - our own http:// URL
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > expires:
            raise TimeoutError(f"{url} did not answer 200 within {timeout:.0f} s")
        time.sleep(0.1)


def _wait_ready(stage: str, port: int, timeout: float, alive: Callable[[], bool], settings: Settings) -> None:
    if stage == GATEWAY:
        wait_http_ready(f"http://localhost:{port}/readyz", timeout, alive)
    else:
        wait_serving(f"localhost:{port}", timeout, alive, settings)


@dataclass(frozen=True)
class Backoff:
    """Delays between restarts of a process that keeps exiting: ``initial`` doubling up to
    ``maximum``; a process that stayed up ``reset_after`` seconds starts again from ``initial``
    (so a stage that crashes once a day restarts at once, a crash loop does not spin)."""

    initial: float
    maximum: float
    reset_after: float

    def delay(self, restarts: int, uptime: float) -> tuple[float, int]:
        """The wait before the next restart, and the count of consecutive restarts after it,
        given the consecutive ``restarts`` so far and how long the process was up."""
        if uptime >= self.reset_after:
            restarts = 0
        return min(self.maximum, self.initial * 2**restarts), restarts + 1

    @classmethod
    def from_settings(cls, settings: Settings) -> Backoff:
        return cls(settings.restart_backoff_s, settings.restart_max_backoff_s, settings.restart_reset_after_s)


def _target_of(ports: Sequence[int]) -> str:
    """A caller's address for a stage's copies on this host: one port as ``localhost:P``,
    several as the comma-separated list that ``common/channels.py`` balances over."""
    if len(ports) == 1:
        return f"localhost:{ports[0]}"
    return ",".join(f"127.0.0.1:{port}" for port in ports)


def parse_replicas(specs: Sequence[str]) -> dict[str, int]:
    """``["inference=2", "postprocess=3"]`` -> ``{"inference": 2, "postprocess": 3}``."""
    replicas: dict[str, int] = {}
    for spec in specs:
        stage, sep, count = spec.partition("=")
        stage = stage.strip()
        if not sep or stage not in STAGES or not count.strip().isdigit() or int(count) < 1:
            raise ConfigError(f"--replicas {spec!r}: expected STAGE=N with N >= 1 and STAGE one of {', '.join(STAGES)}")
        replicas[stage] = int(count)
    return replicas


@dataclass
class _Child:
    """One process of the stack: a stage's copy (or the gateway) on its own port."""

    stage: str
    port: int
    env: dict[str, str]
    process: subprocess.Popen | None = None
    started: float = 0.0
    restarts: int = 0
    # Restarts since it last stayed up long enough to reset the backoff.
    consecutive: int = 0
    # When the supervisor restarts it (monotonic time), once it has seen it exit.
    restart_at: float | None = None

    def spawn(self) -> subprocess.Popen[bytes]:
        # No preexec_fn: forking Python code in a process with gRPC threads can crash the child;
        # the child arms its own parent-death signal (cli/serve.py, --exit-with-parent).
        command = [
            sys.executable,
            "-m",
            "inferline.services.cli",
            "serve",
            self.stage,
            "--exit-with-parent",
            str(os.getpid()),
        ]
        if self.stage != GATEWAY:
            command += ["--port", str(self.port)]
        self.process = process = subprocess.Popen(command, env=self.env)
        self.started = time.monotonic()
        return process


@dataclass
class LocalStack:
    """Four ``inferline serve`` child processes sharing one environment.

    ``replicas`` runs that many copies of a stage: the first on the stage's configured ports,
    the others on free ones; ``processes`` names them ``stage``, ``stage#2``, ... With
    ``supervise`` a process that exits is restarted (module docstring) until ``stop``.
    """

    settings: Settings
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    stages: Sequence[str] = START_ORDER
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    replicas: Mapping[str, int] = field(default_factory=dict)
    supervise: bool = False
    # Restarts so far, by process name (what `inferline up` logs and the tests read).
    restarts: dict[str, int] = field(default_factory=dict)
    _children: dict[str, _Child] = field(default_factory=dict)
    _stopping: threading.Event = field(default_factory=threading.Event)
    # The supervisor has made its last restart / may end (its children are stopped).
    _idle: threading.Event = field(default_factory=threading.Event)
    _stopped: threading.Event = field(default_factory=threading.Event)
    _supervisor: threading.Thread | None = None

    @property
    def controller_target(self) -> str:
        return self.target(CONTROLLER)

    def target(self, stage: str) -> str:
        """The stage's address for a caller: comma-separated when it runs as several copies."""
        ports = [c.port for c in self._children.values() if c.stage == stage] or [self.settings.port(stage)]
        return _target_of(ports)

    def address(self, name: str) -> str:
        """Where one process (``inference``, ``inference#2``) listens."""
        return f"localhost:{self._children[name].port}"

    def start(self, timeout: float = 180.0) -> None:
        for stage in self.stages:
            if stage not in (*STAGES, GATEWAY):
                raise ValueError(f"unknown stage {stage!r}")
        self._plan()
        for child in self._children.values():
            child.spawn()
        self._publish()
        try:
            for child in self._children.values():
                try:
                    # Any process that ends before the whole stack is up fails the start (no
                    # supervision yet: a stage that cannot start would only crash-loop).
                    _wait_ready(child.stage, child.port, timeout, lambda: self.exited() is None, self.settings)
                except RuntimeError:
                    raise RuntimeError(
                        f"the {self.exited()} stage exited while starting; its log above says why"
                    ) from None
        except BaseException:
            self.stop()
            raise
        if self.supervise:
            self._supervisor = threading.Thread(target=self._supervise, name="inferline-supervisor", daemon=True)
            self._supervisor.start()

    def _plan(self) -> None:
        """Ports and environment of every process; callers of a replicated stage get all its copies."""
        env = dict(self.env)
        copies: dict[str, list[int]] = {}
        for stage in self.stages:
            count = self.replicas.get(stage, 1) if stage != GATEWAY else 1
            copies[stage] = [self.settings.port(stage), *free_ports(count - 1)]
            if count > 1:
                env[f"INFERLINE_{stage.upper()}_TARGET"] = _target_of(copies[stage])
        for stage, ports in copies.items():
            for i, port in enumerate(ports):
                child_env = dict(env)
                if i > 0:  # the first copy keeps the configured metrics port, the others pick free ones
                    child_env[f"INFERLINE_{stage.upper()}_METRICS_PORT"] = "0"
                self._children[stage if i == 0 else f"{stage}#{i + 1}"] = _Child(stage, port, child_env)

    def _publish(self) -> None:
        self.processes.clear()
        self.processes.update({name: c.process for name, c in self._children.items() if c.process is not None})
        self.restarts.update({name: c.restarts for name, c in self._children.items()})

    def _supervise(self) -> None:
        """Restarts what exits, each after its backoff, until the stack stops.

        The thread outlives the processes it started: their parent-death signal is bound to
        it, and must not fire before ``stop`` has stopped them in order."""
        backoff = Backoff.from_settings(self.settings)
        while not self._stopping.wait(0.1):
            now = time.monotonic()
            for name, child in self._children.items():
                code = child.process.poll() if child.process is not None else None
                if code is not None and child.restart_at is None:
                    delay, child.consecutive = backoff.delay(child.consecutive, now - child.started)
                    child.restarts += 1
                    child.restart_at = now + delay
                    how = f"signal {-code}" if code < 0 else f"code {code}"
                    log.error("%s exited unexpectedly (%s) after %.1f s; restarting it in %.1f s (restart %d)",
                              name, how, now - child.started, delay, child.restarts)
                elif child.restart_at is not None and now >= child.restart_at:
                    child.restart_at = None
                    process = child.spawn()
                    log.warning("%s restarted (pid %d)", name, process.pid)
                    self._publish()
        self._idle.set()
        self._stopped.wait()

    def exited(self) -> str | None:
        """The first process that has ended, if any (unsupervised stacks: a benchmark's check)."""
        for name, process in self.processes.items():
            if process.poll() is not None:
                return name
        return None

    def stop(self) -> dict[str, int]:
        """SIGTERM to every process (each drains its calls), callers first: the gateway, then
        the controller, then the stages, each tier once the one before has exited, so the
        calls a controller still completes find its stages up. Returns exit codes."""
        self._stopping.set()
        if self._supervisor is not None:
            self._idle.wait()
        codes = {}
        for tier in STOP_TIERS:
            names = [name for name, child in self._children.items() if child.stage in tier and name in self.processes]
            for name in names:
                if self.processes[name].poll() is None:
                    self.processes[name].send_signal(signal.SIGTERM)
            for name in names:
                codes[name] = self._wait_stopped(name, self.processes[name])
        self._stopped.set()
        if self._supervisor is not None:
            self._supervisor.join()
        self.processes.clear()
        self._children.clear()
        return codes

    def _wait_stopped(self, name: str, process: subprocess.Popen) -> int:
        try:
            return process.wait(timeout=self.settings.drain_delay_s + self.settings.grace_period_s + 10)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in time; killing it", name)
            process.kill()
            return process.wait()

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_ports(count: int) -> list[int]:
    """Ports the OS says are free now (another process may take one before it is bound, which
    then fails with a clear error)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with every stage and the gateway on a port the OS says is free now.

    For a second stack beside a running one (tests, benchmarks).
    """
    ports = free_ports(len(STAGES) + 1)
    result = dict(os.environ if env is None else env)
    for stage, port in zip(STAGES, ports, strict=False):
        result[f"INFERLINE_{stage.upper()}_PORT"] = str(port)
        result[f"INFERLINE_{stage.upper()}_TARGET"] = f"localhost:{port}"
    result["INFERLINE_GATEWAY_PORT"] = str(ports[-1])
    for stage in STAGES:  # metrics on free ports too, so a second stack does not clash on 9101-9104
        result[f"INFERLINE_{stage.upper()}_METRICS_PORT"] = "0"
    return result
