"""The bad-input table (issue 13): every kind of wrong request, through the controller, each
stage directly and the HTTP gateway, gets one status (INVALID_ARGUMENT for what the client got
wrong, never UNKNOWN or INTERNAL) with a short message that names what to change, refused in
under a second and 50 MB, while the service stays SERVING and good requests beside it succeed.

Memory is measured two ways (docs/reliability-validation.md says why):
- in-process, every row: ``tracemalloc`` peak during the call. It sees numpy arrays (numpy
  reports its buffers to tracemalloc) and Python objects, including OpenCV's output arrays; it
  does not see Pillow's or libjpeg's own buffers, gRPC core's or torch's.
- on subprocess stages (``@pytest.mark.slow``), for the absurd rows: the stage's peak RSS
  (``VmHWM``, reset through ``/proc/PID/clear_refs``) minus its RSS before the call, which
  counts every allocation of the process, whatever library made it.
"""

from __future__ import annotations

import base64
import dataclasses
import time
import tracemalloc
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any

import cv2
import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from inferline.common import oip, tensors
from inferline.common.generated import (
    controller_pb2,
    controller_pb2_grpc,
    grpc_service_pb2,
    grpc_service_pb2_grpc,
    postprocess_pb2,
    postprocess_pb2_grpc,
    preprocess_pb2,
    preprocess_pb2_grpc,
    types_pb2,
)
from inferline.common.recipes import Recipe
from inferline.common.settings import Settings
from tests.observability.harness import Stages, stage_env
from tests.support.gateway import RunningGateway
from tests.support.images import encoded
from tests.support.servers import stage_channel

REFUSE_WITHIN_S = 1.0
REFUSE_UNDER_BYTES = 50 * 1024 * 1024
RECEIVE_COPIES = 2  # see Outcome.work_bytes
# Longest message a person should have to read; a message that echoes a client string in full
# (a 100 KB model name) would be far over it.
SHORT_MESSAGE = 400
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
STAGES = ("controller", "preprocess", "inference", "postprocess")
LETTERBOX = Recipe("letterbox", {"size": 640, "stride": 32, "auto": True, "pad_value": 114})
CLIP_TEXT = Recipe("clip_tokenize", {"context_length": 77})
BIG_TEXT = "a photo of a dog " * 6000  # 102 KB
# Channels that carry what the test builds (the 64 MiB case included) and read any answer.
CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", 256 * 1024 * 1024)]


# ---- images the rows send ------------------------------------------------------------------


