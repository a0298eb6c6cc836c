"""The preprocess and postprocess stages run without OpenCV (their container images leave it out
to stay within 250 MB) and produce the same bytes as with it."""

import hashlib
import json
import subprocess
import sys

import numpy as np

from inferline.common.images import decode_image
from inferline.services.preprocess.letterbox import letterbox

# Runs in a fresh interpreter where `import cv2` fails, as in the images.
_WITHOUT_OPENCV = r"""
import hashlib, json, sys
sys.modules["cv2"] = None  # any import of cv2 now raises ImportError
import inferline.services.preprocess.servicer, inferline.services.postprocess.servicer  # noqa: E401,F401
from inferline.common.detections import Detection
from inferline.common.images import DECODER, decode_image
from inferline.services.presentation.renderers import RENDERERS, RenderInput
from inferline.services.preprocess.letterbox import letterbox

SIZES = [(320, 320), (800, 800)]
out = {"decoder": DECODER, "tensors": {}}
for path in sys.argv[1:]:
    data = open(path, "rb").read()
    for size in SIZES:  # down and up: the sample images are 640x480
        tensor, transform = letterbox(decode_image(data, max_pixels=10**8), size)
        digest = hashlib.sha256(tensor.tobytes()).hexdigest()
        out["tensors"][f"{path} {size}"] = [digest, list(tensor.shape), transform.pad_x, transform.pad_y]
    png = RENDERERS.get("png")(RenderInput("x", 1, 1, [Detection("bus", 5, 0.9, (1.0, 2.0, 30.0, 40.0))], data), 10**8)
    out["png"] = png.content[:8].hex()
print(json.dumps(out))
"""


def test_stages_import_and_give_the_same_tensors_without_opencv(sample_images):
    paths = [str(p) for p in sample_images]
    done = subprocess.run([sys.executable, "-c", _WITHOUT_OPENCV, *paths], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["decoder"] == "pillow"
    assert result["png"] == b"\x89PNG\r\n\x1a\n".hex()
    for path in paths:
        for size in [(320, 320), (800, 800)]:
            tensor, transform = letterbox(decode_image(open(path, "rb").read(), max_pixels=10**8), size)
            digest = hashlib.sha256(np.ascontiguousarray(tensor).tobytes()).hexdigest()
            expected = [digest, list(tensor.shape), transform.pad_x, transform.pad_y]
            assert result["tensors"][f"{path} {size}"] == expected, (path, size)
