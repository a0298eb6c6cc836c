"""Many models behind one controller: Classify, Embed, composed Detect, errors, no state leaks."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from inferline.common.generated import controller_pb2, controller_pb2_grpc, inference_pb2, types_pb2
from tests.support.images import encoded

FRCNN = "fasterrcnn-mobilenet-v3-large-320-fpn"
CLIP = "clip-vit-b-32"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
LABELS = ["a circle", "a triangle", "a square", "a star"]


@pytest.fixture(scope="module")
def stub(stack):
    with grpc.insecure_channel(stack.controller) as channel:
        yield controller_pb2_grpc.ControllerServiceStub(channel)


def _images(*datas: bytes) -> list[types_pb2.Image]:
    return [types_pb2.Image(data=d, name=f"img{i}") for i, d in enumerate(datas)]


def test_all_three_families_are_listed_with_their_tasks(stub):
    models = {m.name: m.task for m in stub.ListModels(inference_pb2.ListModelsRequest(), timeout=10).models}
    assert models == {
        "yolov8n": "detect",
        "yolov8n-seg": "segment",
        FRCNN: "detect",
        CLIP: "embed",
        f"{CLIP}-text": "embed",
    }


def test_model_info_describes_one_model_and_not_found_names_it(stub):
    info = stub.ModelInfo(inference_pb2.ModelMetadataRequest(name=CLIP), timeout=10)
    assert info.task == "embed" and info.inputs[0].name == "images"
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfo(inference_pb2.ModelMetadataRequest(name="nope"), timeout=10)
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND


def test_classify_returns_top_k_labels_best_first_with_probabilities(stub, data_dir):
    response = stub.Classify(
        controller_pb2.ClassifyRequest(
            model=CLIP, images=_images((data_dir / "shapes_01.jpg").read_bytes(), b"broken"), labels=LABELS, top_k=2
        ),
        timeout=60,
    )
    good, bad = response.results
    assert len(good.labels) == 2 and good.labels[0].score >= good.labels[1].score
    assert {ls.label for ls in good.labels} <= set(LABELS)
    assert bad.status.code == INVALID.value[0] and not bad.labels


def test_embed_returns_unit_vectors_and_clusters(stub, data_dir):
    one = (data_dir / "shapes_01.jpg").read_bytes()
    response = stub.Embed(
        controller_pb2.EmbedRequest(
            model=CLIP, images=_images(one, one, (data_dir / "shapes_02.jpg").read_bytes()), texts=["a circle"],
            cluster=types_pb2.ClusterOptions(threshold=0.999),
        ),
        timeout=60,
    )
    assert [len(i.embedding) for i in response.images] == [512, 512, 512] and len(response.texts[0].embedding) == 512
    clusters = list(response.clusters)
    assert len(clusters) == 4 and clusters[0] == clusters[1], "identical images are near-duplicates"
    kmeans = stub.Embed(
        controller_pb2.EmbedRequest(model=CLIP, images=_images(one, one), cluster=types_pb2.ClusterOptions(k=1)),
        timeout=60,
    )
    assert list(kmeans.clusters) == [0, 0]


def test_detect_can_relabel_boxes_with_clip_in_one_call(stub, data_dir):
    request = controller_pb2.DetectRequest(
        model="yolov8n", images=_images((data_dir / "shapes_04.jpg").read_bytes()), classify_with=CLIP, labels=LABELS
    )
    response = stub.Detect(request, timeout=120)
    detections = response.results[0].detections
    assert detections and all(d.zero_shot.label in LABELS and 0 < d.zero_shot.score <= 1 for d in detections)
    assert {"crop_preprocess", "crop_inference", "text_inference"} <= set(response.timings_ms)


@pytest.mark.parametrize(
    ("call", "request_", "code", "message"),
    [
        ("Detect", controller_pb2.DetectRequest(model=CLIP, images=_images(encoded())), INVALID,
         "is a embed model; Detect needs a detect model"),
        ("Classify", controller_pb2.ClassifyRequest(model="yolov8n", images=_images(encoded()), labels=["a"]), INVALID,
         "is a detect model"),
        ("Classify", controller_pb2.ClassifyRequest(model="yolov8n-seg", images=_images(encoded()), labels=["a"]),
         INVALID, "is a segment model"),
        ("Classify", controller_pb2.ClassifyRequest(model=CLIP, images=_images(encoded())), INVALID,
         "labels are required"),
        ("Classify", controller_pb2.ClassifyRequest(model=CLIP, images=_images(encoded()), labels=["ok", " "]), INVALID,
         "must not be empty"),
        ("Classify", controller_pb2.ClassifyRequest(model=CLIP, images=_images(encoded()), labels=["x"] * 257), INVALID,
         "over the limit of 256"),
        ("Classify", controller_pb2.ClassifyRequest(model=CLIP, images=_images(encoded()), labels=["word " * 100]),
         INVALID, "the model takes at most 77"),
        ("Classify", controller_pb2.ClassifyRequest(model="nope", images=_images(encoded()), labels=["a"]),
         grpc.StatusCode.NOT_FOUND, "'nope'"),
        ("Embed", controller_pb2.EmbedRequest(model=CLIP), INVALID, "nothing to embed"),
        ("Embed", controller_pb2.EmbedRequest(model=CLIP, texts=["a"], cluster=types_pb2.ClusterOptions(k=3)), INVALID,
         "cluster.k=3"),
        ("Embed", controller_pb2.EmbedRequest(model="yolov8n", texts=["a"]), INVALID, "is a detect model"),
        ("Detect", controller_pb2.DetectRequest(model="yolov8n", images=_images(encoded()), classify_with=CLIP),
         INVALID, "labels are required"),
        ("Detect", controller_pb2.DetectRequest(model="yolov8n", images=_images(encoded()), labels=["a"]), INVALID,
         "set classify_with"),
    ],
)
def test_wrong_requests_get_actionable_statuses(stub, call, request_, code, message):
    with pytest.raises(grpc.RpcError) as raised:
        getattr(stub, call)(request_, timeout=60)
    assert raised.value.code() is code
    assert message in raised.value.details()


def test_embed_reports_an_over_long_text_on_its_own_item(stub):
    response = stub.Embed(controller_pb2.EmbedRequest(model=CLIP, texts=["fine", "word " * 100]), timeout=60)
    assert response.texts[0].status.code == 0 and len(response.texts[0].embedding) == 512
    assert response.texts[1].status.code == INVALID.value[0] and "at most 77" in response.texts[1].status.message


def test_interleaved_concurrent_requests_to_all_families_match_each_alone(stub, data_dir):
    image = (data_dir / "shapes_03.jpg").read_bytes()

    def detect(model):
        response = stub.Detect(controller_pb2.DetectRequest(model=model, images=_images(image)), timeout=120)
        return [(d.label, round(d.score, 4)) for d in response.results[0].detections]

    def classify():
        response = stub.Classify(
            controller_pb2.ClassifyRequest(model=CLIP, images=_images(image), labels=LABELS), timeout=120
        )
        return [(ls.label, round(ls.score, 4)) for ls in response.results[0].labels]

    calls = {"yolo": lambda: detect("yolov8n"), "frcnn": lambda: detect(FRCNN), "clip": classify}
    alone = {name: call() for name, call in calls.items()}
    order = [name for _ in range(4) for name in calls]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda name: (name, calls[name]()), order))
    for name, result in together:
        assert result == alone[name], name


def test_embed_ranks_the_images_for_each_text(stub, data_dir):
    images = _images(*[(data_dir / f"shapes_0{i}.jpg").read_bytes() for i in (1, 2, 3)])
    response = stub.Embed(
        controller_pb2.EmbedRequest(model=CLIP, images=images, texts=["a circle", "a star"]), timeout=60
    )
    assert [r.text for r in response.rankings] == ["a circle", "a star"]
    for ranking in response.rankings:
        assert sorted(ranking.images) == [0, 1, 2]
        assert list(ranking.scores) == sorted(ranking.scores, reverse=True)


def test_bad_requests_interleaved_with_good_ones_disturb_nothing(stub, data_dir):
    image = (data_dir / "shapes_05.jpg").read_bytes()
    good = controller_pb2.ClassifyRequest(model=CLIP, images=_images(image), labels=LABELS)
    expected = [ls.label for ls in stub.Classify(good, timeout=120).results[0].labels]
    bad = [
        controller_pb2.ClassifyRequest(model=CLIP, images=_images(image), labels=[]),
        controller_pb2.ClassifyRequest(model=CLIP, images=_images(image), labels=["word " * 100]),
        controller_pb2.ClassifyRequest(model="nope", images=_images(image), labels=LABELS),
        controller_pb2.ClassifyRequest(model="yolov8n", images=_images(image), labels=LABELS),
    ]

    def call(i: int):
        if i % 2:
            try:
                stub.Classify(bad[(i // 2) % len(bad)], timeout=120)
            except grpc.RpcError as exc:
                return exc.code()
            return None
        return [ls.label for ls in stub.Classify(good, timeout=120).results[0].labels]

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(call, range(12)))
    assert all(o == expected for o in outcomes[0::2])
    assert all(o in (INVALID, grpc.StatusCode.NOT_FOUND) for o in outcomes[1::2])
