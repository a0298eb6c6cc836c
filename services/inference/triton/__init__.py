"""An inferline model as a Triton model repository entry, served by a real ``tritonserver``.

``write_repository`` writes ``DIR/<model>/config.pbtxt`` (Triton's text format of the very
``ModelConfig`` our inference stage answers, so its ``parameters`` carry the same task, recipes,
labels, candidate filter and weights pins) and ``DIR/<model>/1/model.py``, a Python backend
model that runs the model with inferline's own loader and backend (``python_model.py``): the
same forward pass on the same weights, so the same output bits as our stage's.

The Python backend's stub embeds its own interpreter (libpython3.11, not our venv's), so the
written model.py first adds our venv's site-packages with ``site.addsitedir``, which also runs
their ``.pth`` files (the editable install's finder among them; PYTHONPATH would not), ahead of
the system's dist-packages.
"""

from __future__ import annotations

import site
import sys
from collections.abc import Sequence
from pathlib import Path

from google.protobuf import text_format

from inferline.common.generated import model_config_pb2
from inferline.services.inference.models import LoadedModel
from inferline.services.inference.oip_servicer import model_config
from inferline.services.inference.service import model_info

MODEL_PY = '''"""Triton Python backend model serving inferline's {name!r} (written by `inferline triton-repository`)."""

import site
import sys

# The stub's interpreter is not our venv's: add its packages (running their .pth files), ahead
# of the system's dist-packages, whose older protobuf and numpy would shadow ours.
before = list(sys.path)
for folder in {site_dirs!r}:
    site.addsitedir(folder)
sys.path[:] = [p for p in sys.path if p not in before] + before

from inferline.services.inference.triton.python_model import TritonPythonModel  # noqa: E402, F401
'''


def site_dirs() -> list[str]:
    """This interpreter's site-packages folders: where the stub finds numpy, torch and inferline."""
    return [folder for folder in site.getsitepackages() if Path(folder).is_dir()]


def ragged_outputs(model: LoadedModel) -> list[str]:
    """Outputs with a variable dimension: sent padded beside ``<name>__shape`` (common/oip.py)."""
    return sorted(model_info(model).ragged_outputs)


def triton_config(model: LoadedModel) -> model_config_pb2.ModelConfig:
    """Our stage's ModelConfig (with the ``__shape`` output of each ragged output), for
    Triton's Python backend: backend "python" and a CPU instance group."""
    config = model_config(model)
    config.backend = "python"
    for group in config.instance_group:
        group.kind = model_config_pb2.ModelInstanceGroup.KIND_CPU
    return config


def write_repository(model: LoadedModel, out: Path, python_dirs: Sequence[str] | None = None) -> Path:
    """Writes the model's folder under ``out`` (a Triton model repository); returns the folder."""
    if sys.version_info[:2] != (3, 11):
        raise RuntimeError(
            f"the Python backend stub embeds Python 3.11; this is {sys.version.split()[0]}, "
            "whose packages it cannot load"
        )
    folder = out / model.config.name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(text_format.MessageToString(triton_config(model)))
    dirs = list(python_dirs) if python_dirs is not None else site_dirs()
    (folder / "1" / "model.py").write_text(MODEL_PY.format(name=model.config.name, site_dirs=dirs))
    return folder
