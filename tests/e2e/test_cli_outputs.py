"""What `inferline detect` writes as `yolo predict` and `yolo val` users know it: YOLO label
files byte for byte as ultralytics' ``save_txt``, COCO JSON that pycocotools scores (`inferline
eval`), and an mAP that agrees with ultralytics' own validator."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import pytest
import yaml

from inferline.services.cli import main


@pytest.fixture(scope="module")
def reference(yolo_weights):
    from ultralytics import YOLO  # noqa: PLC0415 - the reference library, for this module only

    return YOLO(str(yolo_weights))


@pytest.mark.parametrize("save_conf", [False, True])
def test_yolo_label_files_equal_ultralytics_save_txt(stack, data_dir, reference, tmp_path, capsys, save_conf):
    images = sorted(data_dir.glob("shapes_*.jpg"))
    for path in images:
        result = reference.predict(str(path), verbose=False, device="cpu")[0]
        result.save_txt(tmp_path / "theirs" / f"{path.stem}.txt", save_conf=save_conf)
    flags = ["--save-txt", "--save-dir", str(tmp_path / "ours"), "--format", "csv", "--out", str(tmp_path / "x.csv")]
    code = main(["detect", "--target", stack.controller, str(data_dir), *flags, *(["--save-conf"] * save_conf)])
    assert code == 0, capsys.readouterr().err
    theirs = {p.name: p.read_text() for p in sorted((tmp_path / "theirs").iterdir())}
    ours = {p.name: p.read_text() for p in sorted((tmp_path / "ours" / "labels").iterdir())}
    assert len(theirs) == len(images)
    assert ours == theirs


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
