"""The controller's inference port over the Open Inference Protocol (``inference.GRPCInferenceService``).

Any OIP server can then be the inference stage, as long as its models' ``ModelConfig.parameters``
carry what a plan needs beyond OIP (task, recipes, labels, weights provenance: the keys of
services/inference/oip_servicer.py ``PARAMETER_KEYS``). The port answers the same domain
questions as ``GrpcInference`` (grpc_ports.py), so the plan and the operations do not change:

- ``model`` builds the inferline ``ModelMetadataResponse`` from ModelMetadata + ModelConfig;
- ``infer`` sends items as Triton batches: items of one input shape and datatype go in one
  request (a batch tensor has one shape), at most ``max_batch_size`` per request (one when the
  model has no batching), all requests at once. ``min_score`` travels as a request parameter
  for single items only (see ``_infer_chunk``). A request the stage refuses as invalid fails
  its items alone, as the inferline protocol's per-item statuses did.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc
import numpy as np

from inferline.common import oip
from inferline.common.errors import InvalidInput, StageFailed
from inferline.common.generated import grpc_service_pb2, grpc_service_pb2_grpc, inference_pb2, model_config_pb2
from inferline.common.recipes import Recipe
from inferline.common.telemetry.context import PROFILE, Profile
from inferline.common.tensors import DTYPE_NAMES
from inferline.services.controller.ports import Deadline, Outcome, Outputs

if TYPE_CHECKING:  # grpc_ports builds this port: no import cycle at run time
    from inferline.services.controller.grpc_ports import _Caller

MIN_SCORE = "min_score"


class OipInference:
    def __init__(self, channel: grpc.aio.Channel, call: _Caller):
        self._stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        self._call = call
        # Max batch size by model: fixed while a model is loaded, asked once.
        self._batch: dict[tuple[str, str], int] = {}

    async def _config(self, name: str, version: str, deadline: Deadline) -> model_config_pb2.ModelConfig:
        request = grpc_service_pb2.ModelConfigRequest(name=name, version=version)
        response = await self._call(self._stub.ModelConfig, request, deadline)
        self._batch[(name, version)] = response.config.max_batch_size
        return response.config

    async def model(self, name: str, deadline: Deadline) -> inference_pb2.ModelMetadataResponse:
        meta, config = await asyncio.gather(
            self._call(self._stub.ModelMetadata, grpc_service_pb2.ModelMetadataRequest(name=name), deadline),
            self._config(name, "", deadline),
        )
        return plan_metadata(meta, config)

    async def models(self, deadline: Deadline) -> inference_pb2.ListModelsResponse:
        request = grpc_service_pb2.RepositoryIndexRequest(ready=True)
        index = await self._call(self._stub.RepositoryIndex, request, deadline)
        names = [m.name for m in index.models if m.state == "READY"]
        return inference_pb2.ListModelsResponse(models=await asyncio.gather(*(self.model(n, deadline) for n in names)))

    async def infer(
        self, model: str, version: str, items: Sequence[Outputs], min_score: float, deadline: Deadline
    ) -> list[Outcome[Outputs]]:
        if (model, version) not in self._batch:
            await self._config(model, version, deadline)
        max_batch = self._batch[(model, version)]
        groups: dict[tuple, list[int]] = {}
        for index, item in enumerate(items):
            key = tuple(sorted((name, array.dtype.str, array.shape) for name, array in item.items()))
            groups.setdefault(key, []).append(index)
        size = max(max_batch, 1)
        chunks = [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]
        # All at once, so that the stage's dynamic batcher can run them as one batch (as it ran
        # the items of one inferline request).
        profile = PROFILE.get()
        children = [Profile() for _ in chunks] if profile is not None else []

        async def send(index: int, chunk: list[int]) -> list[Outputs] | InvalidInput:
            if profile is not None:
                PROFILE.set(children[index])  # this task's own context: the parent's is untouched
            chunk_items = [items[i] for i in chunk]
            return await self._infer_chunk(model, version, chunk_items, max_batch > 0, min_score, deadline)

        answers = await asyncio.gather(*(send(i, chunk) for i, chunk in enumerate(chunks)))
        if profile is not None:
            profile.merge(_concurrent(children))
        results: list[Outcome[Outputs]] = [StageFailed("inference stage answered no result")] * len(items)
        for chunk, answer in zip(chunks, answers, strict=True):
            for position, index in enumerate(chunk):
                results[index] = answer if isinstance(answer, Exception) else answer[position]
        return results

    async def _infer_chunk(
        self, model: str, version: str, items: list[Outputs], batched: bool, min_score: float, deadline: Deadline
    ) -> list[Outputs] | InvalidInput:
        request = grpc_service_pb2.ModelInferRequest(model_name=model, model_version=version)
        # The candidate filter leaves each item its own number of candidates, which no batch
        # tensor holds: a batch goes unfiltered (the filter drops only what the postprocess
        # would drop, so the detections are the same), a single item filtered.
        if min_score > 0 and len(items) == 1:
            request.parameters[MIN_SCORE].double_param = min_score
        for name in items[0]:
            batch = [item[name] for item in items]
            array = np.stack(batch) if batched else batch[0]
            tensor, data = oip.output_tensor(name, array)
            request.inputs.add(name=name, datatype=tensor.datatype, shape=tensor.shape)
            request.raw_input_contents.append(data)
        try:
            response = await self._call(self._stub.ModelInfer, request, deadline)
        except InvalidInput as exc:
            return exc  # this chunk's items fail alone, as a bad item did
        outputs = oip.decode_outputs(response)
        if not batched:
            return [outputs]
        for name, array in outputs.items():
            if array.shape[:1] != (len(items),):
                raise StageFailed(
                    f"inference stage answered output {name!r} of shape {array.shape} for {len(items)} items"
                )
        return [{name: array[i] for name, array in outputs.items()} for i in range(len(items))]


def _concurrent(children: list[Profile]) -> dict[str, float]:
    """The profiles of calls that ran at once: their steps add up, as every profile's do, but a
    stage's ``.server`` time is the longest call's, so that it stays within the caller's wait."""
    merged: dict[str, float] = {}
    for child in children:
        for key, value in child.ms.items():
            merged[key] = max(merged.get(key, 0.0), value) if key.endswith(".server") else merged.get(key, 0.0) + value
    return merged


