"""`--inprocess`: the controller runs the three stages' code itself; answers equal the four services'."""

from __future__ import annotations

import dataclasses

import grpc
import pytest

from inferline.common.generated import controller_pb2, controller_pb2_grpc, types_pb2
from tests.support.images import encoded
from tests.support.servers import LoopThread, start_stage


@pytest.fixture(scope="module")
def inprocess(settings):
    loop = LoopThread()
    server = start_stage(loop, "controller",
                         dataclasses.replace(settings, inprocess=True, models=("yolov8n",), pipeline_slice=2))
    try:
        with grpc.insecure_channel(server.address) as channel:
            yield controller_pb2_grpc.ControllerServiceStub(channel)
    finally:
        server.stop()
        loop.close()


@pytest.fixture(scope="module")
def four_services(stack):
    with grpc.insecure_channel(stack.controller) as channel:
        yield controller_pb2_grpc.ControllerServiceStub(channel)


def _same(ours, theirs) -> None:
    """Equal detections, up to float rounding: batches of other sizes (slices of 2 here, 4 in the
    session stack) may round a convolution differently in the last bit."""
    assert [[d.label for d in r.detections] for r in ours] == [[d.label for d in r.detections] for r in theirs]
    for a, b in zip(ours, theirs, strict=True):
        for x, y in zip(a.detections, b.detections, strict=True):
            assert abs(x.score - y.score) < 1e-4
            assert max(abs(x.box.x1 - y.box.x1), abs(x.box.y1 - y.box.y1), abs(x.box.x2 - y.box.x2),
                       abs(x.box.y2 - y.box.y2)) < 1e-2


def _detect(images, **fields):
    return controller_pb2.DetectRequest(
        model="yolov8n", images=[types_pb2.Image(data=d, name=f"img{i}") for i, d in enumerate(images)], **fields
    )


def test_inprocess_detections_equal_the_four_services(inprocess, four_services, sample_images):
    images = [p.read_bytes() for p in sample_images[:4]]
    options = types_pb2.DetectOptions(conf=0.3)
    local = inprocess.Detect(_detect(images, options=options), timeout=60)
    remote = four_services.Detect(_detect(images, options=options), timeout=60)
    _same(local.results, remote.results)
    assert any(r.detections for r in local.results)
    assert {"preprocess", "inference", "postprocess", "total"} <= set(local.timings_ms)


def test_inprocess_keeps_per_image_errors_and_the_status_table(inprocess, data_dir):
    response = inprocess.Detect(_detect([b"not an image", (data_dir / "shapes_01.jpg").read_bytes()]), timeout=60)
    assert response.results[0].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert response.results[1].status.code == 0 and response.results[1].detections
    with pytest.raises(grpc.RpcError) as raised:
        inprocess.Detect(controller_pb2.DetectRequest(model="nope", images=[types_pb2.Image(data=encoded())]),
                         timeout=30)
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND and "yolov8n" in raised.value.details()
    with pytest.raises(grpc.RpcError) as raised:
        inprocess.Detect(_detect([(data_dir / "shapes_01.jpg").read_bytes()], options=types_pb2.DetectOptions(conf=2)),
                         timeout=30)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_serve_inprocess_is_only_a_controller_mode(capsys):
    from inferline.services.cli import main  # noqa: PLC0415

    assert main(["serve", "preprocess", "--inprocess"]) == 1
    assert "--inprocess is a mode of the controller" in capsys.readouterr().err


def test_a_big_request_goes_through_in_slices_with_order_and_errors_kept(inprocess, four_services, sample_images):
    """Slices of 2 here (INFERLINE_PIPELINE_SLICE), 4 in the session stack: same answers."""
    images = [p.read_bytes() for p in sample_images[:3]] + [b"broken"] + [p.read_bytes() for p in sample_images[3:6]]
    sliced = inprocess.Detect(_detect(images), timeout=120).results
    whole = four_services.Detect(_detect(images), timeout=120).results
    assert [r.name for r in sliced] == [f"img{i}" for i in range(len(images))]
    assert sliced[3].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and not sliced[3].detections
    _same(sliced, whole)
    assert [(r.width, r.height) for r in sliced] == [(r.width, r.height) for r in whole]