@cache
def jpeg_30kb() -> bytes:
    """A 640x480 photo-like JPEG of 25 KB, like the 30 KB one the issue letterboxed at size=12000."""
    yy, xx = np.mgrid[0:480, 0:640]
    pixels = np.dstack([(xx * 255 // 639), (yy * 255 // 479), ((xx + yy) % 256)]).astype(np.uint8)
    pixels = cv2.GaussianBlur(pixels, (0, 0), 3)
    return cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


@cache
def png_7000() -> bytes:
    """A valid 7000x7000 PNG of ~143 KB: 147 MB once decoded."""
    return cv2.imencode(".png", np.zeros((7000, 7000, 3), np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 9])[1].tobytes()


@cache
def tiny_png() -> bytes:
    return encoded(48, 64)


def truncated_jpeg() -> bytes:
    return jpeg_30kb()[: len(jpeg_30kb()) // 3]


@cache
def over_transport_limit() -> list[types_pb2.Image]:
    """1000 images of 70 KB: 70 MB, over the 64 MiB message limit."""
    noise = np.random.default_rng(0).integers(0, 256, (100, 230, 3), dtype=np.uint8)
    data = cv2.imencode(".png", noise)[1].tobytes()
    return [types_pb2.Image(data=data, name=f"i{i}") for i in range(1000)]


def images(*datas: bytes) -> list[types_pb2.Image]:
    return [types_pb2.Image(data=d, name=f"image{i}") for i, d in enumerate(datas)]


def fp32(values: Any, name: str = "t") -> types_pb2.Tensor:
    return tensors.to_proto(np.asarray(values, np.float32), name)


def raw_tensor(shape: list[int], data: bytes, datatype: int = types_pb2.DATA_TYPE_FP32) -> types_pb2.Tensor:
    return types_pb2.Tensor(name="images", datatype=datatype, shape=shape, data=data)


# ---- clients -------------------------------------------------------------------------------


@dataclass
class Clients:
    channels: dict[str, grpc.Channel]

    @property
    def controller(self) -> controller_pb2_grpc.ControllerServiceStub:
        return controller_pb2_grpc.ControllerServiceStub(self.channels["controller"])

    @property
    def preprocess(self) -> preprocess_pb2_grpc.PreprocessServiceStub:
        return preprocess_pb2_grpc.PreprocessServiceStub(self.channels["preprocess"])

    @property
    def inference(self) -> grpc_service_pb2_grpc.GRPCInferenceServiceStub:
        return grpc_service_pb2_grpc.GRPCInferenceServiceStub(self.channels["inference"])

    @property
    def postprocess(self) -> postprocess_pb2_grpc.PostprocessServiceStub:
        return postprocess_pb2_grpc.PostprocessServiceStub(self.channels["postprocess"])

    def raw(self, stage: str, method: str) -> Callable[..., bytes]:
        """A method of a stage that sends the bytes it is given, unparsed."""
        return self.channels[stage].unary_unary(method, request_serializer=lambda b: b,
                                                response_deserializer=lambda b: b)

    def serving(self, stage: str) -> bool:
        reply = health_pb2_grpc.HealthStub(self.channels[stage]).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return reply.status == health_pb2.HealthCheckResponse.SERVING



@dataclass(frozen=True)
class Outcome:
    """What the caller saw: the call's status, or the first failed item's when the call was OK."""

    code: grpc.StatusCode
    message: str
    seconds: float
    peak_bytes: int
    request_bytes: int

    @property
    def work_bytes(self) -> int:
        """The peak beyond receiving the request: grpc.aio hands the servicer the message as a
        Python ``bytes`` assembled from a copy (two copies at the peak, measured). That cost is
        bounded by INFERLINE_MAX_MESSAGE_MB before any of our code runs; what is asserted is
        that refusing adds no work proportional to the absurd value itself."""
        return self.peak_bytes - RECEIVE_COPIES * self.request_bytes


def item_failure(response: Any) -> tuple[grpc.StatusCode, str]:
    for field in ("results", "images", "texts"):
        for item in getattr(response, field, ()):
            status = getattr(item, "status", None)
            if status is not None and status.code != 0:
                return grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == status.code)), status.message
    return grpc.StatusCode.OK, ""


def measured(rpc: Rpc, clients: Clients) -> Outcome:
    """Sends the request under tracemalloc; the peak is of what was allocated during the call.

    The request is serialised before tracing starts, so the client's own copy of a 70 MB
    message is not counted against the server."""
    payload = rpc.payload()
    send = clients.raw(rpc.stage, rpc.method)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        answer = send(payload, timeout=T)
        code, message = (
            item_failure(rpc.response.FromString(answer)) if rpc.response is not None else (grpc.StatusCode.OK, "")
        )
    except grpc.RpcError as exc:
        code, message = exc.code(), exc.details() or ""
    finally:
        seconds = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return Outcome(code, message, seconds, peak, len(payload))


# ---- the table -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rpc:
    """One call: the stage, the full method name, the request (a message or raw bytes)."""

    stage: str
    method: str
    build: Callable[[], Any]
    response: Any = None  # the response message class, to read item statuses

    def payload(self) -> bytes:
        request = self.build()
        return request if isinstance(request, bytes) else request.SerializeToString()


@dataclass(frozen=True)
class Case:
    """One row: who is called, with what, and what the caller must see."""

    id: str
    rpc: Rpc
    code: grpc.StatusCode
    needle: str  # a part of the message that tells the user what to change
    absurd: bool = False  # also measured on subprocess stages (slow test)

    @property
    def target(self) -> str:
        return self.rpc.stage


INVALID = grpc.StatusCode.INVALID_ARGUMENT
T = 30  # seconds: each call's deadline; the rows assert far less
CONTROLLER = "/inferline.v1.ControllerService/"


def detect(**fields: Any) -> Rpc:
    return Rpc("controller", CONTROLLER + "Detect",
               lambda: controller_pb2.DetectRequest(**{"model": "yolov8n", **fields}),
               controller_pb2.DetectResponse)


def classify(**fields: Any) -> Rpc:
    return Rpc("controller", CONTROLLER + "Classify",
               lambda: controller_pb2.ClassifyRequest(**{"model": "clip-vit-b-32", "images": images(tiny_png()),
                                                         **fields}),
               controller_pb2.ClassifyResponse)


def embed(**fields: Any) -> Rpc:
    return Rpc("controller", CONTROLLER + "Embed",
               lambda: controller_pb2.EmbedRequest(**{"model": "clip-vit-b-32", **fields}),
               controller_pb2.EmbedResponse)


def preprocess(recipe: Recipe = LETTERBOX, **fields: Any) -> Rpc:
    return Rpc("preprocess", "/inferline.v1.PreprocessService/Preprocess",
               lambda: preprocess_pb2.PreprocessRequest(recipe=recipe.to_proto(), **fields),
               preprocess_pb2.PreprocessResponse)


OIP_INFER = "/inference.GRPCInferenceService/ModelInfer"


def infer(tensor: tuple[Any, bytes] | None = None, min_score: float | None = None, **fields: Any) -> Rpc:
    """The inference stage's OIP ModelInfer: one input (a good 64x64 image unless given)."""
    def build() -> grpc_service_pb2.ModelInferRequest:
        request = grpc_service_pb2.ModelInferRequest(**{"model_name": "yolov8n", **fields})
        given, data = tensor or oip.input_tensor("images", np.zeros((1, 3, 64, 64), np.uint8))
        request.inputs.append(given)
        request.raw_input_contents.append(data)
        if min_score is not None:
            request.parameters[oip.MIN_SCORE].double_param = min_score
        return request

    return Rpc("inference", OIP_INFER, build, grpc_service_pb2.ModelInferResponse)


def oip_input(shape: list[int], data: bytes, datatype: str = "FP32") -> tuple[Any, bytes]:
    return oip.InputTensor(name="images", datatype=datatype, shape=shape), data


def embeddings(**fields: Any) -> Rpc:
    return Rpc("postprocess", "/inferline.v1.PostprocessService/Embeddings",
               lambda: postprocess_pb2.EmbeddingsRequest(**fields))


def postprocess(output: types_pb2.Tensor | None = None, transform: dict[str, float] | None = None) -> Rpc:
    def build() -> postprocess_pb2.PostprocessRequest:
        shape = {"orig_width": 64, "orig_height": 48, "input_width": 64, "input_height": 64, "scale_x": 1.0,
                 "scale_y": 1.0}
        item = postprocess_pb2.PostprocessItem(
            outputs=[output if output is not None else fp32(np.zeros((84, 10)), "output0")],
            transform=types_pb2.ImageTransform(**{**shape, **(transform or {})}),
        )
        return postprocess_pb2.PostprocessRequest(recipe=Recipe("yolo_detect", {}).to_proto(), items=[item])

    return Rpc("postprocess", "/inferline.v1.PostprocessService/Postprocess", build,
               postprocess_pb2.PostprocessResponse)


def render(box: tuple[float, float, float, float]) -> Rpc:
    def build() -> postprocess_pb2.RenderRequest:
        detection = types_pb2.Detection(label="x", score=0.5,
                                        box=types_pb2.Box(x1=box[0], y1=box[1], x2=box[2], y2=box[3]))
        item = postprocess_pb2.RenderItem(name="a", width=64, height=48, detections=[detection])
        return postprocess_pb2.RenderRequest(format=types_pb2.RENDER_FORMAT_JSON, items=[item])

    return Rpc("postprocess", "/inferline.v1.PostprocessService/Render", build)


def raw(stage: str, method: str, data: bytes) -> Rpc:
    return Rpc(stage, method, lambda: data)


CORRUPT = b"\xff\xff\xff\xff\x0f"  # a field tag whose varint never ends
BAD_UTF8_MODEL = b"\x0a\x02\xff\xfe"  # field 1 (model / name), two bytes that are not UTF-8
NAN = float("nan")
INF = float("inf")

CASES = [
    # The controller: counts, sizes and names before any stage is called.
    Case("1000 images, 9 MB", detect(images=images(*[tiny_png()] * 1000)), INVALID, "INFERLINE_MAX_BATCH_IMAGES", True),
    Case("1000 images, 70 MB (over the transport limit)", detect(images=over_transport_limit()),
         grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
    Case("model name of 100 KB", detect(model="m" * 100_000, images=images(tiny_png())), INVALID, "at most 255", True),
    Case("unknown model of 200 chars", detect(model="m" * 200, images=images(tiny_png())),
         grpc.StatusCode.NOT_FOUND, "is not served here"),
    Case("256 labels of 100 KB", classify(labels=[BIG_TEXT] * 256), INVALID, "INFERLINE_MAX_TEXT_BYTES", True),
    Case("300 labels", classify(labels=["a dog"] * 300), INVALID, "INFERLINE_MAX_LABELS"),
    Case("embed text of 100 KB", embed(texts=[BIG_TEXT]), INVALID, "INFERLINE_MAX_TEXT_BYTES"),
    Case("PNG of 7000x7000 (143 KB)", detect(images=images(*[png_7000()] * 8)), INVALID, "INFERLINE_MAX_IMAGE_PIXELS",
         True),
    Case("truncated JPEG", detect(images=images(truncated_jpeg())), INVALID, "could not be decoded"),
    Case("conf NaN", detect(images=images(tiny_png()), options=types_pb2.DetectOptions(conf=NAN)), INVALID,
         "conf must be"),
    Case("100,000 negative class ids",
         detect(images=images(tiny_png()), options=types_pb2.DetectOptions(classes=[-1] * 100_000)),
         INVALID, "class ids must be non-negative"),
    Case("cluster threshold 2", embed(texts=["a dog"], cluster=types_pb2.ClusterOptions(threshold=2)), INVALID,
         "threshold"),
    Case("corrupt protobuf", raw("controller", CONTROLLER + "Detect", CORRUPT),
         INVALID, "not a valid inferline.v1.DetectRequest"),
    Case("invalid UTF-8 in a string", raw("controller", CONTROLLER + "Detect", BAD_UTF8_MODEL),
         INVALID, "UTF-8"),
    # Preprocess, called directly: the same limits, whoever the caller is.
    Case("letterbox size 12000 on a 30 KB JPEG",
         preprocess(Recipe("letterbox", {"size": 12000}), images=images(jpeg_30kb())), INVALID,
         "INFERLINE_MAX_INPUT_SIDE", True),
    Case("clip_image size 12000", preprocess(Recipe("clip_image", {"size": 12000}), images=images(jpeg_30kb())),
         INVALID, "INFERLINE_MAX_INPUT_SIDE"),
    Case("letterbox stride 0", preprocess(Recipe("letterbox", {"size": 640, "stride": 0}), images=images(jpeg_30kb())),
         INVALID, "stride must be an integer in [1, 640]"),
    Case("letterbox pad_value 300", preprocess(Recipe("letterbox", {"pad_value": 300}), images=images(jpeg_30kb())),
         INVALID, "pad_value must be an integer in [0, 255]"),
    Case("letterbox size NaN", preprocess(Recipe("letterbox", {"size": NAN}), images=images(jpeg_30kb())), INVALID,
         "NaN"),
    Case("letterbox auto 'yes'", preprocess(Recipe("letterbox", {"auto": "yes"}), images=images(jpeg_30kb())),
         INVALID, "auto must be true or false"),
    Case("65 images", preprocess(images=images(*[tiny_png()] * 65)), INVALID, "INFERLINE_MAX_BATCH_IMAGES"),
    Case("5000 regions",
         preprocess(images=images(tiny_png()),
                    regions=[types_pb2.Region(image=0, box=types_pb2.Box(x2=8, y2=8))] * 5000),
         INVALID, "INFERLINE_MAX_REGIONS"),
    Case("region with a NaN box",
         preprocess(images=images(tiny_png()),
                    regions=[types_pb2.Region(image=0, box=types_pb2.Box(x1=NAN, x2=8, y2=8))]),
         INVALID, "finite"),
    Case("257 texts", preprocess(CLIP_TEXT, texts=["a dog"] * 257), INVALID, "INFERLINE_MAX_LABELS"),
    Case("256 texts of 100 KB", preprocess(CLIP_TEXT, texts=[BIG_TEXT] * 256), INVALID, "INFERLINE_MAX_TEXT_BYTES",
         True),
    Case("context_length 10^9", preprocess(Recipe("clip_tokenize", {"context_length": 1e9}), texts=["a dog"]),
         INVALID, "context_length"),
    Case("vocab naming another server file",
         preprocess(Recipe("clip_tokenize", {"vocab": "/etc/passwd"}), texts=["a dog"]),
         INVALID, "bpe_simple_vocab_16e6.txt.gz"),
    Case("PNG of 7000x7000, eight", preprocess(images=images(*[png_7000()] * 8)), INVALID, "INFERLINE_MAX_IMAGE_PIXELS",
         True),
    Case("recipe name of 100 KB", preprocess(Recipe("r" * 100_000), images=images(tiny_png())), INVALID,
         "unknown preprocess recipe"),
    Case("corrupt protobuf", raw("preprocess", "/inferline.v1.PreprocessService/Preprocess", CORRUPT),
         INVALID, "not a valid inferline.v1.PreprocessRequest"),
    # Inference, called directly.
    Case("shape overflowing int64", infer(oip_input([1, 2**62, 2**62, 4], b"")), INVALID,
         "larger than any message can carry"),
    Case("tensor bytes not shape x dtype", infer(oip_input([1, 3, 64, 64], b"abc", "UINT8")),
         INVALID, "needs 12288 bytes, got 3"),
    Case("unknown dtype", infer(oip_input([1], b"\0", "BF99")), INVALID, "supported: BOOL"),
    Case("min_score NaN", infer(min_score=NAN), INVALID, "min_score"),
    # OIP carries a batch as one tensor: 5000 items are a batch over the model's max_batch_size.
    Case("5000 items", infer(oip_input([5000, 3, 1, 1], b"\0" * 15000, "UINT8")),
         INVALID, "max_batch_size", True),
    Case("model name of 100 KB", infer(model_name="m" * 100_000), grpc.StatusCode.NOT_FOUND, "is not served here"),
    Case("invalid UTF-8 in a string", raw("inference", OIP_INFER, BAD_UTF8_MODEL),
         INVALID, "not a valid inference.ModelInferRequest"),
    # Postprocess, called directly.
    Case("20,000 embeddings", embeddings(images=[fp32(np.ones(512))] * 20_000), INVALID, "INFERLINE_MAX_EMBEDDINGS",
         True),
    Case("embeddings of 100,000 dimensions", embeddings(images=[fp32(np.ones(100_000))]),
         INVALID, "INFERLINE_MAX_EMBEDDING_DIM"),
    Case("NaN embedding", embeddings(images=[fp32([NAN] * 512)]), INVALID, "NaN"),
    Case("clustering 2000 embeddings",
         embeddings(images=[fp32(np.ones(512))] * 2000, cluster=types_pb2.ClusterOptions(threshold=0.9)),
         INVALID, "INFERLINE_MAX_CLUSTER_ITEMS"),
    Case("infinite logit_scale",
         embeddings(images=[fp32(np.ones(4))], texts=[fp32(np.ones(4))], logit_scale=INF, top_k=1),
         INVALID, "logit_scale"),
    Case("NaN boxes and scores from a model", postprocess(fp32(np.full((84, 10), NAN), "output0")), INVALID, "NaN"),
    Case("transform with a NaN scale", postprocess(transform={"scale_x": NAN}), INVALID, "finite"),
    Case("render a NaN box", render((NAN, 0, 1, 1)), INVALID, "NaN"),
    Case("corrupt protobuf", raw("postprocess", "/inferline.v1.PostprocessService/Embeddings", CORRUPT),
         INVALID, "not a valid inferline.v1.EmbeddingsRequest"),
]


# ---- the stack under test ------------------------------------------------------------------


def open_clients(addresses: dict[str, str]) -> Clients:
    return Clients({stage: grpc.insecure_channel(address,
                                                 options=CHANNEL_OPTIONS) for stage, address in addresses.items()})


@pytest.fixture(scope="module")
def clients(stack) -> Iterator[Clients]:
    opened = open_clients({stage: stack.servers[stage].address for stage in STAGES})
    yield opened
    for channel in opened.channels.values():
        channel.close()


def good_detect(c: Clients) -> controller_pb2.DetectResponse:
    return c.controller.Detect(controller_pb2.DetectRequest(model="yolov8n", images=images(tiny_png())), timeout=T)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.target}: {c.id}" for c in CASES])
def test_bad_input_is_refused_with_one_status_fast_and_small_while_good_requests_succeed(clients, case):
    with ThreadPoolExecutor(2) as pool:
        good = [pool.submit(good_detect, clients) for _ in range(2)]
        outcome = measured(case.rpc, clients)
        answers = [future.result() for future in good]
    assert outcome.code is case.code, outcome
    assert case.needle in outcome.message, outcome
    assert len(outcome.message) <= SHORT_MESSAGE, outcome
    assert outcome.seconds < REFUSE_WITHIN_S, outcome
    assert outcome.work_bytes < REFUSE_UNDER_BYTES, outcome
    assert all(item_failure(answer)[0] is grpc.StatusCode.OK for answer in answers)
    assert clients.serving(case.target)


# ---- the gateway: its own input parsing, and the controller's answers through the one table ----


@dataclass(frozen=True)
class HttpCase:
    id: str
    # The request as the client has it: its body is encoded before the clock starts (the
    # client's work, not the gateway's; 1000 multipart parts take a loaded CI machine ~0.5 s).
    build: Callable[[httpx.Client], httpx.Request]
    status: int
    code: str
    needle: str


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def upload(*datas: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"image{i}.png", data, "image/png")) for i, data in enumerate(datas)]


