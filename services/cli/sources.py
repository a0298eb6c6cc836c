"""What ``inferline detect SOURCE...`` accepts, as ultralytics' ``source=`` does: the images and
video frames each source stands for, in order, read lazily.

A source is a file, a folder (recursive), a glob (quoted, so the shell leaves it alone), an
http(s) URL, ``-`` (one image on stdin), a ``.txt`` file listing sources, a video file or stream
(rtsp://, rtmp://, a video URL), or a camera index (``0``). Each becomes ``Frame`` values: the
encoded image to send, the name results show, and for video its frame number and timestamp.
Video frames are decoded with OpenCV (already a dependency) and re-encoded losslessly (PNG), so
a frame detected here equals the same frame saved and detected on its own.

Domain code: no gRPC; errors are ``FileNotFoundError`` (nothing there) or ``SourceError`` (there,
but unusable), which the CLI prints without a traceback.
"""

from __future__ import annotations

import glob
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
VIDEO_SUFFIXES = frozenset(
    {".asf", ".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpeg", ".mpg", ".wmv", ".ts", ".gif"}
)
STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "tcp://", "udp://")
URL_SCHEMES = ("http://", "https://")
_GLOB_CHARS = frozenset("*?[")
# Frames per second of a video that does not say (a camera, some streams).
DEFAULT_FPS = 30.0


class SourceError(Exception):
    """A source that exists but cannot be read as images: too big, too slow, not decodable,
    no camera."""


@dataclass(frozen=True)
class UrlLimits:
    """How much a URL may send and how long it may take; beyond either it is refused, so a
    wrong URL cannot fill the disk or hang the command."""

    max_bytes: int = 64 * 1024 * 1024
    timeout_s: float = 30.0


@dataclass(frozen=True)
class Frame:
    """One image to detect. ``suffix`` is the format annotated output is written in (the
    source's own; ``.jpg`` for video frames drawn into a video); ``frame`` and
    ``timestamp_s`` are set for video frames only."""

    data: bytes
    name: str
    suffix: str
    source: str
    frame: int | None = None
    timestamp_s: float | None = None
    fps: float | None = None

    @property
    def stem(self) -> str:
        """The output files' base name: the file's stem, with ``_<frame>`` for a video frame
        counted from 1, as ultralytics names a video's label files)."""
        if self.source.isdigit():
            stem = f"camera{self.source}"
        else:
            stem = Path(urllib.parse.urlparse(self.source).path if _is_url(self.source) else self.source).stem
        stem = stem or "image"
        return stem if self.frame is None else f"{stem}_{self.frame + 1}"


@dataclass(frozen=True)
class Video:
    """A video file, stream URL or camera: decoded frame by frame when iterated."""

    location: str | int
    name: str
    limits: UrlLimits = UrlLimits()


@dataclass(frozen=True)
class Image:
    """An image file, URL or in-memory bytes (stdin): read when iterated."""

    location: str
    name: str
    data: bytes | None = None
    limits: UrlLimits = UrlLimits()


Source = Image | Video


def resolve(specs: Sequence[str], *, limits: UrlLimits = UrlLimits(), stdin: IO[bytes] | None = None) -> list[Source]:
    """Every image and video the specs stand for, in the order given (a folder's and a glob's
    matches sorted). Raises ``FileNotFoundError`` naming a spec that matched nothing."""
    found: list[Source] = []
    for spec in specs:
        found.extend(_resolve_one(spec, limits, stdin, Path.cwd()))
    if not found:
        raise FileNotFoundError("no images or videos found in " + ", ".join(specs))
    return found


def _resolve_one(spec: str, limits: UrlLimits, stdin: IO[bytes] | None, base: Path) -> list[Source]:
    if spec == "-":
        data = (stdin or sys.stdin.buffer).read()
        if not data:
            raise SourceError("-: nothing on stdin (pipe an image into the command)")
        return [Image("-", "stdin", data)]
    if spec.isdigit() and not Path(spec).exists():
        return [Video(int(spec), f"camera{spec}", limits)]
    if spec.startswith(STREAM_SCHEMES):
        return [Video(spec, spec, limits)]
    if _is_url(spec):
        suffix = Path(urllib.parse.urlparse(spec).path).suffix.lower()
        return [Video(spec, spec, limits) if suffix in VIDEO_SUFFIXES else Image(spec, spec, limits=limits)]
    path = Path(spec)
    if not path.exists() and not path.is_absolute() and (base / path).exists():
        path = base / path
    if path.is_dir():
        return [_file(p, limits) for p in sorted(path.rglob("*")) if p.is_file() and _media(p)]
    if path.is_file() and path.suffix.lower() == ".txt":
        return _listed(path, limits, stdin)
    if path.is_file():
        return [_file(path, limits)]
    if _GLOB_CHARS & set(spec):
        matches = sorted(Path(p) for p in glob.glob(spec, recursive=True))
        if not matches:
            raise FileNotFoundError(f"no file matches {spec}")
        return [_file(p, limits) for p in matches if p.is_file() and _media(p)]
    raise FileNotFoundError(f"no such image, video or directory: {spec}")


