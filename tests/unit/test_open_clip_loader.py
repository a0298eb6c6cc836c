"""The open_clip towers, served through our loaders, must embed as open_clip itself does.

Reference: ``open_clip.create_model_and_transforms("ViT-B-32", pretrained=<stand-in>)`` with its
own preprocess (PIL) and tokenizer. Ours: common/images.py decoding, the clip_image and
clip_tokenize recipes, and the loaders' forward through TorchBackend, as the services run them.
The stand-in has random weights: it proves parity, nothing about accuracy.
"""

from __future__ import annotations

import gc
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from inferline.common.errors import InvalidInput, WeightsError
from inferline.common.images import decode_image
from inferline.services.inference.backends import open_clip_loader
from inferline.services.inference.backends.open_clip_loader import (
    load_open_clip_image,
    load_open_clip_text,
    shared_open_clip_module,
)
from inferline.services.inference.backends.torch_backend import LOADERS, TorchBackend
from inferline.services.inference.repository import BUILTIN_REPOSITORY, ModelConfig, load_config
from inferline.services.preprocess.clip_recipes import clip_image, clip_tokenize

CPU = torch.device("cpu")
# The architecture as create_model_and_transforms("ViT-B-32", pretrained=path) builds it.
PLAIN = {"architecture": "ViT-B-32"}
TEXTS = [
    "a photo of a cat",
    "a diagram",
    "Hello, world!!! & <html>",
    "Café crème, 日本語, 🙂",
    " ".join(["a"] * 75),  # the longest text that fits
    "x",
]


@pytest.fixture(scope="module")
def reference(clip_weights: Path):
    """open_clip's own model, eval transform and tokenizer for the stand-in (loaded once)."""
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=str(clip_weights))
    return model.eval(), preprocess, open_clip.get_tokenizer("ViT-B-32")


def _config(name: str, **parameters) -> ModelConfig:
    config = load_config(BUILTIN_REPOSITORY / name / "config.yaml")
    return replace(config, parameters=parameters or dict(PLAIN))


@pytest.fixture(scope="module")
def towers(clip_weights: Path):
    image = load_open_clip_image(clip_weights, CPU, _config("clip-vit-b-32"))
    text = load_open_clip_text(clip_weights, CPU, _config("clip-vit-b-32-text"))
    yield TorchBackend(image, CPU), TorchBackend(text, CPU)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _our_images(paths: list[Path]) -> tuple[np.ndarray, list[np.ndarray]]:
    decoded = [decode_image(p.read_bytes(), max_pixels=100_000_000) for p in paths]
    return np.stack([clip_image(bgr, {"size": 224})[0] for bgr in decoded]), decoded


def _reference_images(model, preprocess, decoded: list[np.ndarray]) -> np.ndarray:
    pixels = torch.stack([preprocess(Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1]))) for bgr in decoded])
    with torch.inference_mode():
        return model.encode_image(pixels).numpy()


def test_loaders_registered():
    assert "open_clip_image" in LOADERS and "open_clip_text" in LOADERS


def test_image_embeddings_equal_open_clip(towers, reference, data_dir: Path):
    image_backend, _ = towers
    model, preprocess, _ = reference
    paths = sorted(data_dir.glob("*.jpg"))
    batch, decoded = _our_images(paths)
    ours = np.stack([item["embedding"] for item in image_backend.run({"images": batch})])
    expected = _reference_images(model, preprocess, decoded)
    assert ours.shape == (len(paths), 512) and ours.dtype == np.float32
    assert _cosines(ours, expected).min() >= 0.9999
    # Same pixels, same floats, same module, same batch: in practice identical.
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)


def test_text_embeddings_equal_open_clip(towers, reference):
    _, text_backend = towers
    model, _, tokenizer = reference
    tokens = np.stack([clip_tokenize(text, {"context_length": 77}) for text in TEXTS])
    ours = np.stack([item["embedding"] for item in text_backend.run({"tokens": tokens})])
    with torch.inference_mode():
        expected = model.encode_text(tokenizer(TEXTS)).numpy()
    assert ours.shape == (len(TEXTS), 512) and ours.dtype == np.float32
    assert _cosines(ours, expected).min() >= 0.9999
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)


def test_towers_share_one_module_with_open_clips_weights(clip_weights: Path, towers, reference):
    image_module = shared_open_clip_module(clip_weights, CPU, _config("clip-vit-b-32"))
    text_module = shared_open_clip_module(clip_weights, CPU, _config("clip-vit-b-32-text"))
    assert image_module is text_module
    assert not image_module.training
    model = reference[0]
    theirs = model.state_dict()
    ours = image_module.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_logit_scale_is_open_clips(towers, reference):
    image_backend, text_backend = towers
    expected = reference[0].logit_scale.exp().item()
    assert image_backend.recipe_params() == {"logit_scale": expected}
    assert text_backend.recipe_params() == {"logit_scale": expected}


