"""torch on the CPU starts one OpenMP team per process: every torch model's passes run on one
thread, and loads run on threads that end (services/inference/cpu_threads.py says why: more
OpenMP threads than cores made a Faster R-CNN pass up to twice as slow)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading

import numpy as np
import pytest
import torch

from inferline.services.inference.cpu_threads import on_passing_thread, shared_cpu_executor
from inferline.services.inference.models import LoadedModel
from inferline.services.inference.repository import BUILTIN_REPOSITORY, load_config
from inferline.services.inference.weights import ResolvedWeights

WEIGHTS = ResolvedWeights(path=BUILTIN_REPOSITORY, sha256="", official=False)


class TorchOnCpu:
    """A backend shaped like TorchBackend on the CPU: a parallel torch op per pass, and the
    thread each pass ran on."""

    labels: tuple[str, ...] = ()

    def __init__(self, cpu_threads: int):
        self.cpu_threads = cpu_threads
        self.threads: list[int] = []
        self.closed = False

    def run(self, inputs, shrink=None):
        self.threads.append(threading.get_ident())
        a = torch.ones(256, 256)
        (a @ a).sum()  # parallel over torch's intra-op threads
        return [{"y": np.zeros(1, np.float32)} for _ in range(len(inputs["images"]))]

    def recipe_params(self):
        return {}

    def close(self):
        self.closed = True


def _model(name: str, backend: TorchOnCpu, instances: int = 1) -> LoadedModel:
    config = dataclasses.replace(load_config(BUILTIN_REPOSITORY / "yolov8n" / "config.yaml"), name=name,
                                 backend="torch", instance_count=instances, candidate_filter=None)
    return LoadedModel(config, backend, WEIGHTS, 0.0)  # type: ignore[arg-type]


def _serve(model: LoadedModel, passes: int) -> None:
    item = {"images": np.zeros((3, 8, 8), np.uint8)}

    async def main():
        for _ in range(passes):
            await model.batcher.submit([("k", item)])
        await model.batcher.close()

    asyncio.run(main())


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.fixture
def two_intra_op_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_the_passes_of_every_torch_model_on_the_cpu_run_on_one_thread(two_intra_op_threads):
    shared_cpu_executor().submit(lambda: None).result()  # the shared thread, made by any earlier test or now
    started = _threads()
    detector, embedder = TorchOnCpu(cpu_threads=2), TorchOnCpu(cpu_threads=2)
    first, second = _model("detector", detector), _model("embedder", embedder)
    _serve(first, 3)
    _serve(second, 3)
    assert first.executor is second.executor is shared_cpu_executor()
    assert len(set(detector.threads + embedder.threads)) == 1
    # One OpenMP team in all: the shared thread's workers (one, at two intra-op threads), not
    # one team per model.
    assert _threads() - started <= 1
    # Retiring a model leaves the shared thread to the others.
    first._free()
    assert detector.closed
    _serve(_model("after", TorchOnCpu(cpu_threads=2)), 1)


def test_instances_of_a_torch_model_on_the_cpu_run_one_pass_at_a_time():
    model = _model("two-instances", TorchOnCpu(cpu_threads=2), instances=2)
    assert model.batcher.config.instances == 1
    assert model.shares_thread


def test_single_thread_torch_and_other_backends_keep_a_thread_per_instance():
    model = _model("one-thread", TorchOnCpu(cpu_threads=1), instances=2)
    try:
        assert not model.shares_thread
        assert model.executor is not shared_cpu_executor()
        assert model.batcher.config.instances == 2
    finally:
        model._free()


def test_a_load_runs_on_a_thread_that_ends_with_it():
    seen: list[threading.Thread] = []

    def load(x: int) -> int:
        seen.append(threading.current_thread())
        return x * 2

    assert asyncio.run(on_passing_thread(load, 21)) == 42
    (thread,) = seen
    assert thread is not threading.main_thread() and thread.name == "model-load"
    thread.join(5)
    assert not thread.is_alive()


def test_a_failed_load_raises_its_own_error_in_the_caller():
    def load() -> None:
        raise ValueError("bad weights")

    with pytest.raises(ValueError, match="bad weights"):
        asyncio.run(on_passing_thread(load))
