"""``inferline demo``: start the stack, detect (and zero-shot label) the sample images, stop it."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

from inferline.common.api import ClassifyRequest, DetectRequest
from inferline.common.errors import InvalidInput
from inferline.common.settings import Settings
from inferline.common.tasks import tasks_for
from inferline.services.cli import shared
from inferline.services.cli.predict import classify_paths, detect_paths, write_pngs
from inferline.services.client import Client, collect_images, defaults
from inferline.services.inference.repository import BUILTIN_REPOSITORY, ModelConfig, load_repository
from inferline.services.inference.weights import find_local
from inferline.services.presentation import documents
from inferline.services.stack import LocalStack

# Labels for the demo's zero-shot step: the stand-in detectors were trained on these shapes.
DEMO_LABELS = ("a circle", "a triangle", "a square", "a star")


def add_commands(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="start the stack, detect the sample images, stop the stack")
    demo.add_argument("--images", nargs="*", default=[], help="more images or directories")
    demo.add_argument("--out", type=Path, default=Path("out/demo"))
    demo.set_defaults(handler=cmd_demo)


def sample_images() -> list[Path]:
    """ultralytics ships bus.jpg and zidane.jpg inside its package: samples that need no network.

    Found without importing ultralytics, whose import sets OMP_NUM_THREADS=1 in this process's
    environment, which the stages started next would inherit.
    """
    spec = importlib.util.find_spec("ultralytics")
    if spec is None or not spec.submodule_search_locations:
        return []
    assets = Path(next(iter(spec.submodule_search_locations))) / "assets"
    return [p for p in (assets / "bus.jpg", assets / "zidane.jpg") if p.is_file()]


def demo_models(settings: Settings) -> tuple[dict[str, ModelConfig], list[str]]:
    """The repository's models whose weights are on disk here, and the names of the rest."""
    configs = load_repository(settings.model_repository or BUILTIN_REPOSITORY, settings.models)
    if settings.models:
        return configs, []
    present = {name: c for name, c in configs.items() if find_local(c.weights, settings.model_dir) is not None}
    return present, [name for name in configs if name not in present]


def zero_shot(
    client: Client, embedders: list[str], paths: list[Path], out: Path
) -> tuple[list[str], list[tuple[str, Exception | None]]]:
    """Classifies the images with every embedding model that can, which the server decides (an
    image tower with a text tower beside it can; a text tower alone cannot, and says so with
    INVALID_ARGUMENT). Returns those models and the images that failed."""
    capable, failed = [], []
    for model in embedders:
        try:
            results = classify_paths(client, ClassifyRequest(model, (), DEMO_LABELS, top_k=1), paths)
        except InvalidInput:
            continue
        capable.append(model)
        path = out / model / "classify.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"results": documents.classify_results(results)}, indent=2))
        print(f"\n{model} zero-shot against {list(DEMO_LABELS)}: {path}")
        failed += [(image.name, image.error) for result in results for image in result.images]
    return capable, failed


def cmd_demo(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    paths = sample_images() + (collect_images(args.images) if args.images else [])
    if not paths:
        return shared.fail("no sample images (install ultralytics, or pass --images DIR)")
    models, skipped = demo_models(settings)
    if not any(c.task in tasks_for("Detect") for c in models.values()):
        where = os.pathsep.join(map(str, settings.model_dir)) or "INFERLINE_MODEL_DIR (unset)"
        return shared.fail(f"no detection model has its weights in {where}; put {defaults.DETECT_MODEL}.pt there")
    where = os.pathsep.join(map(str, settings.model_dir)) or "the default locations"
    print(f"starting the stack with {', '.join(models)} (weights from {where}) ...", flush=True)
    if skipped:
        print(f"  (skipping {', '.join(skipped)}: no weights here)", flush=True)
    # The stages log warnings only (the weights check among them), so the demo's output reads.
    env = {"INFERLINE_LOG_LEVEL": "WARNING", **os.environ, "INFERLINE_MODELS": ",".join(models)}
    with LocalStack(settings, env=env) as stack, Client(stack.controller_target, settings, timeout=300) as client:
        served = {m.name: m for m in client.models(timeout=30)}
        labellers, failed = zero_shot(client, [n for n, m in served.items() if m.task == "embed"], paths, args.out)
        for model in [n for n, m in served.items() if m.task in tasks_for("Detect")]:
            request = DetectRequest(
                model, (), render=("png",),
                classify_with=labellers[0] if labellers else "", labels=DEMO_LABELS if labellers else (),
            )
            results = detect_paths(client, request, paths)
            folder = args.out / model
            folder.mkdir(parents=True, exist_ok=True)
            document = {"results": documents.detect_results(results)}
            (folder / "detections.json").write_text(json.dumps(document, indent=2))
            pngs = write_pngs(results, folder / "annotated")
            print(f"\n{model}: {folder / 'detections.json'}, {len(pngs)} annotated PNGs in {folder / 'annotated'}")
            for image in (image for result in results for image in result.images):
                summary = ", ".join(f"{d.label} {d.score:.2f}" for d in image.detections[:5]) or "nothing"
                more = f" (+{len(image.detections) - 5} more)" if len(image.detections) > 5 else ""
                print(f"  {Path(image.name).name}: {summary}{more}")
            failed += [(image.name, image.error) for result in results for image in result.images]
    print()
    for name in models:
        if name in served:
            weights = served[name].weights
            verdict = (
                "the official release" if weights.official else "NOT the official release (a stand-in or custom file)"
            )
            print(f"weights of {name}: {weights.path} are {verdict}")
    return shared.report_failures(failed)
