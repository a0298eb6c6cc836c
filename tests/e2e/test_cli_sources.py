"""`inferline detect SOURCE` takes what `yolo predict source=` takes, and each kind of source
gives the detections of its images (or frames) detected one by one, in order."""

from __future__ import annotations

import functools
import http.server
import io
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from inferline.services.cli import main

FRAMES = 3


def _detect(capsys, target: str, *args: str) -> tuple[int, list[dict], str]:
    code = main(["detect", "--target", target, *args])
    out, err = capsys.readouterr()
    return code, (json.loads(out)["results"] if out.strip().startswith("{") else []), err


def _detections(results: list[dict]) -> list[list[dict]]:
    return [r["detections"] for r in results]


def _single(capsys, stack, path: Path) -> list[dict]:
    code, results, err = _detect(capsys, stack.controller, str(path))
    assert code == 0, err
    return results[0]["detections"]


@pytest.fixture
def tree(tmp_path, data_dir) -> Path:
    """shapes_01 at the top, shapes_02 one level down, shapes_03 two levels down."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    shutil.copy(data_dir / "shapes_01.jpg", tmp_path / "shapes_01.jpg")
    shutil.copy(data_dir / "shapes_02.jpg", tmp_path / "a" / "shapes_02.jpg")
    shutil.copy(data_dir / "shapes_03.jpg", tmp_path / "a" / "b" / "shapes_03.jpg")
    (tmp_path / "a" / "notes.md").write_text("not an image")
    return tmp_path


def _expected(capsys, stack, tree: Path) -> list[list[dict]]:
    return [_single(capsys, stack, p) for p in sorted(tree.rglob("*.jpg"))]


def test_a_nested_folder_is_searched_recursively(capsys, stack, tree):
    expected = _expected(capsys, stack, tree)
    code, results, err = _detect(capsys, stack.controller, str(tree))
    assert code == 0, err
    # Sorted by path, folder by folder: a/b/ before a/x before x.
    assert [Path(r["image"]).name for r in results] == ["shapes_03.jpg", "shapes_02.jpg", "shapes_01.jpg"]
    assert _detections(results) == expected and all(expected)


def test_a_quoted_glob_is_expanded(capsys, stack, tree):
    expected = _expected(capsys, stack, tree)
    code, results, err = _detect(capsys, stack.controller, str(tree / "**" / "*.jpg"))
    assert code == 0, err
    assert _detections(results) == expected


def test_a_glob_matching_nothing_names_it(capsys, stack, tree):
    code, _, err = _detect(capsys, stack.controller, str(tree / "*.png"))
    assert code == 1 and "no file matches" in err and "*.png" in err


@pytest.fixture
def http_server(tree) -> Iterator[str]:
    """The tree served over HTTP on loopback, for as long as the test runs."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tree))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_url_is_downloaded_and_detected(capsys, stack, tree, http_server):
    expected = _single(capsys, stack, tree / "a" / "shapes_02.jpg")
    code, results, err = _detect(capsys, stack.controller, f"{http_server}/a/shapes_02.jpg")
    assert code == 0, err
    assert results[0]["image"] == f"{http_server}/a/shapes_02.jpg"
    assert results[0]["detections"] == expected


def test_a_url_over_the_size_limit_is_refused(capsys, stack, http_server, monkeypatch):
    code, _, err = _detect(capsys, stack.controller, f"{http_server}/a/shapes_02.jpg", "--url-max-mb", "0.001")
    assert code == 1 and "over the 1048-byte limit" in err
    monkeypatch.setenv("INFERLINE_CLI_URL_MAX_MB", "0.002")
    code, _, err = _detect(capsys, stack.controller, f"{http_server}/a/shapes_02.jpg")
    assert code == 1 and "over the 2097-byte limit" in err


def test_a_missing_url_names_the_http_status(capsys, stack, http_server):
    code, _, err = _detect(capsys, stack.controller, f"{http_server}/nope.jpg")
    assert code == 1 and "HTTP 404" in err


def test_stdin_is_one_image(capsys, stack, data_dir, monkeypatch):
    expected = _single(capsys, stack, data_dir / "shapes_01.jpg")
    stdin = io.TextIOWrapper(io.BytesIO((data_dir / "shapes_01.jpg").read_bytes()))
    monkeypatch.setattr("sys.stdin", stdin)
    code, results, err = _detect(capsys, stack.controller, "-")
    assert code == 0, err
    assert results[0]["image"] == "stdin" and results[0]["detections"] == expected


def test_a_txt_list_gives_its_sources_in_order(capsys, stack, tree, monkeypatch):
    listing = tree / "list.txt"
    listing.write_text("# relative to the list's folder\na/b/shapes_03.jpg\n\nshapes_01.jpg\n")
    expected = [_single(capsys, stack, tree / p) for p in ("a/b/shapes_03.jpg", "shapes_01.jpg")]
    monkeypatch.chdir(tree.parent)
    code, results, err = _detect(capsys, stack.controller, str(listing))
    assert code == 0, err
    assert _detections(results) == expected


def _video(path: Path, data_dir: Path, frames: int = FRAMES) -> list[np.ndarray]:
    """A short video of the test images, and its frames as OpenCV decodes them back."""
    images = [cv2.resize(cv2.imread(str(p)), (320, 240)) for p in sorted(data_dir.glob("shapes_0*.jpg"))[:frames]]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 5.0, (320, 240))
    for image in images:
        writer.write(image)
    writer.release()
    capture = cv2.VideoCapture(str(path))
    decoded = []
    while (read := capture.read())[0]:
        decoded.append(read[1])
    capture.release()
    assert len(decoded) == frames
    return decoded


