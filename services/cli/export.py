"""``inferline export``: a model of the repository as an ONNX file, for the ONNX Runtime backend."""

from __future__ import annotations

import argparse
from pathlib import Path

from inferline.common.settings import Settings
from inferline.services.cli import shared
from inferline.services.inference.repository import BUILTIN_REPOSITORY, load_repository


def add_commands(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser("export", help="export a model of the repository to ONNX")
    export.add_argument("--model", required=True, help="a model name from the repository")
    export.add_argument("--format", choices=("onnx",), default="onnx")
    export.add_argument("--dynamic-batch", action="store_true", help="a batch dimension of any size (else 1)")
    export.add_argument("--half", action="store_true", help="fp16 weights (for GPUs)")
    export.add_argument("--out", type=Path, help="output file (default: MODEL.onnx here)")
    export.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    # torch and the exporters load only for this command.
    from inferline.services.inference.export import export_onnx  # noqa: PLC0415
    from inferline.services.inference.weights import resolve_weights  # noqa: PLC0415

    settings = Settings.from_env()
    configs = load_repository(settings.model_repository or BUILTIN_REPOSITORY)
    if args.model not in configs:
        return shared.fail(f"no model {args.model!r} in the repository (models: {', '.join(sorted(configs))})")
    config = configs[args.model]
    weights = resolve_weights(
        config.weights, model=config.name, model_dir=settings.model_dir, allow_download=settings.allow_download,
        trusted=settings.trusted_weights,
    )
    out = args.out or Path(f"{config.name}.onnx")
    try:
        path = export_onnx(config, weights.path, out, dynamic_batch=args.dynamic_batch, half=args.half)
    except (NotImplementedError, ValueError) as exc:
        return shared.fail(str(exc))
    print(path)
    return 0
