"""The watch on the stages that makes the controller's readiness: every replica of every stage,
checked on its own channel."""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import Gauge

from inferline.common.channels import create_channel, replica_addresses
from inferline.common.generated import grpc_service_pb2, grpc_service_pb2_grpc
from inferline.common.server import ReportHealth
from inferline.common.settings import Settings

log = logging.getLogger(__name__)

# The controller's health name of one model: SERVING while every stage is and a replica of the
# inference stage has the model loaded (`grpcurl -d '{"service":"model/yolov8n"}' ... Check`).
MODEL_HEALTH_PREFIX = "model/"

STAGE_SERVING = Gauge(
    "inferline_stage_serving",
    "1 while the controller sees a replica of the stage SERVING, else 0 (its readiness follows).",
    ["stage"],
)
STAGE_REPLICAS_SERVING = Gauge(
    "inferline_stage_replicas_serving", "Replicas of the stage that the controller sees SERVING.", ["stage"]
)

class StageState(enum.Enum):
    SERVING = "SERVING"
    # The process answers but is loading or draining.
    NOT_SERVING = "NOT_SERVING"
    UNREACHABLE = "UNREACHABLE"


@dataclass
class StageHealth:
    """What the last check of one stage (all its replicas) found."""

    state: StageState | None = None
    serving_replicas: int = 0
    last_serving: float | None = None
    # The inference stage's replicas: the models each serves READY, by name, with their version,
    # asked at every check (models load and unload live: docs/model-control.md); None while it
    # does not serve (or did not say).
    replica_models: list[dict[str, str] | None] = field(default_factory=list)

    @property
    def models(self) -> frozenset[str]:
        """Models some SERVING replica serves."""
        return frozenset().union(*(m for m in self.replica_models if m is not None))


