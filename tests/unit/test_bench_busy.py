"""``inferline bench``'s model busy: read from the stage's /metrics before and after a run."""

from __future__ import annotations

from pathlib import Path

from inferline.services.cli.bench import BusyReading, busy_ratio, scrape_busy

PAGE = """\
# HELP inferline_model_busy_seconds_total Seconds each instance of the model spent running batches.
# TYPE inferline_model_busy_seconds_total counter
inferline_model_busy_seconds_total{model_instance="0",model="yolov8n"} 12.5
inferline_model_busy_seconds_total{model_instance="1",model="yolov8n"} 10.0
inferline_model_busy_seconds_total{model_instance="0",model="clip-vit-b-32"} 99.0
"""


def test_busy_seconds_are_summed_over_the_model_s_instances_only(tmp_path: Path):
    page = tmp_path / "metrics"
    page.write_text(PAGE)
    reading = scrape_busy(page.as_uri(), "yolov8n")
    assert reading is not None and (reading.seconds, reading.instances) == (22.5, 2)


def test_a_page_without_the_model_or_no_page_gives_no_reading(tmp_path: Path):
    page = tmp_path / "metrics"
    page.write_text(PAGE)
    assert scrape_busy(page.as_uri(), "nope") is None
    assert scrape_busy((tmp_path / "missing").as_uri(), "yolov8n") is None


def test_busy_ratio_is_busy_instance_seconds_over_the_instance_seconds_passed():
    before, after = BusyReading(10.0, 2, at=100.0), BusyReading(25.0, 2, at=110.0)
    assert busy_ratio(before, after) == 0.75
    assert busy_ratio(None, after) is None
    assert busy_ratio(after, after) is None