def post(h: httpx.Client, path: str, **kwargs: Any) -> httpx.Request:
    return h.build_request("POST", path, **kwargs)


HTTP_CASES = [
    HttpCase("1000 images, multipart", lambda h: post(h, "/v1/detect", files=upload(*[tiny_png()] * 1000)), 400,
             "INVALID_ARGUMENT", "INFERLINE_MAX_BATCH_IMAGES"),
    HttpCase("1000 images, JSON",
             lambda h: post(h, "/v1/detect", json={"images": [{"data": b64(tiny_png())}] * 1000}),
             400, "INVALID_ARGUMENT", "INFERLINE_MAX_BATCH_IMAGES"),
    HttpCase("model name of 100 KB",
             lambda h: post(h, "/v1/detect", json={"model": "m" * 100_000, "images": [{"data": b64(tiny_png())}]}),
             400, "INVALID_ARGUMENT", "model"),
    HttpCase("256 labels of 100 KB",
             lambda h: post(h, "/v1/classify", json={"labels": [BIG_TEXT.replace(",", " ")] * 256,
                                                     "images": [{"data": b64(tiny_png())}]}),
             400, "INVALID_ARGUMENT", "INFERLINE_MAX_TEXT_BYTES"),
    HttpCase("PNG of 7000x7000", lambda h: post(h, "/v1/detect", files=upload(png_7000())), 400, "INVALID_ARGUMENT",
             "INFERLINE_MAX_IMAGE_PIXELS"),
    HttpCase("truncated JPEG", lambda h: post(h, "/v1/detect", files=upload(truncated_jpeg())), 400,
             "INVALID_ARGUMENT", "could not be decoded"),
    HttpCase("timeout header of 5 KB",
             lambda h: post(h, "/v1/detect", files=upload(tiny_png()), headers={"x-request-timeout": "9" * 5000}),
             400, "INVALID_ARGUMENT", "X-Request-Timeout"),
    HttpCase("path of 5 KB", lambda h: h.build_request("GET", "/v1/" + "p" * 5000), 404, "NOT_FOUND",
             "no such endpoint"),
    HttpCase("content type of 5 KB",
             lambda h: post(h, "/v1/detect", content=b"x", headers={"content-type": "a/" + "b" * 5000}),
             415, "INVALID_ARGUMENT", "Content-Type"),
    HttpCase("JSON that does not parse",
             lambda h: post(h, "/v1/detect", content=b"{" + b"x" * 5000, headers={"content-type": "application/json"}),
             400, "INVALID_ARGUMENT", "JSON"),
]


