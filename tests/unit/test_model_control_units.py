"""Model control's parts that need no model: the batcher's drain, the statistics, the repository's
JSON config form, and the controller following models that change (docs/model-control.md)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from inferline.common.errors import ConfigError
from inferline.common.settings import Settings
from inferline.services.controller import plan as plan_module
from inferline.services.controller.plan import PlanCache
from inferline.services.controller.ports import Deadline
from inferline.services.controller.stages import StageWatcher
from inferline.services.inference.batching import BatchingConfig, DynamicBatcher
from inferline.services.inference.repository import BUILTIN_REPOSITORY, parse_config
from inferline.services.inference.statistics import ModelStats


def test_drain_returns_only_once_the_items_held_have_their_results():
    stats = ModelStats()
    ran: list[int] = []

    def slow(items):
        time.sleep(0.1)
        ran.extend(items)
        return [item * 2 for item in items]

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            batcher = DynamicBatcher("drain-test", slow, pool, BatchingConfig(max_batch_size=4), stats)
            calls = asyncio.gather(batcher.submit([("k", 1)]), batcher.submit([("k", 2)]))
            await asyncio.sleep(0.01)
            await batcher.drain()
            assert batcher.depth == 0 and batcher.running == 0
            # Every item held was run before drain returned (its caller's task may take one more
            # turn of the loop to see its result).
            done = sorted(ran) == [1, 2]
            results = await calls
            await batcher.close()
            return done, results

    done, results = asyncio.run(scenario())
    assert done and results == [[2], [4]]
    # Queue waits and the outputs' hand-off are timed per item.
    assert stats.queue.count == 2 and stats.compute_output.count == 2


def test_statistics_keep_per_batch_size_passes_and_per_item_counts():
    stats = ModelStats()
    stats.pass_ran(4, 0.001, 0.010)
    stats.pass_ran(4, 0.001, 0.012)
    stats.pass_ran(1, 0.001, 0.005)
    stats.request(0.02, ok=True)
    stats.request(0.01, ok=False)
    assert (stats.inference_count, stats.execution_count) == (9, 3)
    assert stats.compute_infer.count == 9 and stats.compute_infer.ns == 10_000_000 + 12_000_000 + 5_000_000
    assert {size: b.compute_infer.count for size, b in stats.batches.items()} == {4: 2, 1: 1}
    assert (stats.success.count, stats.fail.count) == (1, 1) and stats.last_inference_ms > 0


def test_the_json_form_of_a_config_is_validated_as_its_file_is():
    raw = yaml.safe_load((BUILTIN_REPOSITORY / "yolov8n" / "config.yaml").read_text())
    where = Path("/repo/yolov8n/config.yaml")
    assert parse_config(raw, where).name == "yolov8n"
    with pytest.raises(ConfigError, match="dynamic_batching: 'max_queue_size' must be a positive integer"):
        parse_config({**raw, "dynamic_batching": {"max_queue_size": -1}}, where)
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_config(["not", "a", "mapping"], where)


def test_the_stage_watcher_reports_models_whose_state_or_version_changed():
    changed: list[str] = []

    async def scenario():
        watcher = StageWatcher(Settings(), {}, on_model_change=changed.append)
        watcher._changed({"a": "1", "b": "1", "c": "1"}, {"a": "1", "b": "2", "d": "1"})
        await watcher.close()

    asyncio.run(scenario())
    assert changed == ["b", "c", "d"]


def test_a_forgotten_plan_is_fetched_again(monkeypatch):
    monkeypatch.setattr(plan_module.ModelPlan, "from_info", classmethod(lambda cls, info: info))
    fetched: list[str] = []

    async def fetch(name, deadline):
        fetched.append(name)
        return f"plan {len(fetched)}"

    async def scenario():
        cache = PlanCache(fetch)
        first = await cache.get("yolov8n", Deadline(5))
        again = await cache.get("yolov8n", Deadline(5))
        cache.forget("yolov8n")
        cache.forget("never-cached")
        return first, again, await cache.get("yolov8n", Deadline(5))

    assert asyncio.run(scenario()) == ("plan 1", "plan 1", "plan 2")
    assert fetched == ["yolov8n", "yolov8n"]
