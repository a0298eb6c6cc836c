"""Shared fixtures: where the stand-in weights and test images are, and running stacks."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from inferline.common.settings import Settings
from inferline.services.inference.weights import sha256_of
from tests.support.servers import InProcessStack
from tests.support.standins import STANDIN_PINS, TRUSTED_WEIGHTS_ENV

REPO = Path(__file__).resolve().parent.parent
STANDIN_CACHE = REPO / ".cache" / "standins"
CLIP_FILE = "open_clip_vit_b_32_openai.safetensors"
CLIP_STANDIN_SHA256 = "c13dab08bc102089ef3fd0650b6c4d8f2b2751b1407584d3163d08431223d089"
# sha256 of the stand-ins in ../shared/models (MANIFEST.md) and of the official release: the
# reference library unpickles whole objects, so a test loads only a file it has verified.
KNOWN_YOLO_SHA256 = {
    "33f4216002cafa403a4588a328e025d1542f2acda1e632c2f7ba8a9a95359b3b",  # stand-in
    "f59b3d833e2ff32e194b5bb8e08d211dc7c5bdf144b90d2c8412c47ccfc83b36",  # official yolov8n.pt
}
KNOWN_SEG_SHA256 = {
    "6b9f40a9136c2376e8634d65ef7d207c1837d9d0701676ab21ad4ef57149dcbf",  # stand-in
    "a7cd8f929e1903d78a12a48efecab430209f18dc46cb96c3599a5980c63c423c",  # official yolov8n-seg.pt
}


def pytest_configure(config: pytest.Config) -> None:
    """Stacks the tests start as processes inherit the stand-ins' pins (unless the run set its own)."""
    for var, value in TRUSTED_WEIGHTS_ENV.items():
        os.environ.setdefault(var, value)


def _first_dir(*candidates: str | Path | None) -> Path | None:
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate).resolve()
    return None


@pytest.fixture(scope="session")
def model_dir() -> Path:
    found = _first_dir(os.environ.get("INFERLINE_MODEL_DIR"), REPO.parent / "shared" / "models")
    if found is None or not (found / "yolov8n.pt").is_file():
        pytest.fail("yolov8n.pt not found: set INFERLINE_MODEL_DIR to the folder that holds it")
    return found


@pytest.fixture(scope="session")
def data_dir() -> Path:
    found = _first_dir(os.environ.get("INFERLINE_TEST_DATA"), REPO.parent / "shared" / "data")
    if found is None:
        pytest.fail("test images not found: set INFERLINE_TEST_DATA or put them in ../shared/data")
    return found


@pytest.fixture(scope="session")
def yolo_weights(model_dir: Path) -> Path:
    path = model_dir / "yolov8n.pt"
    digest = sha256_of(path)
    if digest not in KNOWN_YOLO_SHA256:
        pytest.fail(f"{path} has sha256 {digest}, neither the stand-in nor the official release")
    return path


@pytest.fixture(scope="session")
def seg_weights(model_dir: Path) -> Path:
    """The YOLOv8n-seg stand-in (MANIFEST.md), verified before ultralytics unpickles it."""
    path = model_dir / "yolov8n-seg.pt"
    if not path.is_file():
        pytest.fail(f"{path} not found: the YOLOv8n-seg stand-in lives beside yolov8n.pt")
    digest = sha256_of(path)
    if digest not in KNOWN_SEG_SHA256:
        pytest.fail(f"{path} has sha256 {digest}, neither the stand-in nor the official release")
    return path


@pytest.fixture(scope="session")
def sample_images(data_dir: Path) -> list[Path]:
    """The shared test scenes plus ultralytics' own bus.jpg and zidane.jpg."""
    import ultralytics  # noqa: PLC0415 - heavy; only sessions that ask for the images pay for it

    assets = Path(ultralytics.__file__).parent / "assets"
    return sorted(data_dir.glob("*.jpg")) + [assets / "bus.jpg", assets / "zidane.jpg"]


@pytest.fixture(scope="session")
def clip_weights(model_dir: Path) -> Path:
    """The CLIP stand-in: from the model folder if it is there, else made once in .cache/standins
    by the shared make_standins.py (605 MB, too large to keep in shared/ or the repo)."""
    for folder in (model_dir, STANDIN_CACHE):
        if (folder / CLIP_FILE).is_file():
            return folder / CLIP_FILE
    script = next(
        (
            p
            for p in (model_dir / "make_standins.py", REPO.parent / "shared" / "models" / "make_standins.py")
            if p.is_file()
        ),
        None,
    )
    if script is None:
        pytest.fail(f"{CLIP_FILE} is not in {model_dir} and make_standins.py is not there to make it")
    STANDIN_CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(script), str(STANDIN_CACHE)], check=True, timeout=600)
    path = STANDIN_CACHE / CLIP_FILE
    if sha256_of(path) != CLIP_STANDIN_SHA256:
        pytest.fail(f"{path} is not the expected stand-in (sha256 differs); delete it and rerun")
    return path


@pytest.fixture(scope="session")
def settings(model_dir: Path, clip_weights: Path) -> Settings:
    """The shared in-process stack's settings. Its admission limit never drops below what the
    suite sends at once (a bad-input case of 8 images beside two good calls): the tests that
    share it specify other behaviour, and a limit adapted to their bursts would refuse some of
    them at random. Admission has its own tests (tests/unit/test_admission.py,
    tests/reliability/test_overload.py) on stacks of their own."""
    return Settings(
        model_dir=(model_dir, clip_weights.parent), allow_download=False, grace_period_s=2.0, worker_threads=2,
        trusted_weights=STANDIN_PINS, admission_min_limit=128, admission_initial_limit=128,
    )


@pytest.fixture(scope="session")
def stack(settings: Settings) -> Iterator[InProcessStack]:
    running = InProcessStack(settings)
    yield running
    running.close()
