"""YOLO decode and NMS on a torch device (issue 16): ``INFERLINE_POSTPROCESS_DEVICE=cuda``.

The numpy path (yolo.py) is the reference and stays the default: the postprocess stage needs no
torch. On a GPU the same steps run as tensor operations and only the kept rows come back to the
host. Step for step it is ultralytics 8.4's ``non_max_suppression``, as the numpy path is: strict
``>`` on the best class score, class filter, the best ``MAX_NMS`` candidates (stable order), one
``torchvision.ops.nms`` over boxes offset by ``class * MAX_WH``, then ``max_det``. That offset,
not ``batched_nms``'s own (max coordinate + 1), is kept on purpose: its float32 rounding is part
of the IoU ultralytics sees, so both paths keep the same boxes in the same order.

"torch-cpu" runs this code on the CPU, which is how it is tested without a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from inferline.common.errors import ConfigError
from inferline.services.postprocess.yolo import MAX_NMS, MAX_WH

if TYPE_CHECKING:
    import torch

# The recipe parameter the postprocess service sets from INFERLINE_POSTPROCESS_DEVICE.
NMS_DEVICE = "nms_device"


def torch_device(setting: str) -> str | None:
    """The torch device for a ``postprocess_device`` setting; None for the numpy path."""
    if setting == "cpu":
        return None
    if setting == "torch-cpu":
        return "cpu"
    if setting == "cuda" or (setting.startswith("cuda:") and setting[5:].isdigit()):
        return setting
    raise ConfigError(
        f"INFERLINE_POSTPROCESS_DEVICE={setting!r} is not a device: give cpu (numpy), cuda, cuda:N or torch-cpu"
    )


def decode_detections(
    output: np.ndarray | torch.Tensor,
    *,
    device: str,
    conf: float = 0.25,
    iou: float = 0.7,
    max_det: int = 300,
    classes: Sequence[int] | None = None,
    agnostic: bool = False,
    nc: int = 0,
) -> np.ndarray:
    """One image's (4 + nc [+ mask coefficients], N) head output -> (K, 6 [+ coefficients])
    ``[x1, y1, x2, y2, score, class]`` rows, as ``yolo.decode_detections`` returns them."""
    import torch  # noqa: PLC0415 - only a stage configured for device NMS loads torch
    import torchvision  # noqa: PLC0415 - as above

    if not 0.0 <= conf <= 1.0:
        raise ValueError(f"conf must be within [0, 1], got {conf}")
    if output.ndim != 2 or output.shape[0] < 5:
        raise ValueError(f"expected a (4 + classes, anchors) output, got shape {tuple(output.shape)}")
    nc = nc or output.shape[0] - 4
    if not 0 < nc <= output.shape[0] - 4:
        raise ValueError(f"nc must be within [1, {output.shape[0] - 4}] for a head of {output.shape[0]} rows, got {nc}")
    head = torch.as_tensor(output).to(device=device, dtype=torch.float32, non_blocking=True)
    with torch.inference_mode():
        candidates = head.T
        score, best = candidates[:, 4 : 4 + nc].max(dim=1)
        keep = score > conf
        if classes is not None:
            keep &= torch.isin(best, torch.as_tensor(list(classes), device=head.device))
        xywh, score, label = candidates[keep, :4], score[keep], best[keep].to(torch.float32)
        extra = candidates[keep, 4 + nc :]
        if len(score) > MAX_NMS:
            top = torch.argsort(-score, stable=True)[:MAX_NMS]
            xywh, score, label, extra = xywh[top], score[top], label[top], extra[top]
        half_wh = xywh[:, 2:] / 2
        xyxy = torch.cat((xywh[:, :2] - half_wh, xywh[:, :2] + half_wh), dim=1)
        offset = label * (0 if agnostic else MAX_WH)
        picked = torchvision.ops.nms(xyxy + offset[:, None], score, iou)[:max_det]
        rows = torch.cat((xyxy[picked], score[picked, None], label[picked, None], extra[picked]), dim=1)
        return rows.cpu().numpy()