def test_a_video_gives_one_result_per_frame_in_order_and_an_annotated_video(capsys, stack, data_dir, tmp_path):
    video = tmp_path / "clip.avi"
    frames = _video(video, data_dir)
    expected = []
    for index, frame in enumerate(frames):
        still = tmp_path / f"frame{index}.png"
        cv2.imwrite(str(still), frame)
        expected.append(_single(capsys, stack, still))
    save_dir = tmp_path / "run"
    code, results, err = _detect(
        capsys, stack.controller, str(video), "--save", "--save-txt", "--save-dir", str(save_dir), "--batch", "2"
    )
    assert code == 0, err
    assert [r["frame"] for r in results] == list(range(FRAMES))
    assert [r["timestamp_s"] for r in results] == [pytest.approx(i / 5.0) for i in range(FRAMES)]
    assert _detections(results) == expected and any(expected)
    capture = cv2.VideoCapture(str(save_dir / "clip.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == FRAMES
    capture.release()
    labelled = sorted(p.name for p in (save_dir / "labels").iterdir())
    assert labelled == [f"clip_{i + 1}.txt" for i, found in enumerate(expected) if found]


def test_a_missing_camera_is_named(capsys, stack):
    code, _, err = _detect(capsys, stack.controller, "97")
    assert code == 1 and "no camera 97" in err


def test_key_value_arguments_equal_flags(capsys, stack, data_dir):
    image = str(data_dir / "shapes_02.jpg")
    code, flagged, err = _detect(capsys, stack.controller, image, "--conf", "0.5", "--classes", "32", "62")
    assert code == 0, err
    code = main(["detect", f"source={image}", f"target={stack.controller}", "conf=0.5", "classes=[32,62]"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert _detections(json.loads(out)["results"]) == _detections(flagged)
    assert flagged[0]["detections"] and {d["class_id"] for d in flagged[0]["detections"]} <= {32, 62}


def test_imgsz_other_than_the_served_size_is_refused(capsys, stack, data_dir):
    image = str(data_dir / "shapes_01.jpg")
    assert _detect(capsys, stack.controller, image, "imgsz=640")[0] == 0
    code, _, err = _detect(capsys, stack.controller, image, "imgsz=320")
    assert code == 1 and "served at imgsz 640" in err


def test_agnostic_nms_is_sent(capsys, stack, data_dir):
    image = str(data_dir / "shapes_02.jpg")
    _, per_class, _ = _detect(capsys, stack.controller, image, "--conf", "0.01")
    code, agnostic, err = _detect(capsys, stack.controller, image, "--conf", "0.01", "agnostic_nms=True")
    assert code == 0, err
    assert len(agnostic[0]["detections"]) <= len(per_class[0]["detections"])


def test_saved_images_keep_the_source_format_and_crops_are_cut(capsys, stack, data_dir, tmp_path):
    save_dir = tmp_path / "run"
    code, results, err = _detect(
        capsys, stack.controller, str(data_dir / "shapes_01.jpg"), "--save", "--save-crop", "--save-dir", str(save_dir)
    )
    assert code == 0, err
    assert (save_dir / "shapes_01.jpg").read_bytes()[:3] == b"\xff\xd8\xff"
    crops = sorted((save_dir / "crops").rglob("*.jpg"))
    assert len(crops) == len(results[0]["detections"]) > 0
    assert {p.parent.name for p in crops} == {d["label"] for d in results[0]["detections"]}


def test_classify_and_embed_take_the_same_sources(capsys, stack, tree):
    code = main(["classify", str(tree), "--labels", "a circle,a star", "--target", stack.controller])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert [Path(r["image"]).name for r in json.loads(out)["results"]] == [
        "shapes_03.jpg",
        "shapes_02.jpg",
        "shapes_01.jpg",
    ]
    code = main(["embed", "--image", str(tree / "**" / "*.jpg"), "--target", stack.controller])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert len(json.loads(out)["images"]) == 3


def test_each_spec_kind_resolves_to_its_source(tree, monkeypatch):
    """Without a stack: which spec is read as what (sources.py's table in docs/cli.md)."""
    from inferline.services.cli import sources  # noqa: PLC0415 - the module under test, here only

    (tree / "clip.mp4").write_bytes(b"")
    monkeypatch.chdir(tree)
    found = sources.resolve(
        ["a", "clip.mp4", "0", "rtsp://127.0.0.1:8554/cam", "http://127.0.0.1:1/x.jpg", "http://127.0.0.1:1/v.webm"]
    )
    assert [(type(s).__name__, s.location) for s in found] == [
        ("Image", "a/b/shapes_03.jpg"),
        ("Image", "a/shapes_02.jpg"),
        ("Video", "clip.mp4"),
        ("Video", 0),
        ("Video", "rtsp://127.0.0.1:8554/cam"),
        ("Image", "http://127.0.0.1:1/x.jpg"),
        ("Video", "http://127.0.0.1:1/v.webm"),
    ]
    with pytest.raises(FileNotFoundError, match="no such image, video or directory: nope.jpg"):
        sources.resolve(["nope.jpg"])
    frame = sources.Frame(b"", "clip.mp4#4", ".jpg", "clip.mp4", frame=4, timestamp_s=0.16)
    assert frame.stem == "clip_5"  # ultralytics counts a video's frames from 1 in file names


def test_png_format_names_each_image_and_frame_by_its_stem(capsys, stack, data_dir, tmp_path):
    video = tmp_path / "clip.avi"
    _video(video, data_dir, frames=2)
    out = tmp_path / "png"
    code = main(
        [
            "detect",
            "--target",
            stack.controller,
            str(data_dir / "shapes_03.jpg"),
            str(video),
            "--format",
            "png",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["clip_1.png", "clip_2.png", "shapes_03.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in out.iterdir())