def test_module_is_freed_when_no_model_holds_it(clip_weights: Path, tmp_path: Path):
    # Another file name is another cache key: these loads share nothing with the other tests'.
    other_name = tmp_path / clip_weights.name
    try:
        os.link(clip_weights, other_name)
    except OSError:  # another file system
        shutil.copyfile(clip_weights, other_name)
    gc.collect()
    before = len(open_clip_loader._MODULES)
    image = load_open_clip_image(other_name, CPU, _config("clip-vit-b-32"))
    text = load_open_clip_text(other_name, CPU, _config("clip-vit-b-32-text"))
    assert len(open_clip_loader._MODULES) == before + 1
    del image, text
    gc.collect()
    assert len(open_clip_loader._MODULES) == before


def test_quick_gelu_equals_open_clips_force_quick_gelu(clip_weights: Path, data_dir: Path):
    """OpenAI's trained weights need QuickGELU (open_clip's pretrained="openai" turns it on)."""
    model, _, preprocess = open_clip.create_model_and_transforms(
        "ViT-B-32", pretrained=str(clip_weights), force_quick_gelu=True
    )
    model.eval()
    image = TorchBackend(load_open_clip_image(clip_weights, CPU, _config("clip-vit-b-32", quick_gelu=True)), CPU)
    text = TorchBackend(load_open_clip_text(clip_weights, CPU, _config("clip-vit-b-32-text", quick_gelu=True)), CPU)
    batch, decoded = _our_images(sorted(data_dir.glob("*.jpg"))[:2])
    ours = np.stack([item["embedding"] for item in image.run({"images": batch})])
    np.testing.assert_allclose(ours, _reference_images(model, preprocess, decoded), rtol=0, atol=1e-4)
    tokens = np.stack([clip_tokenize(t, {}) for t in TEXTS[:2]])
    ours = np.stack([item["embedding"] for item in text.run({"tokens": tokens})])
    with torch.inference_mode():
        expected = model.encode_text(open_clip.get_tokenizer("ViT-B-32")(TEXTS[:2])).numpy()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)


def test_bad_inputs_raise_invalid_input(towers):
    image_backend, text_backend = towers
    with pytest.raises(InvalidInput, match="uint8"):
        image_backend.run({"images": np.zeros((1, 3, 224, 224), np.float32)})
    with pytest.raises(InvalidInput, match="224x224"):
        image_backend.run({"images": np.zeros((1, 3, 200, 224), np.uint8)})
    with pytest.raises(InvalidInput, match="77 tokens"):
        text_backend.run({"tokens": np.zeros((1, 76), np.int64)})
    with pytest.raises(InvalidInput, match="token ids must be in"):
        text_backend.run({"tokens": np.full((1, 77), 49408, np.int64)})


def test_unreadable_weights_raise_weights_error(tmp_path: Path, clip_weights: Path):
    config = _config("clip-vit-b-32")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 not a safetensors file" * 100)
    truncated = tmp_path / "truncated.safetensors"
    with clip_weights.open("rb") as handle:
        truncated.write_bytes(handle.read(1 << 20))
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, str(other))
    wrong_shape = tmp_path / "wrong_shape.safetensors"
    save_file({"logit_scale": torch.zeros(()), "positional_embedding": torch.zeros(10, 512)}, str(wrong_shape))
    cases = [
        (tmp_path / "missing.safetensors", "cannot read weights"),
        (garbage, "cannot read safetensors"),
        (truncated, "cannot read safetensors"),
        (other, "not ViT-B-32 open_clip weights"),
        (wrong_shape, "size mismatch"),
    ]
    for path, match in cases:
        with pytest.raises(WeightsError, match=match) as raised:
            load_open_clip_image(path, CPU, config)
        assert str(path) in str(raised.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_embeddings_equal_open_clip_on_cpu(clip_weights: Path, reference, data_dir: Path):
    cuda = torch.device("cuda")
    model, preprocess, tokenizer = reference
    image = TorchBackend(load_open_clip_image(clip_weights, cuda, _config("clip-vit-b-32")), cuda)
    text = TorchBackend(load_open_clip_text(clip_weights, cuda, _config("clip-vit-b-32-text")), cuda)
    batch, decoded = _our_images(sorted(data_dir.glob("*.jpg")))
    ours = np.stack([item["embedding"] for item in image.run({"images": batch})])
    assert _cosines(ours, _reference_images(model, preprocess, decoded)).min() >= 0.9999
    tokens = np.stack([clip_tokenize(t, {}) for t in TEXTS])
    ours = np.stack([item["embedding"] for item in text.run({"tokens": tokens})])
    with torch.inference_mode():
        expected = model.encode_text(tokenizer(TEXTS)).numpy()
    assert _cosines(ours, expected).min() >= 0.9999
