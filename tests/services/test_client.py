"""The client package against real servers: domain values in and out, per-item errors in the
results, a whole call's failure raised as its domain error, the same from the sync and the
async client."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from inferline.common import errors
from inferline.common.api import ClassifyRequest, DetectRequest, EmbedRequest, ImageInput
from inferline.common.generated import controller_pb2, controller_pb2_grpc
from inferline.common.server import Service
from inferline.common.settings import Settings
from inferline.services.client import AsyncClient, Client, collect_images, image_inputs
from inferline.services.stack import free_ports
from tests.support.servers import LoopThread, RunningServer, start_service

BROKEN = ImageInput(b"\xff\xd8 not really a jpeg", "broken.jpg")


def _detect(model: str, *images: ImageInput) -> DetectRequest:
    return DetectRequest(model, images)


@pytest.fixture()
def client(stack) -> Iterator[Client]:
    with Client(stack.controller, timeout=60) as running:
        yield running


def test_detect_returns_each_image_s_detections_or_its_own_error(client, data_dir):
    (good,) = image_inputs([data_dir / "shapes_01.jpg"])
    result = client.detect(_detect("yolov8n", good, BROKEN))
    assert (result.model, result.model_version) == ("yolov8n", "1")
    ok, broken = result.images
    assert (ok.name, ok.width, ok.height, ok.error) == (str(data_dir / "shapes_01.jpg"), 640, 480, None)
    assert ok.detections and all(0 <= d.score <= 1 for d in ok.detections)
    assert isinstance(broken.error, errors.InvalidInput) and not broken.detections
    assert {"preprocess", "inference", "postprocess", "total"} <= set(result.timings_ms)


def test_a_png_rendering_comes_back_when_asked_for(client, data_dir):
    request = DetectRequest("yolov8n", image_inputs([data_dir / "shapes_02.jpg"]), render=("png",))
    (image,) = client.detect(request).images
    (rendering,) = image.renderings
    assert (rendering.format, rendering.content_type) == ("png", "image/png")
    assert rendering.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_classify_and_embed_return_labels_and_vectors(client, data_dir):
    images = image_inputs([data_dir / "shapes_01.jpg"])
    (labelled,) = client.classify(ClassifyRequest("clip-vit-b-32", images, ("a circle", "a star"), top_k=1)).images
    assert len(labelled.labels) == 1 and labelled.labels[0][0] in ("a circle", "a star")
    embedded = client.embed(EmbedRequest("clip-vit-b-32", images, ("a circle",)))
    assert [len(e.embedding) for e in embedded.images + embedded.texts] == [512, 512]
    assert embedded.rankings[0].text == "a circle" and embedded.rankings[0].images == [0]


def test_models_and_model_return_the_controller_s_metadata(client):
    assert ("yolov8n", "detect") in [(m.name, m.task) for m in client.models()]
    assert client.model("clip-vit-b-32").task == "embed"


def test_the_async_client_answers_as_the_sync_one(client, stack, data_dir):
    request = _detect("yolov8n", *image_inputs([data_dir / "shapes_03.jpg"]), BROKEN)

    async def run():
        async with AsyncClient(stack.controller, timeout=60) as aio:
            return await aio.detect(request), await aio.model("yolov8n"), await aio.health()

    result, metadata, health = asyncio.run(run())
    expected = client.detect(request)
    assert [i.detections for i in result.images] == [i.detections for i in expected.images]
    assert [type(i.error) for i in result.images] == [type(None), errors.InvalidInput]
    assert metadata.name == "yolov8n" and health == "SERVING"


def test_an_unknown_model_raises_model_not_found_from_both_clients(client, stack, data_dir):
    request = _detect("nope", *image_inputs([data_dir / "shapes_01.jpg"]))
    with pytest.raises(errors.ModelNotFound) as sync_error:
        client.detect(request)

    async def run() -> None:
        async with AsyncClient(stack.controller) as aio:
            await aio.detect(request, timeout=30)

    with pytest.raises(errors.ModelNotFound) as async_error:
        asyncio.run(run())
    for raised in (sync_error.value, async_error.value):
        assert "nope" in str(raised) and "yolov8n" in str(raised)  # the controller lists what it serves
        assert isinstance(raised.__cause__, grpc.RpcError)
        assert raised.__cause__.code() is grpc.StatusCode.NOT_FOUND


def test_the_client_s_timeout_applies_unless_the_call_names_its_own(stack):
    with Client(stack.controller, timeout=1e-6) as hasty:
        with pytest.raises(errors.DeadlineExceeded):
            hasty.models()
        assert hasty.models(timeout=30)


def test_an_unreachable_controller_is_stage_unavailable():
    (port,) = free_ports(1)
    with Client(f"127.0.0.1:{port}", timeout=5) as nobody:
        with pytest.raises(errors.StageUnavailable):
            nobody.models()
        assert nobody.health() == "UNREACHABLE"


def test_health_names_the_controller_s_state_and_unknown_names(client):
    assert client.health() == "SERVING"
    assert client.health("model/yolov8n") == "SERVING"
    assert client.health("model/nope") == "NOT_FOUND"


class HintingController(controller_pb2_grpc.ControllerServiceServicer):
    """Refuses every Detect with a retry hint; Classify answers a status the table has no row
    for, as a proxy in front of a controller might."""

    async def Detect(self, request, context):  # noqa: N802 - gRPC's method name
        raise errors.Overloaded("busy", retry_after_s=2.5)

    async def Classify(self, request, context):  # noqa: N802 - gRPC's method name
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not for you")


@pytest.fixture(scope="module")
def hinting() -> Iterator[RunningServer]:
    def build(settings: Settings) -> Service:
        def register(server: grpc.aio.Server) -> list[str]:
            controller_pb2_grpc.add_ControllerServiceServicer_to_server(HintingController(), server)
            return [controller_pb2.DESCRIPTOR.services_by_name["ControllerService"].full_name]

        return Service("hinting-controller", register)

    loop = LoopThread()
    server = start_service(loop, build, Settings())
    yield server
    server.stop()
    loop.close()


def test_a_refusal_is_overloaded_with_the_server_s_retry_hint(hinting):
    with Client(hinting.address, timeout=10) as refused, pytest.raises(errors.Overloaded) as raised:
        refused.detect(_detect("any", BROKEN))
    assert raised.value.retry_after_s == pytest.approx(2.5)
    assert str(raised.value) == "busy"


def test_a_status_outside_the_table_is_stage_failed_naming_the_status(hinting):
    with Client(hinting.address, timeout=10) as old, pytest.raises(errors.StageFailed) as raised:
        old.classify(ClassifyRequest("any", (BROKEN,), ("a",)))
    assert str(raised.value) == "PERMISSION_DENIED: not for you"
    assert raised.value.__cause__.code() is grpc.StatusCode.PERMISSION_DENIED


def test_collect_images_takes_files_as_given_and_the_images_of_folders_sorted(tmp_path: Path):
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("b.png", "a.jpg", "notes.txt"):
        (folder / name).write_bytes(name.encode())
    single = tmp_path / "single.webp"
    single.write_bytes(b"w")
    assert collect_images([folder, single]) == [folder / "a.jpg", folder / "b.png", single]
    assert image_inputs([folder / "a.jpg"]) == (ImageInput(b"a.jpg", str(folder / "a.jpg")),)
    with pytest.raises(FileNotFoundError, match="no such image"):
        collect_images([tmp_path / "missing.jpg"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images found"):
        collect_images([tmp_path / "empty"])


def test_the_readme_s_python_example_runs_as_written(stack, data_dir, capsys):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    example = readme.split("```python\n", 1)[1].split("```", 1)[0]
    here = example.replace("localhost:50051", stack.controller).replace("../shared/data", str(data_dir))
    exec(compile(here, "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip()
    assert printed.startswith(str(data_dir / "shapes_05.jpg") + " [(")
