"""``inferline fetch-models``: each model's weights from its source into the cache folder, verified
(the Helm chart's init container; services/inference/storage.py says what each scheme does)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from inferline.common.settings import Settings
from inferline.services.cli import shared
from inferline.services.inference.repository import BUILTIN_REPOSITORY, load_repository
from inferline.services.inference.storage import ModelSource, RetryPolicy, fetch_all, load_sources


def add_commands(commands: argparse._SubParsersAction) -> None:
    fetch = commands.add_parser("fetch-models", help="fetch and verify model weights into a cache folder")
    fetch.add_argument("--sources", type=Path, help="sources file (default: INFERLINE_MODEL_SOURCES)")
    fetch.add_argument("--dest", type=Path, help="cache folder (default: the first INFERLINE_MODEL_DIR)")
    fetch.add_argument(
        "--attempts",
        type=int,
        help="tries while the store is unreachable; 0: for ever (default: INFERLINE_FETCH_ATTEMPTS)",
    )
    fetch.set_defaults(handler=cmd_fetch_models)


def cmd_fetch_models(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    sources_file = args.sources or settings.model_sources
    dest = args.dest or (settings.model_dir[0] if settings.model_dir else None)
    if sources_file is None or dest is None:
        return shared.fail("give --sources and --dest (or INFERLINE_MODEL_SOURCES and INFERLINE_MODEL_DIR)")
    policy = RetryPolicy(
        attempts=settings.fetch_attempts if args.attempts is None else args.attempts,
        backoff_s=settings.fetch_backoff_s,
        max_backoff_s=settings.fetch_max_backoff_s,
        timeout_s=settings.fetch_timeout_s,
    )
    paths = fetch_all(
        load_sources(sources_file),
        dest,
        environ=os.environ,
        policy=policy,
        pvc_root=settings.pvc_root,
        exporter=_export_onnx,
    )
    for path in paths:
        print(path)
    return 0


def _export_onnx(source: ModelSource, weights: Path, out: Path) -> None:
    """The built-in (PyTorch) config of the model, exported as ``inferline export`` does: batch 1,
    which the ONNX Runtime backend runs item by item. torch loads only here."""
    from inferline.services.inference.export import export_onnx  # noqa: PLC0415 - torch only to export

    configs = load_repository(BUILTIN_REPOSITORY)
    if source.model not in configs:
        raise FileNotFoundError(
            f"{source.model}: export: onnx needs a built-in model of that name (built-in: {', '.join(sorted(configs))})"
        )
    export_onnx(configs[source.model], weights, out, dynamic_batch=False)
