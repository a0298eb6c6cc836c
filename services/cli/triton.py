"""``inferline triton-repository``: a model of ours as a Triton model repository, so a real
``tritonserver`` (deploy/tools/install-tritonserver.sh) can be the inference stage."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from inferline.common.settings import Settings


def add_commands(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "triton-repository", help="write a Triton model repository (Python backend) serving a model of ours"
    )
    parser.add_argument("--model", required=True, help="a model name from the repository")
    parser.add_argument("--out", type=Path, required=True, help="the model repository folder to write into")
    parser.set_defaults(handler=cmd_triton_repository)


def cmd_triton_repository(args: argparse.Namespace) -> int:
    # torch and the model load only for this command: config.pbtxt carries what the loaded model
    # answers (labels, recipe params, the weights' sha256), as our stage's ModelConfig does.
    from inferline.services.inference.models import ModelManager  # noqa: PLC0415
    from inferline.services.inference.triton import write_repository  # noqa: PLC0415

    manager = ModelManager(dataclasses.replace(Settings.from_env(), models=(args.model,)))
    try:
        manager.load_all()
        folder = write_repository(manager.get(args.model), args.out)
    finally:
        manager.close()
    print(folder)
    return 0
