"""Images from the caller's disk: files as given, folders as the images inside them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from inferline.common.api import ImageInput

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def collect_images(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, and the images inside any directory (sorted, not recursive)."""
    paths = list(paths)
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"no such image or directory: {path}")
    if not found:
        raise FileNotFoundError("no images found in " + ", ".join(map(str, paths)))
    return found


def image_inputs(paths: Sequence[Path]) -> tuple[ImageInput, ...]:
    """The files' bytes, each named by its path as given (results and outputs show that name)."""
    return tuple(ImageInput(path.read_bytes(), str(path)) for path in paths)