@pytest.fixture(scope="module")
def gateway(stack) -> Iterator[RunningGateway]:
    running = RunningGateway(stack.settings, stack.controller)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def http(gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=T) as client:
        yield client


@pytest.mark.parametrize("case", HTTP_CASES, ids=[c.id for c in HTTP_CASES])
def test_bad_http_input_is_refused_with_a_short_problem_while_good_requests_succeed(http, clients, case):
    with ThreadPoolExecutor(2) as pool:
        good = [pool.submit(http.post, "/v1/detect", files=upload(tiny_png())) for _ in range(2)]
        request = case.build(http)
        request.read()
        started = time.perf_counter()
        response = http.send(request)
        seconds = time.perf_counter() - started
        answers = [future.result() for future in good]
    assert response.status_code == case.status, response.text[:500]
    problem = response.json()
    assert problem["code"] == case.code
    assert case.needle in problem["detail"], problem
    assert len(problem["detail"]) <= SHORT_MESSAGE, problem
    assert seconds < REFUSE_WITHIN_S
    assert [a.status_code for a in answers] == [200, 200]
    assert http.get("/healthz").status_code == 200 and clients.serving("controller")


def test_a_corrupt_streaming_request_is_invalid_argument_too(clients):
    """Health's Watch (server streaming) goes through the same parse check as unary methods."""
    for stage in STAGES:
        watch = clients.channels[stage].unary_stream(
            "/grpc.health.v1.Health/Watch", request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        with pytest.raises(grpc.RpcError) as raised:
            next(iter(watch(CORRUPT, timeout=T)))
        assert raised.value.code() is INVALID, stage
        assert "not a valid grpc.health.v1.HealthCheckRequest" in raised.value.details()
        replies = watch(health_pb2.HealthCheckRequest().SerializeToString(), timeout=T)
        assert (
            health_pb2.HealthCheckResponse.FromString(next(iter(replies))).status
            == health_pb2.HealthCheckResponse.SERVING
        )
        replies.cancel()


def test_a_long_path_is_cut_in_the_access_log(http, caplog):
    with caplog.at_level("INFO", logger="inferline.gateway.access"):
        http.get("/v1/" + "p" * 60_000)
    lines = [r.getMessage() for r in caplog.records if "-> 404" in r.getMessage()]
    assert lines and all(len(line) < SHORT_MESSAGE for line in lines), lines


# ---- fuzzing: random bytes and random field values never get UNKNOWN or INTERNAL ----------

FUZZ = hypothesis_settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
METHODS = {
    "controller": [("/inferline.v1.ControllerService/" + m) for m in ("Detect", "Classify", "Embed", "ModelInfo")],
    "preprocess": ["/inferline.v1.PreprocessService/Preprocess"],
    "inference": [
        ("/inference.GRPCInferenceService/" + m) for m in ("ModelInfer", "ModelMetadata", "ModelReady", "ModelConfig")
    ],
    "postprocess": [("/inferline.v1.PostprocessService/" + m) for m in ("Postprocess", "Render", "Embeddings")],
}
ALL_METHODS = [(stage, method) for stage, methods in METHODS.items() for method in methods]


def code_of(call: Callable[[], Any]) -> tuple[grpc.StatusCode, list[grpc.StatusCode]]:
    """The call's code and its items' codes."""
    try:
        response = call()
    except grpc.RpcError as exc:
        return exc.code(), []
    items = [
        next(c for c in grpc.StatusCode if c.value[0] == item.status.code)
        for field in ("results", "images", "texts")
        for item in getattr(response, field, ())
        if hasattr(item, "status")
    ]
    return grpc.StatusCode.OK, items


@FUZZ
@given(target=st.sampled_from(ALL_METHODS), data=st.binary(max_size=512))
def test_random_bytes_to_any_method_are_never_unknown_or_internal(clients, target, data):
    stage, method = target
    code, _ = code_of(lambda: clients.raw(stage, method)(data, timeout=T))
    assert code not in NEVER, (stage, method, data)
    assert clients.serving(stage)


FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)
PARAM_VALUES = st.one_of(st.integers(-(2**40), 2**40), st.floats(), st.booleans(),
                         st.text(max_size=20), st.lists(st.integers(-5, 5000), max_size=3))
