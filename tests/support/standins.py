"""The stand-in weights of ../shared/models and .cache/standins, pinned by digest.

They are not the official releases, so the model configs (verify: official) refuse them. Tests
serve them through the operator's explicit opt-in, INFERLINE_TRUSTED_WEIGHTS, as `make test` and
`make demo` do (the Makefile's STANDIN_WEIGHTS holds the same digests; MANIFEST.md lists them).
"""

from __future__ import annotations

STANDIN_PINS = (
    "sha256:33f4216002cafa403a4588a328e025d1542f2acda1e632c2f7ba8a9a95359b3b",  # yolov8n.pt
    "sha256:25bbfbb18cb954526df555aa35b4d6ce4209a380bd090556c0dc16371214a040",  # fasterrcnn_...-907ea3f9.pth
    "sha256:6b9f40a9136c2376e8634d65ef7d207c1837d9d0701676ab21ad4ef57149dcbf",  # yolov8n-seg.pt
    "sha256:c13dab08bc102089ef3fd0650b6c4d8f2b2751b1407584d3163d08431223d089",  # open_clip_vit_b_32_openai.safetensors
)
TRUSTED_WEIGHTS_ENV = {"INFERLINE_TRUSTED_WEIGHTS": ",".join(STANDIN_PINS)}