@dataclass
class StageWatcher:
    """Checks every replica of every stage each ``readiness_poll_s`` and turns what it sees into
    the controller's health: ``""`` SERVING while each stage has a SERVING replica, and
    ``model/<name>`` while, besides, a SERVING replica of the inference stage serves that model
    (``ListModels``); a model the settings name reads NOT_SERVING until then, others are
    unknown (NOT_FOUND) until first seen.

    Each replica is checked on its own plain channel (no load balancing, no health filter), so a
    loading replica reads NOT_SERVING rather than "no replica ready".
    """

    settings: Settings
    targets: dict[str, str]
    health: dict[str, StageHealth] = field(default_factory=dict)
    # Called with a model's name when a replica loads, reloads (another version) or unloads it:
    # the controller's cached plan of it is stale (PlanCache.forget).
    on_model_change: Callable[[str], None] | None = None
    _channels: dict[str, list[grpc.aio.Channel]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for stage, target in self.targets.items():
            self._channels[stage] = [
                create_channel(address, self.settings, health_service=None) for address in replica_addresses(target)
            ]
            self.health[stage] = StageHealth(replica_models=[None] * len(self._channels[stage]))
        # Models named in the settings read NOT_SERVING (not "unknown") until they are loaded.
        self._models: set[str] = set(self.settings.models)

    def expected(self, stage: str) -> bool:
        """Whether calls should wait for the stage (gRPC wait-for-ready) rather than fail fast:
        it answers (perhaps still loading or draining), or it was serving less than
        ``stage_outage_wait_s`` ago and is most likely restarting."""
        health = self.health[stage]
        if health.state in (StageState.SERVING, StageState.NOT_SERVING):
            return True
        return health.last_serving is not None and (
            time.monotonic() - health.last_serving <= self.settings.stage_outage_wait_s
        )

    @property
    def serving(self) -> bool:
        return all(h.state is StageState.SERVING for h in self.health.values())

    async def poll(self) -> dict[str, bool]:
        """Checks every replica once; returns the controller's health names."""
        await asyncio.gather(*(self._poll_stage(stage) for stage in self.targets))
        serving, served = self.serving, self.health["inference"].models
        self._models |= served
        return {"": serving, **{MODEL_HEALTH_PREFIX + model: serving and model in served for model in self._models}}

    async def run(self, report: ReportHealth) -> None:
        """The controller's readiness hook: reports each change until cancelled by the drain."""
        last: dict[str, bool] | None = None
        while True:
            try:
                names = await self.poll()
            except Exception:
                log.exception("checking the stages failed; the controller reports NOT_SERVING")
                names = {name: False for name in last or {"": False}}
            if names != last:
                if last is None or names[""] != last[""]:
                    log.info("controller %s (%s)", "SERVING" if names[""] else "NOT_SERVING", self.describe())
                await report(names)
                last = names
            await asyncio.sleep(self.settings.readiness_poll_s)

    def describe(self) -> str:
        return ", ".join(
            f"{stage} {h.state.value if h.state else 'unchecked'} "
            f"({h.serving_replicas}/{len(self._channels[stage])} serving)"
            for stage, h in self.health.items()
        )

    async def _poll_stage(self, stage: str) -> None:
        replies = await asyncio.gather(*(self._check(channel) for channel in self._channels[stage]))
        health = self.health[stage]
        health.serving_replicas = sum(state is StageState.SERVING for state in replies)
        previous = health.state
        if health.serving_replicas:
            health.state, health.last_serving = StageState.SERVING, time.monotonic()
        elif StageState.NOT_SERVING in replies:
            health.state = StageState.NOT_SERVING
        else:
            health.state = StageState.UNREACHABLE
        if previous is not None and previous is not health.state:
            level = logging.INFO if health.state is StageState.SERVING else logging.WARNING
            log.log(level, "%s stage is %s (%s)", stage, health.state.value, self.targets[stage])
        STAGE_SERVING.labels(stage).set(1 if health.state is StageState.SERVING else 0)
        STAGE_REPLICAS_SERVING.labels(stage).set(health.serving_replicas)
        if stage == "inference":
            for i, (channel, state) in enumerate(zip(self._channels[stage], replies, strict=False)):
                before = health.replica_models[i]
                now = await self._models_of(channel) if state is StageState.SERVING else None
                health.replica_models[i] = now
                if now is not None and now != before:  # (a restarted replica may serve other versions)
                    self._changed(before or {}, now)

    def _changed(self, before: dict[str, str], now: dict[str, str]) -> None:
        """Tells ``on_model_change`` of each model whose state or version differs."""
        if self.on_model_change is None:
            return
        for name in sorted(set(before) | set(now)):
            if before.get(name) != now.get(name):
                log.debug("model %s changed on an inference replica (version %s -> %s)",
                         name, before.get(name, "none"), now.get(name, "none"))
                self.on_model_change(name)

    async def _check(self, channel: grpc.aio.Channel) -> StageState:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]  # stubs list no methods
                health_pb2.HealthCheckRequest(service=""), timeout=self._timeout
            )
        except grpc.aio.AioRpcError:
            return StageState.UNREACHABLE
        return StageState.SERVING if reply.status == health_pb2.HealthCheckResponse.SERVING else StageState.NOT_SERVING

    async def _models_of(self, channel: grpc.aio.Channel) -> dict[str, str] | None:
        """The models one replica serves, with their versions (None if it did not say)."""
        try:  # the Open Inference Protocol's index, which any OIP server (Triton too) answers
            reply = await grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(
                grpc_service_pb2.RepositoryIndexRequest(ready=True), timeout=self._timeout
            )
        except grpc.aio.AioRpcError:
            return None
        return {model.name: model.version for model in reply.models if model.state == "READY"}

    @property
    def _timeout(self) -> float:
        return max(1.0, self.settings.readiness_poll_s)

    async def close(self) -> None:
        for replicas in self._channels.values():
            for channel in replicas:
                await channel.close()
