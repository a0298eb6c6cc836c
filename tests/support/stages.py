"""The controller's gRPC ports driven by hand against the shared in-process stack: preprocess
then infer, as the controller does, for the tensor-transport tests (shm and device pools)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from inferline.services.controller.grpc_ports import GrpcStages
from inferline.services.controller.plan import ModelPlan
from inferline.services.controller.ports import Deadline

MODEL = "yolov8n"


def run_stages(
    stack, stages: GrpcStages, images: list[bytes], before_infer: Callable[[], None] = lambda: None
) -> tuple[list[np.ndarray], list, list[tuple[bool, int] | None]]:
    """Host copies of the preprocessed tensors, the outputs, and where each tensor reached the
    controller: ``(on the device, offset)`` in one of its pools, or None (bytes)."""

    async def go():
        deadline = Deadline(60)
        plan = ModelPlan.from_info(await stages.inference.model(MODEL, deadline))
        pre = await stages.preprocess.images(plan.preprocess, images, [], deadline)
        tensors = [np.array(p.tensor) for p in pre]
        where = [stages.shared.locate(p.tensor) for p in pre]
        before_infer()
        outputs = await stages.inference.infer(plan.info, [{plan.input_name: p.tensor} for p in pre], 0.0, deadline)
        return tensors, outputs, where

    tensors, outputs, where = stack.loop.run(go())
    assert not any(isinstance(o, Exception) for o in outputs), outputs
    return tensors, outputs, where


def assert_same(a, b) -> None:
    """Arrays (or dicts of them) equal bit for bit, dtype included."""
    for x, y in zip(a, b, strict=True):
        if isinstance(x, dict):
            assert x.keys() == y.keys()
            for name in x:
                np.testing.assert_array_equal(x[name], y[name], strict=True)
        else:
            np.testing.assert_array_equal(x, y, strict=True)