def plan_metadata(
    meta: grpc_service_pb2.ModelMetadataResponse, config: model_config_pb2.ModelConfig
) -> inference_pb2.ModelMetadataResponse:
    """The inferline metadata a plan is made from, out of OIP's ModelMetadata and ModelConfig."""
    params = {key: value.string_value for key, value in config.parameters.items()}
    missing = [key for key in ("task", "preprocess", "postprocess") if key not in params]
    if missing:
        raise StageFailed(
            f"model {meta.name!r}: its ModelConfig.parameters lack {', '.join(missing)}; "
            "an OIP model served to this controller must carry them (docs: services/inference/oip_servicer.py)"
        )

    def recipe(key: str) -> Recipe:
        raw = json.loads(params[key])
        return Recipe(raw["name"], raw.get("params") or {})

    def specs(tensors) -> list[inference_pb2.TensorMetadata]:
        return [
            inference_pb2.TensorMetadata(
                name=t.name,
                datatype=DTYPE_NAMES[oip.TO_CONFIG[oip.FROM_CONFIG_TYPE[t.data_type]]],
                shape=list(t.dims),
            )
            for t in tensors
        ]

    return inference_pb2.ModelMetadataResponse(
        name=meta.name,
        versions=meta.versions,
        platform=meta.platform or config.backend or config.platform,
        task=params["task"],
        inputs=specs(config.input),
        outputs=specs(config.output),
        preprocess=recipe("preprocess").to_proto(),
        postprocess=recipe("postprocess").to_proto(),
        labels=json.loads(params.get("labels", "[]")),
        weights=inference_pb2.WeightsInfo(
            path=params.get("weights_file", ""),
            sha256=params.get("weights_sha256", ""),
            official=json.loads(params.get("weights_official", "false")),
        ),
        max_batch_size=config.max_batch_size,
    )