RECIPES = st.sampled_from(["letterbox", "clip_image", "rgb", "clip_tokenize", "nope"])


@st.composite
def garbled_image(draw: st.DrawFn) -> bytes:
    """A real JPEG or PNG, cut short or with bytes of its header overwritten."""
    data = bytearray(draw(st.sampled_from([jpeg_30kb(), tiny_png(), encoded(40, 30, ".webp"),
                                           encoded(20, 20, ".bmp")])))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    for _ in range(draw(st.integers(0, 4))):
        if data:
            data[draw(st.integers(0, min(len(data), 300) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@FUZZ
@given(
    recipe=RECIPES,
    params=st.dictionaries(st.sampled_from(["size", "stride", "auto", "scaleup", "pad_value", "context_length",
                                            "resize_mode", "interpolation", "fill_color", "tokenizer", "vocab"]),
                           PARAM_VALUES, max_size=3),
    pictures=st.lists(garbled_image(), max_size=3),
    texts=st.lists(st.text(max_size=40), max_size=3),
    boxes=st.lists(st.tuples(st.integers(-2, 3), FLOATS, FLOATS, FLOATS, FLOATS), max_size=3),
)
def test_random_preprocess_requests_are_never_unknown_or_internal(clients, recipe, params, pictures, texts, boxes):
    regions = [types_pb2.Region(image=i, box=types_pb2.Box(x1=a, y1=b, x2=c, y2=d)) for i, a, b, c, d in boxes]
    request = preprocess_pb2.PreprocessRequest(recipe=Recipe(recipe, params).to_proto(), images=images(*pictures),
                                               texts=texts, regions=regions)
    code, items = code_of(lambda: clients.preprocess.Preprocess(request, timeout=T))
    assert code not in NEVER and not NEVER & set(items), (code, items)


TENSORS = st.builds(
    types_pb2.Tensor,
    name=st.text(max_size=10),
    datatype=st.integers(0, 12),
    shape=st.lists(st.integers(0, 2**62), max_size=4),
    data=st.binary(max_size=64),
)


@FUZZ
@given(
    outputs=st.lists(TENSORS, max_size=2),
    floats=st.lists(FLOATS, min_size=4, max_size=4),
    sizes=st.lists(st.integers(-3, 10**6), min_size=4, max_size=4),
    embedding=st.lists(FLOATS, min_size=1, max_size=8),
    cluster=st.tuples(st.integers(-2, 10), FLOATS),
)
def test_random_postprocess_and_inference_requests_are_never_unknown_or_internal(
    clients, outputs, floats, sizes, embedding, cluster
):
    transform = types_pb2.ImageTransform(orig_width=sizes[0], orig_height=sizes[1], input_width=sizes[2],
                                         input_height=sizes[3],
                                         scale_x=floats[0], scale_y=floats[1], pad_x=floats[2], pad_y=floats[3])
    for recipe in ("yolo_detect", "torchvision_detect"):
        request = postprocess_pb2.PostprocessRequest(
            recipe=Recipe(recipe, {}).to_proto(),
            items=[postprocess_pb2.PostprocessItem(outputs=outputs, transform=transform)]
        )
        code, items = code_of(partial(clients.postprocess.Postprocess, request, timeout=T))
        assert code not in NEVER and not NEVER & set(items), (recipe, code, items)
    vectors = [fp32(embedding), *outputs]
    request = postprocess_pb2.EmbeddingsRequest(images=vectors, texts=vectors[:1], logit_scale=floats[0], top_k=1,
                                                cluster=types_pb2.ClusterOptions(k=cluster[0], threshold=cluster[1]))
    code, _ = code_of(lambda: clients.postprocess.Embeddings(request, timeout=T))
    assert code not in NEVER, code
    request = grpc_service_pb2.ModelInferRequest(model_name="yolov8n")
    for output in outputs:  # the same random tensors, as OIP inputs with raw contents
        name = types_pb2.DataType.Name(output.datatype) if output.datatype in types_pb2.DataType.values() else "X"
        request.inputs.add(name=output.name, datatype=name.removeprefix("DATA_TYPE_"), shape=output.shape)
        request.raw_input_contents.append(output.data)
    request.parameters[oip.MIN_SCORE].double_param = floats[0]
    code, items = code_of(lambda: clients.inference.ModelInfer(request, timeout=T))
    assert code not in NEVER and not NEVER & set(items), (code, items)
    assert clients.serving("postprocess") and clients.serving("inference")


# ---- memory on real processes: every allocation counts, whatever library made it -----------


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no {field}")


def peak_rss_growth(pid: int, call: Callable[[], Any]) -> tuple[int, Any]:
    """Bytes the process's peak RSS rose above its RSS before ``call``: writing 5 to
    clear_refs resets VmHWM to the current RSS (Linux >= 4.0)."""
    before = _status_kb(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    result = call()
    return (_status_kb(pid, "VmHWM") - before) * 1024, result


# A process receiving a message holds it in gRPC core's buffers, as Python bytes (assembled
# from a copy) and as the parsed message: about 4x its size at the peak, measured; see
# docs/reliability-validation.md. That is bounded by INFERLINE_MAX_MESSAGE_MB before our code runs.
PROCESS_RECEIVE_COPIES = 4


@pytest.fixture(scope="module")
def processes(model_dir, clip_weights, tmp_path_factory) -> Iterator[Any]:
    stages = Stages.start(stage_env(model_dir, clip_weights.parent, INFERLINE_MODELS="yolov8n"),
                          tmp_path_factory.mktemp("bad-input"))
    yield stages
    stages.stop()


ABSURD = [case for case in CASES if case.absurd]


def _timed_call(send: Callable[..., bytes], payload: bytes, response: Any) -> tuple[grpc.StatusCode, float]:
    """The code of one raw call (its first failed item's, when the response has items) and its seconds."""
    started = time.perf_counter()
    try:
        answer = send(payload, timeout=T)
        code = item_failure(response.FromString(answer))[0] if response else grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code = exc.code()
    return code, time.perf_counter() - started


@pytest.mark.slow
def test_absurd_requests_cost_each_stage_process_under_50_mb_and_a_second(processes):
    clients = open_clients({stage: processes.target(stage) for stage in STAGES})
    measurements = []
    try:
        for case in ABSURD:
            payload = case.rpc.payload()
            call = partial(_timed_call, clients.raw(case.rpc.stage, case.rpc.method), payload, case.rpc.response)
            growth, (code, seconds) = peak_rss_growth(processes.processes[case.target].pid, call)
            measurements.append((case.target, case.id, code.name, round(seconds, 3), round(growth / 2**20, 1),
                                 round(len(payload) / 2**20, 1)))
            assert code is case.code, measurements[-1]
            assert seconds < REFUSE_WITHIN_S, measurements[-1]
            assert growth - PROCESS_RECEIVE_COPIES * len(payload) < REFUSE_UNDER_BYTES, measurements[-1]
            assert clients.serving(case.target)
    finally:
        print("\nstage | case | code | seconds | peak RSS growth MiB | request MiB")
        for row in measurements:
            print(" | ".join(map(str, row)))
        for channel in clients.channels.values():
            channel.close()


@FUZZ
@given(
    model=st.sampled_from(["yolov8n", "fasterrcnn-mobilenet-v3-large-320-fpn", "clip-vit-b-32", "", "nope"]),
    pictures=st.lists(garbled_image(), max_size=2),
    conf=st.one_of(st.none(), FLOATS),
    max_det=st.one_of(st.none(), st.integers(-5, 2**31 - 1)),
    classes=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=3),
    classify_with=st.sampled_from(["", "clip-vit-b-32", "yolov8n"]),
    labels=st.lists(st.text(max_size=30), max_size=3),
    top_k=st.integers(-3, 5),
)
def test_random_controller_requests_are_never_unknown_or_internal(
    clients, model, pictures, conf, max_det, classes, classify_with, labels, top_k
):
    options = types_pb2.DetectOptions(classes=classes)
    if conf is not None:
        options.conf = conf
    if max_det is not None:
        options.max_det = max_det
    calls = [
        lambda: clients.controller.Detect(
            controller_pb2.DetectRequest(
                model=model, images=images(*pictures), options=options, classify_with=classify_with, labels=labels
            ),
            timeout=T,
        ),
        lambda: clients.controller.Classify(
            controller_pb2.ClassifyRequest(model=model, images=images(*pictures), labels=labels, top_k=top_k), timeout=T
        ),
        lambda: clients.controller.Embed(
            controller_pb2.EmbedRequest(model=model, images=images(*pictures), texts=labels), timeout=T
        ),
    ]
    for call in calls:
        code, items = code_of(call)
        assert code not in NEVER and not NEVER & set(items), (code, items)
    assert clients.serving("controller")


# ---- the limits are settings: each one moves the line where the refusal starts -------------

LIMIT_CASES = [
    ("max_input_side", 320, preprocess(Recipe("letterbox", {"size": 640}), images=images(tiny_png())),
     "INFERLINE_MAX_INPUT_SIDE"),
    ("max_batch_images", 2, preprocess(images=images(*[tiny_png()] * 3)), "INFERLINE_MAX_BATCH_IMAGES"),
    ("max_regions", 2,
     preprocess(images=images(tiny_png()), regions=[types_pb2.Region(image=0, box=types_pb2.Box(x2=8, y2=8))] * 3),
     "INFERLINE_MAX_REGIONS"),
    ("max_text_bytes", 100, preprocess(CLIP_TEXT, texts=["a photo " * 15]), "text is 120 bytes, over the limit of 100"),
    ("max_labels", 1, preprocess(CLIP_TEXT, texts=["a", "b"]), "INFERLINE_MAX_LABELS"),
    ("max_image_pixels", 3000, preprocess(images=images(tiny_png())), "INFERLINE_MAX_IMAGE_PIXELS"),
    ("max_embeddings", 2, embeddings(images=[fp32(np.ones(4))] * 3), "INFERLINE_MAX_EMBEDDINGS"),
    ("max_embedding_dim", 3, embeddings(images=[fp32(np.ones(4))]), "INFERLINE_MAX_EMBEDDING_DIM"),
    ("max_cluster_items", 2, embeddings(images=[fp32(np.ones(4))] * 3, cluster=types_pb2.ClusterOptions(k=2)),
     "INFERLINE_MAX_CLUSTER_ITEMS"),
]


@pytest.mark.parametrize(("field", "value", "rpc", "needle"), LIMIT_CASES, ids=[c[0] for c in LIMIT_CASES])
def test_each_limit_is_read_from_its_setting(settings, field, value, rpc, needle):
    assert Settings.from_env({f"INFERLINE_{field.upper()}": str(value)}) == dataclasses.replace(
        Settings(), **{field: value}
    )
    with stage_channel(rpc.stage, dataclasses.replace(settings, **{field: value})) as channel:
        clients = Clients({rpc.stage: channel})
        outcome = measured(rpc, clients)
    assert outcome.code is INVALID and needle in outcome.message, outcome
