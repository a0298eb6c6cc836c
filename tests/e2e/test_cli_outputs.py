"""What `inferline detect` writes as `yolo predict` and `yolo val` users know it: YOLO label
files byte for byte as ultralytics' ``save_txt``, COCO JSON that pycocotools scores (`inferline
eval`), and an mAP that agrees with ultralytics' own validator."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from inferline.common.detections import Detection
from inferline.services.cli import main
from inferline.services.presentation import exports


@pytest.fixture(scope="module")
def reference(yolo_weights):
    from ultralytics import YOLO  # noqa: PLC0415 - the reference library, for this module only

    return YOLO(str(yolo_weights))


@pytest.mark.parametrize("save_conf", [False, True])
def test_label_lines_are_ultralytics_save_txt_byte_for_byte(data_dir, reference, tmp_path, save_conf):
    """The writer alone, fed ultralytics' own boxes: the same bytes as ``Results.save_txt``."""
    for path in sorted(data_dir.glob("shapes_*.jpg")):
        result = reference.predict(str(path), verbose=False, device="cpu")[0]
        theirs = Path(result.save_txt(tmp_path / f"{path.stem}.txt", save_conf=save_conf))
        detections = [
            Detection(result.names[int(c)], int(c), s, tuple(box))
            for box, s, c in zip(
                result.boxes.xyxy.numpy(), result.boxes.conf.numpy(), result.boxes.cls.numpy(), strict=True
            )
        ]
        height, width = result.orig_shape
        ours = exports.yolo_lines(detections, width, height, save_conf=save_conf)
        assert "".join(line + "\n" for line in ours) == (theirs.read_text() if theirs.exists() else "")


def _label_values(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.loadtxt(p, ndmin=2) for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("save_conf", [False, True])
def test_yolo_label_files_equal_ultralytics_save_txt(stack, data_dir, reference, tmp_path, capsys, save_conf):
    """Through the stack: the same files, lines and classes, and the same numbers; byte for byte
    when torch runs the stage and the reference with one thread count (this file alone: seen),
    else to the last printed digit (a convolution's sums are ordered by its threads)."""
    images = sorted(data_dir.glob("shapes_*.jpg"))
    for path in images:
        result = reference.predict(str(path), verbose=False, device="cpu")[0]
        result.save_txt(tmp_path / "theirs" / f"{path.stem}.txt", save_conf=save_conf)
    flags = ["--save-txt", "--save-dir", str(tmp_path / "ours"), "--format", "csv", "--out", str(tmp_path / "x.csv")]
    code = main(["detect", "--target", stack.controller, str(data_dir), *flags, *(["--save-conf"] * save_conf)])
    assert code == 0, capsys.readouterr().err
    theirs = _label_values(tmp_path / "theirs")
    ours = _label_values(tmp_path / "ours" / "labels")
    assert len(theirs) == len(images) and ours.keys() == theirs.keys()
    for name, values in theirs.items():
        assert ours[name].shape == values.shape, name
        assert (ours[name][:, 0] == values[:, 0]).all(), name
        np.testing.assert_allclose(ours[name][:, 1:], values[:, 1:], rtol=0, atol=2e-6, err_msg=name)


def _predictions(stack, data_dir: Path, save_dir: Path, capsys) -> Path:
    """detect --save-json over the test images at the validator's thresholds."""
    code = main(
        [
            "detect",
            "--target",
            stack.controller,
            str(data_dir),
            "conf=0.001",
            "iou=0.7",
            "save_json=True",
            "--save-dir",
            str(save_dir),
            "--format",
            "csv",
            "--out",
            str(save_dir / "all.csv"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    return save_dir / "predictions.json"


def _eval(capsys, predictions: Path, gt: Path) -> dict[str, float]:
    assert main(["eval", str(predictions), "--gt", str(gt), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_coco_json_is_scored_by_pycocotools(stack, data_dir, tmp_path, capsys):
    predictions = _predictions(stack, data_dir, tmp_path / "run", capsys)
    entries = json.loads(predictions.read_text())
    assert entries and set(entries[0]) == {"image_id", "file_name", "category_id", "bbox", "score"}
    assert {e["file_name"] for e in entries} == {p.name for p in data_dir.glob("shapes_*.jpg")}
    figures = _eval(capsys, predictions, data_dir / "shapes_labels.json")
    assert 0.5 < figures["mAP50-95"] <= figures["mAP50"] <= 1.0
    nothing = tmp_path / "none.json"
    nothing.write_text("[]")
    assert _eval(capsys, nothing, data_dir / "shapes_labels.json")["mAP50-95"] == 0.0


def test_eval_reads_coco_ground_truth_as_it_is(tmp_path, capsys):
    truth = {
        "images": [{"id": 7, "file_name": "a.jpg", "width": 100, "height": 100}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0}
        ],
        "categories": [{"id": 3, "name": "thing"}],
    }
    (tmp_path / "gt.json").write_text(json.dumps(truth))
    exact = [{"image_id": "a", "file_name": "a.jpg", "category_id": 3, "bbox": [10, 10, 40, 40], "score": 0.9}]
    (tmp_path / "p.json").write_text(json.dumps(exact))
    figures = _eval(capsys, tmp_path / "p.json", tmp_path / "gt.json")
    assert figures["mAP50-95"] == pytest.approx(1.0) and figures["mAP50"] == pytest.approx(1.0)


def _yolo_dataset(data_dir: Path, root: Path, names: dict[int, str]) -> Path:
    """The test images with their ground truth as YOLO labels, and the data file `yolo val` reads."""
    truth = json.loads((data_dir / "shapes_labels.json").read_text())
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for name, objects in truth["images"].items():
        shutil.copy(data_dir / name, root / "images" / name)
        height, width = cv2.imread(str(data_dir / name)).shape[:2]
        lines = [
            f"{o['ultralytics_id']} {(x1 + x2) / 2 / width} {(y1 + y2) / 2 / height} {(x2 - x1) / width} "
            f"{(y2 - y1) / height}"
            for o in objects
            for x1, y1, x2, y2 in [o["box"]]
        ]
        (root / "labels" / f"{Path(name).stem}.txt").write_text("\n".join(lines) + "\n")
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(root), "train": "images", "val": "images", "names": names}))
    return data


@pytest.mark.slow
def test_eval_agrees_with_ultralytics_validator(stack, data_dir, reference, tmp_path, capsys, monkeypatch):
    """Square letterbox (rect=False), as the stack preprocesses; docs/cli.md gives rect=True's
    figure and why it differs."""
    monkeypatch.setattr("ultralytics.utils.checks.AUTOINSTALL", False)  # never pip-install mid-test
    data = _yolo_dataset(data_dir, tmp_path / "dataset", reference.names)
    metrics = reference.val(
        data=str(data),
        imgsz=640,
        batch=1,
        conf=0.001,
        iou=0.7,
        device="cpu",
        rect=False,
        save_json=False,
        plots=False,
        verbose=False,
        project=str(tmp_path / "val"),
        name="run",
    )
    ours = _eval(capsys, _predictions(stack, data_dir, tmp_path / "run", capsys), data_dir / "shapes_labels.json")
    assert ours["mAP50-95"] == pytest.approx(metrics.box.map, abs=0.01)
