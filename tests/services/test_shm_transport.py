"""Issue 16 over real stages: preprocessed tensors live in the controller's shm pool and only
offsets cross the controller; the results equal the inline path bit for bit; the pool is
bounded and every lease comes back, however its request ends; a stage that cannot see the pool
gets bytes instead."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest
from prometheus_client import REGISTRY

from inferline.common.errors import ConfigError, InvalidInput, ModelNotFound
from inferline.common.generated import (
    controller_pb2,
    controller_pb2_grpc,
    grpc_service_pb2,
    grpc_service_pb2_grpc,
    preprocess_pb2,
    preprocess_pb2_grpc,
    types_pb2,
)
from inferline.common.recipes import Recipe
from inferline.services.controller.grpc_ports import GrpcStages
from inferline.services.controller.plan import ModelPlan
from inferline.services.controller.ports import Deadline
from tests.support.images import encoded
from tests.support.stages import assert_same, run_stages

MODEL = "yolov8n"


def _count(stage: str, transport: str) -> float:
    return REGISTRY.get_sample_value("inferline_tensor_transport_total", {"stage": stage, "transport": transport}) or 0


@pytest.fixture(scope="module")
def images(data_dir) -> list[bytes]:
    return [(data_dir / f"shapes_0{i}.jpg").read_bytes() for i in (1, 2, 3)]


def _run(stack, stages, images: list[bytes]) -> tuple[list, list, list[bool]]:
    """Preprocess then infer, as the controller does: the preprocessed tensors (copied), the
    outputs, and whether each tensor reached the controller as a view of its shm pool."""
    tensors, outputs, where = run_stages(stack, stages, images)
    return tensors, outputs, [w is not None and not w[0] for w in where]


def test_tensors_through_shared_memory_equal_the_inline_path_bit_for_bit(stack, open_stages, images):
    inline = open_stages(tensor_transport="inline")
    shared = open_stages(tensor_transport="shm")
    assert inline.shared.pool is None and shared.shared.pool is not None
    before = {(s, t): _count(s, t) for s in ("preprocess", "inference") for t in ("shm", "inline")}
    tensors_inline, outputs_inline, _ = _run(stack, inline, images)
    tensors_shm, outputs_shm, in_pool = _run(stack, shared, images)
    assert in_pool == [True, True, True], "the controller got views of the pool, not bytes"
    assert_same(tensors_shm, tensors_inline)
    assert_same(outputs_shm, outputs_inline)
    assert _count("preprocess", "shm") - before["preprocess", "shm"] == 3
    assert _count("inference", "shm") - before["inference", "shm"] == 3
    assert _count("inference", "inline") - before["inference", "inline"] == 3  # the inline ports' run
    assert shared.shared.pool.in_use == 0, "every lease came back after the inference call"


def test_the_controller_s_detect_goes_through_shared_memory_by_default(stack, images):
    before = _count("inference", "shm")
    with grpc.insecure_channel(stack.controller) as channel:
        stub = controller_pb2_grpc.ControllerServiceStub(channel)
        request = controller_pb2.DetectRequest(model=MODEL, images=[types_pb2.Image(data=d) for d in images])
        response = stub.Detect(request, timeout=60)
    assert all(r.status.code == 0 and r.detections for r in response.results)
    assert _count("inference", "shm") - before == 3


def test_a_full_pool_sends_tensors_inline_and_is_no_error(stack, open_stages, images):
    inline = open_stages(tensor_transport="inline")
    small = open_stages(tensor_transport="shm", shm_pool_slots=2)
    before = _count("preprocess", "inline")
    _, outputs, in_pool = _run(stack, small, images)
    assert_same(outputs, _run(stack, inline, images)[1])
    assert in_pool == [False, False, False]
    assert _count("preprocess", "inline") - before == 6  # three images each run
    assert _run(stack, small, images[:2])[2] == [True, True], "two images fit the two slots"
    assert small.shared.pool.in_use == 0


def test_a_stage_with_another_dev_shm_gets_tensors_inline(stack, open_stages, images, tmp_path):
    inline = open_stages(tensor_transport="inline")
    elsewhere = open_stages(root=tmp_path, tensor_transport="auto")
    assert elsewhere.shared.pool is not None and elsewhere.shared.pool.path.parent == tmp_path
    _, outputs, in_pool = _run(stack, elsewhere, images)
    assert_same(outputs, _run(stack, inline, images)[1])
    assert in_pool == [False, False, False]
    assert not elsewhere.shared.preprocess_shares, "the preprocess stage said it cannot map the pool"
    assert not stack.loop.run(elsewhere.shared.registered(Deadline(10)))
    assert not elsewhere.shared.inference_shares
    assert elsewhere.shared.pool.in_use == 0


def test_leases_come_back_when_preprocess_fails(stack, open_stages, images):
    stages = open_stages(tensor_transport="shm")
    with pytest.raises(InvalidInput, match="nope"):
        stack.loop.run(stages.preprocess.images(Recipe("nope"), images, [], Deadline(30)))
    assert stages.shared.pool.in_use == 0


def test_leases_come_back_when_inference_fails(stack, open_stages, images):
    stages = open_stages(tensor_transport="shm")

    async def go():
        deadline = Deadline(30)
        plan = ModelPlan.from_info(await stages.inference.model(MODEL, deadline))
        pre = await stages.preprocess.images(plan.preprocess, images, [], deadline)
        assert stages.shared.pool.in_use == 3
        missing = dataclasses.replace(plan.info, name="no-such-model")
        return await stages.inference.infer(missing, [{plan.input_name: p.tensor} for p in pre], 0.0, deadline)

    outcomes = stack.loop.run(go())
    assert all(isinstance(o, ModelNotFound) for o in outcomes)
    assert stages.shared.pool.in_use == 0


@pytest.mark.parametrize("during", ["preprocess", "inference"])
def test_leases_come_back_when_the_call_is_cancelled(stack, open_stages, images, during):
    stages = open_stages(tensor_transport="shm")

    async def go():
        deadline = Deadline(30)
        plan = ModelPlan.from_info(await stages.inference.model(MODEL, deadline))
        await stages.shared.registered(deadline)
        pre = []
        if during == "inference":
            pre = await stages.preprocess.images(plan.preprocess, images, [], deadline)
            call = stages.inference.infer(plan.info, [{plan.input_name: p.tensor} for p in pre], 0.0, deadline)
        else:
            call = stages.preprocess.images(plan.preprocess, images, [], deadline)
        task = asyncio.ensure_future(call)
        await asyncio.sleep(0)  # the task runs to its stage call, holding its lease
        held = stages.shared.pool.in_use
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return held

    assert stack.loop.run(go()) == 3
    assert stages.shared.pool.in_use == 0


def test_an_inference_stage_that_lost_the_pool_gets_it_registered_again(stack, open_stages, images):
    stages = open_stages(tensor_transport="shm")
    _run(stack, stages, images)
    name = stages.shared.pool.name
    with grpc.insecure_channel(stack.settings.inference_target) as channel:
        oip = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        # What a restarted stage looks like: it has no regions.
        oip.SystemSharedMemoryUnregister(grpc_service_pb2.SystemSharedMemoryUnregisterRequest(name=name))
        before = _count("inference", "shm")
        _run(stack, stages, images)
        assert _count("inference", "shm") - before == 3
        status = oip.SystemSharedMemoryStatus(grpc_service_pb2.SystemSharedMemoryStatusRequest(name=name))
        assert list(status.regions) == [name]


def test_closing_unregisters_and_unlinks_the_pool(stack, open_stages, images):
    stages = open_stages(tensor_transport="shm")
    _run(stack, stages, images)
    pool = stages.shared.pool
    stack.loop.run(stages.shared.close())
    assert not pool.path.exists()
    with grpc.insecure_channel(stack.settings.inference_target) as channel:
        oip = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        status = oip.SystemSharedMemoryStatus(grpc_service_pb2.SystemSharedMemoryStatusRequest())
    assert pool.name not in status.regions


def test_the_preprocess_stage_writes_only_inside_a_pool_object(stack, open_stages, images):
    stages = open_stages(tensor_transport="shm")
    pool = stages.shared.pool
    recipe = Recipe("letterbox").to_proto()
    with grpc.insecure_channel(stack.settings.preprocess_target) as channel:
        stub = preprocess_pb2_grpc.PreprocessServiceStub(channel)
        for offset, size in ((pool.byte_size - 64, 4096), (pool.byte_size + 64, 64)):
            request = preprocess_pb2.PreprocessRequest(
                recipe=recipe, images=[types_pb2.Image(data=images[0])],
                output_shm=preprocess_pb2.SharedMemoryOutput(key=pool.key, offset=offset, byte_size=size),
            )
            with pytest.raises(grpc.RpcError) as raised:
                stub.Preprocess(request, timeout=30)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "outside" in raised.value.details()
        other = preprocess_pb2.SharedMemoryOutput(key="/not-a-pool", offset=0, byte_size=64)
        request = preprocess_pb2.PreprocessRequest(recipe=recipe, images=[types_pb2.Image(data=images[0])])
        request.output_shm.CopyFrom(other)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Preprocess(request, timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a controller's pool object" in raised.value.details()
        ok = stub.Preprocess(preprocess_pb2.PreprocessRequest(recipe=recipe, images=[types_pb2.Image(data=encoded())]))
        assert ok.images[0].status.code == 0 and ok.images[0].tensor.data


def _made_on_the_loop(stack, settings) -> GrpcStages:
    """GrpcStages as the controller makes it: on its event loop (grpc.aio channels need one)."""

    async def make() -> GrpcStages:
        return GrpcStages(settings)

    return stack.loop.run(make())


def test_tensor_transport_must_be_one_of_auto_cuda_shm_inline(stack):
    with pytest.raises(ConfigError, match="INFERLINE_TENSOR_TRANSPORT='tcp' is not one of auto, cuda, shm, inline"):
        _made_on_the_loop(stack, dataclasses.replace(stack.settings, tensor_transport="tcp"))


def test_a_pool_that_cannot_be_made_means_inline_and_for_shm_no_start(stack, open_stages, images):
    stages = open_stages(tensor_transport="auto", shm_pool_slots=0)
    assert stages.shared.pool is None
    assert _run(stack, stages, images)[2] == [False, False, False]
    required = _made_on_the_loop(stack, dataclasses.replace(stack.settings, tensor_transport="shm", shm_pool_slots=0))
    with pytest.raises(ConfigError, match="INFERLINE_TENSOR_TRANSPORT=shm but the shared memory pool failed"):
        required.shared.open()
    stack.loop.run(required.close())