def _listed(listing: Path, limits: UrlLimits, stdin: IO[bytes] | None) -> list[Source]:
    """A ``.txt`` of sources, one per line (blank lines and ``#`` comments skipped); a relative
    path is looked up from the working directory, then from the list's folder (as ultralytics)."""
    found: list[Source] = []
    for line in listing.read_text().splitlines():
        entry = line.strip()
        if entry and not entry.startswith("#"):
            found.extend(_resolve_one(entry, limits, stdin, listing.parent))
    return found


def _file(path: Path, limits: UrlLimits) -> Source:
    name = str(path)
    return Video(name, name, limits) if path.suffix.lower() in VIDEO_SUFFIXES else Image(name, name, limits=limits)


def _media(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES


def _is_url(spec: str) -> bool:
    return spec.startswith(URL_SCHEMES)


def frames(source: Source) -> Iterator[Frame]:
    """The frames of one source, in order: one for an image, each decoded frame of a video."""
    if isinstance(source, Image):
        yield Frame(_image_bytes(source), source.name, _suffix(source.location), source.location)
        return
    cv2 = _cv2()
    with _capture(source) as capture:
        fps = float(capture.get(cv2.CAP_PROP_FPS)) or DEFAULT_FPS
        index = 0
        while True:
            ok, pixels = capture.read()
            if not ok:
                break
            encoded, png = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 1])
            if not encoded:
                raise SourceError(f"{source.name}: frame {index} could not be encoded")
            timestamp = round(index / fps, 6)
            yield Frame(png.tobytes(), f"{source.name}#{index}", ".jpg", str(source.location), index, timestamp, fps)
            index += 1


def all_frames(sources: Sequence[Source]) -> Iterator[Frame]:
    for source in sources:
        yield from frames(source)


def _suffix(location: str) -> str:
    """The annotated copy's format: the source's own when it is one we write, else PNG."""
    path = urllib.parse.urlparse(location).path if _is_url(location) else location
    suffix = Path(path).suffix.lower()
    return suffix if suffix in IMAGE_SUFFIXES else ".png"


def _image_bytes(image: Image) -> bytes:
    if image.data is not None:
        return image.data
    if _is_url(image.location):
        return download(image.location, image.limits)
    return Path(image.location).read_bytes()


def download(url: str, limits: UrlLimits) -> bytes:
    """The URL's body, refused past ``limits`` (a Content-Length over the limit is refused
    before reading; a body without one is cut off at the limit)."""
    try:
        with urllib.request.urlopen(url, timeout=limits.timeout_s) as response:  # noqa: S310 - http(s) only
            declared = response.headers.get("Content-Length")
            if declared is not None and int(declared) > limits.max_bytes:
                raise SourceError(f"{url}: {declared} bytes is over the {limits.max_bytes}-byte limit")
            body: bytes = response.read(limits.max_bytes + 1)
    except urllib.error.HTTPError as exc:
        raise SourceError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SourceError(f"{url}: cannot download it ({reason}; limit {limits.timeout_s:g} s)") from None
    if len(body) > limits.max_bytes:
        raise SourceError(f"{url}: more than the {limits.max_bytes}-byte limit")
    return body


@contextmanager
def _capture(video: Video) -> Iterator[Any]:
    """An opened ``cv2.VideoCapture``; a video URL is downloaded first (within the limits),
    a stream or camera is opened as it is."""
    cv2 = _cv2()
    with tempfile.TemporaryDirectory(prefix="inferline-video-") as scratch:
        location: str | int = video.location
        if isinstance(location, str) and _is_url(location):
            local = Path(scratch) / ("video" + Path(urllib.parse.urlparse(location).path).suffix)
            local.write_bytes(download(location, video.limits))
            location = str(local)
        capture = cv2.VideoCapture(location)
        try:
            if not capture.isOpened():
                if isinstance(location, int):
                    raise SourceError(f"no camera {location} on this machine (/dev/video{location} cannot be opened)")
                raise SourceError(f"{video.name}: OpenCV cannot open it as a video")
            yield capture
        finally:
            capture.release()


def _cv2() -> Any:
    """OpenCV, imported where frames are decoded: image sources need none of it."""
    import cv2  # noqa: PLC0415 - see above

    return cv2
