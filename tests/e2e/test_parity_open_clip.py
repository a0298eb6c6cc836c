"""CLIP through the four services equals open_clip's own encode_image / encode_text."""

from __future__ import annotations

import grpc
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from inferline.common.generated import controller_pb2, controller_pb2_grpc, types_pb2

TEXTS = ["a photo of a circle", "a red triangle", "a blue square", "a star", "a bus on a street", "two people"]


@pytest.fixture(scope="module")
def reference(clip_weights):
    # As open_clip loads OpenAI's weights (pretrained="openai"): with QuickGELU, as our config does.
    model, _, preprocess = open_clip.create_model_and_transforms(
        "ViT-B-32", pretrained=str(clip_weights), force_quick_gelu=True
    )
    model.eval()
    return model, preprocess, open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="module")
def stub(stack):
    with grpc.insecure_channel(stack.controller) as channel:
        yield controller_pb2_grpc.ControllerServiceStub(channel)


def _normalise(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x.float(), dim=-1).numpy()


def _images(paths):
    return [types_pb2.Image(data=p.read_bytes(), name=p.name) for p in paths]


def test_image_and_text_embeddings_match_open_clip(stub, reference, sample_images):
    model, preprocess, tokenizer = reference
    response = stub.Embed(controller_pb2.EmbedRequest(model="clip-vit-b-32", images=_images(sample_images),
                                                      texts=TEXTS), timeout=120)
    ours_images = np.array([list(i.embedding) for i in response.images])
    ours_texts = np.array([list(t.embedding) for t in response.texts])
    with torch.no_grad():
        theirs_images = _normalise(model.encode_image(torch.stack([preprocess(Image.open(p)) for p in sample_images])))
        theirs_texts = _normalise(model.encode_text(tokenizer(TEXTS)))
    np.testing.assert_allclose(np.linalg.norm(ours_images, axis=1), 1.0, atol=1e-5)
    image_cosines = (ours_images * theirs_images).sum(axis=1)
    text_cosines = (ours_texts * theirs_texts).sum(axis=1)
    # The README's claim: cosine > 0.999999 (measured on the stand-in: 1 - cosine <= 5.6e-8).
    assert image_cosines.min() > 0.999999, 1 - image_cosines
    assert text_cosines.min() > 0.999999, 1 - text_cosines


def test_zero_shot_top1_matches_open_clip(stub, reference, sample_images):
    model, preprocess, tokenizer = reference
    response = stub.Classify(
        controller_pb2.ClassifyRequest(model="clip-vit-b-32", images=_images(sample_images), labels=TEXTS), timeout=120
    )
    with torch.no_grad():
        images = torch.nn.functional.normalize(
            model.encode_image(torch.stack([preprocess(Image.open(p)) for p in sample_images])), dim=-1
        )
        texts = torch.nn.functional.normalize(model.encode_text(tokenizer(TEXTS)), dim=-1)
        probabilities = (model.logit_scale.exp() * images @ texts.T).softmax(dim=-1).numpy()
    for result, expected in zip(response.results, probabilities, strict=True):
        assert [ls.label for ls in result.labels][0] == TEXTS[int(expected.argmax())]
        assert len(result.labels) == len(TEXTS), "top_k 0 returns every label"
        ours = {ls.label: ls.score for ls in result.labels}
        np.testing.assert_allclose([ours[t] for t in TEXTS], expected, atol=2e-3)
