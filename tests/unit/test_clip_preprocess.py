"""The torch-free CLIP preprocessing must hand the model exactly what open_clip's would.

Images: open_clip's eval transform (torchvision on a PIL image) up to ToTensor, compared bit for
bit: our uint8 / 255 is ToTensor's float, and our uint8 is its value * 255, rounded.
Texts: open_clip's tokenizer, compared id for id, except that we refuse what it would truncate.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform, image_transform_v2
from PIL import Image
from torchvision.transforms import Compose, Normalize

from inferline.common.errors import InvalidInput
from inferline.common.images import decode_image
from inferline.services.preprocess.clip_recipes import clip_image, clip_tokenize
from inferline.services.preprocess.recipes import PREPROCESSORS, TEXT_PREPROCESSORS

REPO = Path(__file__).resolve().parents[2]
MAX_PIXELS = 100_000_000
# (height, width): tiny, thin, exact, off-by-one, odd, wide, tall, large.
SIZES = [(1, 1), (2, 3), (3, 2), (1, 300), (300, 1), (5, 700), (700, 5), (7, 640), (223, 223), (224, 224),
         (225, 225), (223, 225), (224, 300), (300, 224), (480, 640), (640, 480), (333, 999), (999, 333),
         (1080, 810), (720, 1280), (2001, 1503)]  # fmt: skip


def _without_normalize(transform: Compose) -> Compose:
    assert isinstance(transform.transforms[-1], Normalize)
    return Compose(transform.transforms[:-1])


@pytest.fixture(scope="module")
def vit_b_32_transform() -> Compose:
    """open_clip's eval transform for ViT-B-32, as create_model_and_transforms builds it, minus
    Normalize (the model does that step)."""
    image_size = open_clip.get_model_config("ViT-B-32")["vision_cfg"]["image_size"]
    cfg = PreprocessCfg(size=image_size)
    return _without_normalize(image_transform_v2(cfg, is_train=False))


def _assert_same(bgr: np.ndarray, reference: Compose, params: dict) -> np.ndarray:
    ours, transform = clip_image(bgr, params)
    expected = reference(Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1])))
    assert ours.dtype == np.uint8 and ours.flags.c_contiguous
    assert ours.shape == tuple(expected.shape), f"{bgr.shape} {params}"
    # The loader's uint8 -> float step is ToTensor's own: the model sees identical floats.
    assert torch.equal(torch.from_numpy(ours).float().div(255), expected), f"{bgr.shape} {params}"
    np.testing.assert_array_equal(ours, (expected * 255).round().to(torch.uint8).numpy())
    assert (transform.input_height, transform.input_width) == ours.shape[1:]
    assert (transform.orig_height, transform.orig_width) == bgr.shape[:2]
    return ours


def test_registered():
    assert "clip_image" in PREPROCESSORS
    assert "clip_tokenize" in TEXT_PREPROCESSORS


def test_shared_images_bit_identical_to_open_clip(data_dir: Path, vit_b_32_transform: Compose):
    images = sorted(data_dir.glob("*.jpg"))
    assert images, f"no test images in {data_dir}"
    for path in images:
        bgr = decode_image(path.read_bytes(), max_pixels=MAX_PIXELS)
        _assert_same(bgr, vit_b_32_transform, {"size": 224})


def test_odd_sizes_bit_identical_to_open_clip(vit_b_32_transform: Compose):
    rng = np.random.default_rng(20240611)
    shapes = SIZES + [tuple(int(v) for v in rng.integers(1, 1200, 2)) for _ in range(25)]
    for height, width in shapes:
        bgr = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        _assert_same(bgr, vit_b_32_transform, {"size": 224, "interpolation": "bicubic", "resize_mode": "shortest"})


def test_smooth_image_bit_identical(vit_b_32_transform: Compose):
    # Gradients exercise the bicubic filter's rounding, random noise its clipping.
    y, x = np.mgrid[0:375, 0:500]
    bgr = np.stack([(x * 255 // 499), (y * 255 // 374), ((x + y) % 256)], axis=-1).astype(np.uint8)
    _assert_same(bgr, vit_b_32_transform, {"size": 224})


@pytest.mark.parametrize(
    ("size", "resize_mode", "interpolation", "fill_color"),
    [
        (224, "shortest", "bilinear", 0),
        (160, "shortest", "bicubic", 0),
        ([224, 160], "shortest", "bicubic", 0),
        ([160, 224], "shortest", "bilinear", 0),  # open_clip ignores bilinear here; so do we
        (224, "longest", "bicubic", 0),
        ([192, 256], "longest", "bilinear", 114),
        (224, "squash", "bicubic", 0),
        ([256, 192], "squash", "bilinear", 0),
    ],
)
def test_other_open_clip_transforms(size, resize_mode, interpolation, fill_color):
    reference = _without_normalize(
        image_transform(
            size, is_train=False, resize_mode=resize_mode, interpolation=interpolation, fill_color=fill_color
        )
    )
    rng = np.random.default_rng(7)
    params = {"size": size, "resize_mode": resize_mode, "interpolation": interpolation, "fill_color": fill_color}
    for height, width in [(2, 3), (50, 400), (400, 50), (224, 224), (480, 640), (640, 480), (161, 97)]:
        bgr = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        _assert_same(bgr, reference, params)


def test_transform_maps_input_pixels_back_to_the_image():
    image = np.zeros((480, 640, 3), np.uint8)  # resized to 224x298, then 37 columns cut left
    _, t = clip_image(image, {"size": 224})
    assert (t.orig_width, t.orig_height, t.input_width, t.input_height) == (640, 480, 224, 224)
    assert (t.scale_x, t.scale_y) == (298 / 640, 224 / 480)
    assert (t.pad_x, t.pad_y) == (-37.0, 0.0)
    # The input's centre is the image's centre.
    assert (112 - t.pad_x) / t.scale_x == pytest.approx(320, abs=1.5)
    _, t = clip_image(np.zeros((100, 50, 3), np.uint8), {"size": 224, "resize_mode": "longest"})
    assert (t.scale_x, t.scale_y, t.pad_x, t.pad_y) == (112 / 50, 224 / 100, 56.0, 0.0)
    _, t = clip_image(np.zeros((100, 50, 3), np.uint8), {"size": 224, "resize_mode": "squash"})
    assert (t.scale_x, t.scale_y, t.pad_x, t.pad_y) == (224 / 50, 224 / 100, 0.0, 0.0)


def test_params_from_protobuf_floats_are_accepted():
    image = np.full((30, 40, 3), 9, np.uint8)
    a, _ = clip_image(image, {"size": 224.0, "fill_color": 0.0})
    b, _ = clip_image(image, {"size": 224})
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("image", "params", "match"),
    [
        (np.zeros((10, 10), np.uint8), {}, "HxWx3 uint8"),
        (np.zeros((10, 10, 4), np.uint8), {}, "HxWx3 uint8"),
        (np.zeros((10, 10, 3), np.float32), {}, "HxWx3 uint8"),
        (np.zeros((0, 10, 3), np.uint8), {}, "empty image"),
        (np.zeros((10, 10, 3), np.uint8), {"size": 0}, "size"),
        (np.zeros((10, 10, 3), np.uint8), {"size": [1, 2, 3]}, "size"),
        (np.zeros((10, 10, 3), np.uint8), {"size": 22.5}, "size"),
        (np.zeros((10, 10, 3), np.uint8), {"interpolation": "nearest"}, "interpolation"),
        (np.zeros((10, 10, 3), np.uint8), {"resize_mode": "fit"}, "resize_mode"),
        (np.zeros((10, 10, 3), np.uint8), {"fill_color": 300}, "fill_color"),
        (np.zeros((1, 3000, 3), np.uint8), {"resize_mode": "longest"}, "too thin"),
    ],
)
def test_bad_images_and_params_raise_invalid_input(image, params, match):
    with pytest.raises(InvalidInput, match=match):
        clip_image(image, params)


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    return open_clip.get_tokenizer("ViT-B-32")


TEXTS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "  leading and trailing spaces\t\n",
    "tabs\tand\nnewlines   and   runs of spaces",
    "Hello, world!!! (test) -- 'quoted' \"double\" & <html> &amp; &lt;tag&gt;",
    "it's, we're, they've, I'm, you'll, he'd",
    "Café crème, naïve façade, Ångström, straße",
    "日本語のテキスト と 中文 and 한국어",
    "emoji 🙂🐈‍⬛👍🏽 and symbols ∑ ∞ ≠ ©",
    "numbers 1234567890 3.14159 1e-9 #42 $100 50%",
    "mojibake: cafÃ© and Ã©",
    "x",
    "a diagram of a neural network with many layers, skip connections and attention heads, drawn "
    "in black ink on white paper, in the style of a textbook figure",
]


def test_tokens_equal_open_clip(open_clip_tokenizer):
    for text in TEXTS:
        ours = clip_tokenize(text, {"context_length": 77})
        expected = open_clip_tokenizer([text])[0].numpy()
        assert ours.dtype == np.int64 and ours.shape == (77,)
        np.testing.assert_array_equal(ours, expected, err_msg=text)


def test_longest_fitting_text_is_kept_and_one_more_token_is_refused(open_clip_tokenizer):
    fits = " ".join(["a"] * 75)  # 75 tokens + start + end = 77
    assert len(open_clip_tokenizer.encode(fits)) == 75
    np.testing.assert_array_equal(clip_tokenize(fits, {"context_length": 77}), open_clip_tokenizer([fits])[0].numpy())
    assert clip_tokenize(fits, {})[-1] == open_clip_tokenizer.eot_token_id
    with pytest.raises(InvalidInput, match="text is 78 tokens, the model takes at most 77"):
        clip_tokenize(fits + " a", {"context_length": 77})
    long_text = "photo " * 200
    with pytest.raises(InvalidInput, match="text is 202 tokens, the model takes at most 77"):
        clip_tokenize(long_text, {})


def test_other_context_lengths(open_clip_tokenizer):
    text = "a photo of a dog"
    np.testing.assert_array_equal(
        clip_tokenize(text, {"context_length": 16.0}), open_clip_tokenizer([text], context_length=16)[0].numpy()
    )
    with pytest.raises(InvalidInput, match="text is 7 tokens, the model takes at most 6"):
        clip_tokenize(text, {"context_length": 6})


@pytest.mark.parametrize("text", ["", " ", "\n\t  \r\n", "\u3000"])
def test_empty_text_raises_invalid_input(text):
    with pytest.raises(InvalidInput, match="empty"):
        clip_tokenize(text, {"context_length": 77})


@pytest.mark.parametrize(
    ("text", "params", "match"),
    [
        (b"bytes", {}, "expects a string"),
        ("ok", {"context_length": 0}, "context_length"),
        ("ok", {"context_length": "77"}, "context_length"),
        ("ok", {"tokenizer": ""}, "tokenizer"),
    ],
)
def test_bad_text_params_raise_invalid_input(text, params, match):
    with pytest.raises(InvalidInput, match=match):
        clip_tokenize(text, params)


def test_image_recipe_needs_no_torch():
    """The preprocess stage imports its recipe modules at start; the CLIP one must not pull in
    torch (or open_clip) until a text is tokenized."""
    code = (
        "import sys, numpy as np\n"
        "from inferline.services.preprocess import clip_recipes\n"
        "clip_recipes.clip_image(np.zeros((30, 40, 3), np.uint8), {'size': 224})\n"
        "heavy = sorted(m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)
