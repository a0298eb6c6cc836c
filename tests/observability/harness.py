"""What the observability tests run for real: the four stages as processes (logs kept), an
OTLP/gRPC receiver, Prometheus, Alertmanager and a webhook receiver.

bench/monitoring_load.py uses the same pieces to draw the dashboard picture in docs/.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from inferline.common.settings import STAGES
from inferline.services.stack import START_ORDER, free_ports, wait_serving

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "inferline.rules.yaml"
RULE_TESTS = DEPLOY / "prometheus" / "rules" / "inferline.rules.test.yaml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "inferline.json"
ALERTMANAGER_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
# Where docs/monitoring.md is published; every alert's runbook_url is this plus its section's anchor.
RUNBOOK_BASE_URL = "https://inferline.github.io/inferline/monitoring/"


def wait_for(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.25) -> Any:
    """Polls ``condition`` until it returns something truthy; the failure says what never came."""
    expires = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > expires:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


# ---- the stages -------------------------------------------------------------------------


@dataclass
class Stages:
    """The four ``inferline serve`` processes on free gRPC and metrics ports, stderr to files."""

    env: dict[str, str]
    log_dir: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @classmethod
    def start(cls, base_env: Mapping[str, str], log_dir: Path, timeout: float = 180) -> Stages:
        grpc_ports, metrics_ports = free_ports(4), free_ports(4)
        env = dict(base_env)
        for stage, port, metrics in zip(STAGES, grpc_ports, metrics_ports, strict=True):
            env[f"INFERLINE_{stage.upper()}_PORT"] = str(port)
            env[f"INFERLINE_{stage.upper()}_TARGET"] = f"localhost:{port}"
            env[f"INFERLINE_{stage.upper()}_METRICS_PORT"] = str(metrics)
        env.setdefault("INFERLINE_HOST", "127.0.0.1")
        stages = cls(env, log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for stage in START_ORDER:
                stages.processes[stage] = subprocess.Popen(
                    [sys.executable, "-m", "inferline.services.cli", "serve", stage],
                    env=env, stderr=(log_dir / f"{stage}.log").open("w"), stdout=subprocess.DEVNULL,
                )
            for stage in START_ORDER:
                process = stages.processes[stage]
                try:
                    wait_serving(stages.target(stage), timeout, alive=lambda p=process: p.poll() is None)
                except RuntimeError:
                    raise AssertionError(f"{stage} exited while starting:\n{stages.log(stage)}") from None
        except BaseException:
            stages.stop()
            raise
        return stages

    def target(self, stage: str) -> str:
        return f"localhost:{self.env[f'INFERLINE_{stage.upper()}_PORT']}"

    def metrics_target(self, stage: str) -> str:
        return f"localhost:{self.env[f'INFERLINE_{stage.upper()}_METRICS_PORT']}"

    def log(self, stage: str) -> str:
        return (self.log_dir / f"{stage}.log").read_text()

    def kill(self, stage: str) -> None:
        process = self.processes[stage]
        process.kill()
        process.wait(10)

    def stop(self) -> None:
        """SIGTERM (each stage drains and flushes its spans), then wait."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# ---- OTLP ---------------------------------------------------------------------------------


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace endpoint that keeps every span it is sent, with its service.name."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def Export(self, request, context):  # noqa: N802 - the generated servicer's name
        self.keep(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def keep(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self._lock:
            for resource_spans in request.resource_spans:
                attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append({
                            "service": attributes.get("service.name", ""),
                            "name": span.name,
                            "kind": span.kind,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent": span.parent_span_id.hex(),
                            "status": span.status.code,  # 0 unset, 1 OK, 2 ERROR
                            "attributes": {a.key: _any_value(a.value) for a in span.attributes},
                        })

    def trace(self, trace_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]

    def stop(self) -> None:
        self._server.stop(0)


class OtlpHttpReceiver(OtlpReceiver):
    """The same, as an OTLP/HTTP endpoint: protobuf POSTed to ``/v1/traces``."""

    def __init__(self) -> None:
        self.spans = []
        self.paths: list[str] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.paths.append(self.path)
                receiver.keep(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self._http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()


def _any_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


# ---- Prometheus and Alertmanager ------------------------------------------------------------


@dataclass(frozen=True)
class PrometheusTools:
    prometheus: str
    promtool: str
    alertmanager: str


def install_prometheus() -> PrometheusTools:
    """Through the project's install script; a failure fails the test (CI must have them)."""
    done = subprocess.run(
        ["bash", str(DEPLOY / "tools" / "install-prometheus.sh")], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"deploy/tools/install-prometheus.sh failed:\n{done.stderr}"
    prometheus, promtool, alertmanager = done.stdout.strip().splitlines()[-3:]
    return PrometheusTools(prometheus, promtool, alertmanager)


def fast_rules(source: Path, target: Path, hold: str = "1s") -> Path:
    """The real rule file with every ``for:`` shortened, so an alert fires within a test."""
    rules = yaml.safe_load(source.read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = hold
    target.write_text(yaml.safe_dump(rules, sort_keys=False))
    return target


class Process:
    def __init__(self, args: list[str], log: Path):
        self.log = log
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log.open("w"))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def http_json(url: str, data: dict[str, str] | None = None, timeout: float = 10) -> Any:
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    with urllib.request.urlopen(url, data=body, timeout=timeout) as reply:  # noqa: S310 - a local http URL
        return json.loads(reply.read())


class Prometheus(Process):
    """A real Prometheus scraping the stages every second, rules evaluated every second."""

    def __init__(self, tools: PrometheusTools, stages: Stages, work: Path, alertmanager: str | None = None):
        self.port = free_ports(1)[0]
        rules = fast_rules(RULES, work / "inferline.rules.yaml")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
            "rule_files": [str(rules)],
            "scrape_configs": [
                {"job_name": f"inferline-{stage}", "static_configs": [{"targets": [stages.metrics_target(stage)]}]}
                for stage in STAGES
            ],
        }
        if alertmanager:
            config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
        config_file = work / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        super().__init__(
            [tools.prometheus, f"--config.file={config_file}", f"--storage.tsdb.path={work / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle"],
            work / "prometheus.log",
        )
        self.url = f"http://127.0.0.1:{self.port}"
        wait_for(self._ready, 60, f"Prometheus to be ready (log: {self.log})")

    def _ready(self) -> bool:
        assert self.process.poll() is None, f"Prometheus exited:\n{self.log.read_text()}"
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as reply:  # noqa: S310 - a local http URL
                return reply.status == 200
        except OSError:
            return False

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr, **({"time": str(at)} if at else {})}
        reply = http_json(f"{self.url}/api/v1/query", params)
        assert reply["status"] == "success", reply
        return reply["data"]["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        params = {"query": expr, "start": str(start), "end": str(end), "step": str(step)}
        reply = http_json(f"{self.url}/api/v1/query_range", params)
        assert reply["status"] == "success", reply
        return reply["data"]["result"]

    def rules(self) -> list[dict[str, Any]]:
        groups = http_json(f"{self.url}/api/v1/rules")["data"]["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def firing(self) -> list[dict[str, Any]]:
        return [a for a in http_json(f"{self.url}/api/v1/alerts")["data"]["alerts"] if a["state"] == "firing"]


class Webhook:
    """An HTTP receiver for Alertmanager's webhook notifications."""

    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []
        received = self.notifications

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append({"path": self.path, **json.loads(body)})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def alerts(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for notification in list(self.notifications):
            for alert in notification["alerts"]:
                yield notification["path"], alert

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class Alertmanager(Process):
    """The real routing config, its webhook URLs pointed at ``webhook`` and its waits shortened."""

    def __init__(self, tools: PrometheusTools, webhook: Webhook, work: Path):
        self.port, cluster = free_ports(2)
        config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
        for receiver in config["receivers"]:
            for hook in receiver.get("webhook_configs", []):
                path = urllib.parse.urlsplit(hook["url"]).path
                hook["url"] = f"http://127.0.0.1:{webhook.port}{path}"
        for route in [config["route"], *config["route"].get("routes", [])]:
            route.update(group_wait="1s", group_interval="1s")
        config_file = work / "alertmanager.yml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        super().__init__(
            [tools.alertmanager, f"--config.file={config_file}", f"--storage.path={work / 'am'}",
             f"--web.listen-address=127.0.0.1:{self.port}", f"--cluster.listen-address=127.0.0.1:{cluster}"],
            work / "alertmanager.log",
        )
        self.target = f"127.0.0.1:{self.port}"
        wait_for(self._ready, 60, f"Alertmanager to be ready (log: {self.log})")

    def _ready(self) -> bool:
        assert self.process.poll() is None, f"Alertmanager exited:\n{self.log.read_text()}"
        try:
            with urllib.request.urlopen(f"http://{self.target}/-/ready", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False


def with_all_selected(expr: str) -> str:
    """A panel query as Grafana sends it with every variable at "All": each ``$name`` becomes the
    variable's ``allValue``, a regex that also matches series without the label (the local stack
    has no namespace or pod)."""
    dashboard = json.loads(DASHBOARD.read_text())
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            expr = expr.replace("${" + variable["name"] + "}", variable["allValue"])
            expr = expr.replace("$" + variable["name"], variable["allValue"])
    return expr


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr with every variable at "All") for every target of every panel of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], with_all_selected(target["expr"]))
        for panel in dashboard["panels"]
        for target in panel["targets"]
    ]


def stage_env(model_dir: Path, clip_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        INFERLINE_MODEL_DIR=os.pathsep.join((str(model_dir), str(clip_dir))),
        INFERLINE_ALLOW_DOWNLOAD="false",
        INFERLINE_GRACE_PERIOD_S="2",
        INFERLINE_WORKER_THREADS="2",
        INFERLINE_LOG_FORMAT="json",
        **extra,
    )
    for var in [v for v in env if v.startswith("OTEL_")]:
        env.pop(var)
    env.update({k: v for k, v in extra.items() if k.startswith("OTEL_")})
    return env
