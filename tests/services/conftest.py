"""Fixtures of the stage tests."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from inferline.services.controller.grpc_ports import GrpcStages


@pytest.fixture
def open_stages(stack) -> Iterator:
    """``open_stages(root=None, **settings)``: the controller's gRPC ports to the shared stack's
    stages, with their pools (``root``: where the shm pool is made, to stand for another /dev/shm)."""
    made: list[GrpcStages] = []

    def open_(root=None, **changes) -> GrpcStages:
        async def start() -> GrpcStages:
            stages = GrpcStages(dataclasses.replace(stack.settings, **changes))
            stages.shared.root = root
            await stages.load()
            return stages

        made.append(stack.loop.run(start()))
        return made[-1]

    yield open_
    for stages in made:
        stack.loop.run(stages.close())
