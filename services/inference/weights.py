"""Finding model weights and checking them against the model's integrity policy.

Order: the config's explicit ``weights.path``; then ``$INFERLINE_MODEL_DIR/<file>``; then the
official download a user gets online, through the model library's own downloader. Offline and
missing, the error names the file and where to put it.

The file's sha256 is checked here, before any loader opens it: ultralytics checkpoints are
pickles, and unpickling a file runs whatever code it holds. The policy is the config's
``weights.verify`` (docs/reliability-security.md); an operator may also pin files by digest in
``INFERLINE_TRUSTED_WEIGHTS`` (the stand-in weights that tests and the demo serve).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from inferline.common.errors import WeightsError
from inferline.common.registry import Registry
from inferline.services.inference.repository import WeightsSpec, parse_sha256

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path.home() / ".cache" / "inferline" / "models"

# source name -> function(file name, destination path) that fetches the official file.
Downloader = Callable[[str, Path], None]
DOWNLOADERS: Registry[Downloader] = Registry("weights source")


@DOWNLOADERS.register("ultralytics")
def _download_ultralytics(file: str, dest: Path) -> None:
    from ultralytics.utils.downloads import attempt_download_asset  # noqa: PLC0415 - the family's library only to download

    attempt_download_asset(str(dest))


@DOWNLOADERS.register("torchvision")
def _download_torchvision(file: str, dest: Path) -> None:
    from torch.hub import download_url_to_file  # noqa: PLC0415 - the family's library only to download

    prefix = file.rsplit("-", 1)[-1].split(".")[0]  # torchvision names files <name>-<sha256 prefix>.pth
    download_url_to_file(f"https://download.pytorch.org/models/{file}", str(dest), hash_prefix=prefix)


@DOWNLOADERS.register("open_clip")
def _download_open_clip(file: str, dest: Path) -> None:
    """OpenAI's CLIP ViT-B-32 weights as open_clip serves them (its hub copy, safetensors)."""
    from open_clip.pretrained import download_pretrained_from_hf  # noqa: PLC0415 - the family's library only to download

    shutil.copyfile(
        download_pretrained_from_hf("timm/vit_base_patch32_clip_224.openai", filename="open_clip_model.safetensors"),
        dest,
    )


TRUSTED_SETTING = "INFERLINE_TRUSTED_WEIGHTS"


@dataclass(frozen=True)
class ResolvedWeights:
    path: Path
    sha256: str
    official: bool
    # Why the file is served: the official release, a pin (the config's or the operator's), or
    # ``verify: warn``; for the load log and tests.
    trusted_by: str = ""


def trusted_digests(pins: Sequence[str]) -> frozenset[str]:
    """``INFERLINE_TRUSTED_WEIGHTS`` entries (``sha256:<hex>``) as digests; a malformed one is
    a configuration error at start-up, not a silently ignored pin."""
    return frozenset(parse_sha256(pin, TRUSTED_SETTING) for pin in pins)


def resolve_weights(
    spec: WeightsSpec,
    *,
    model: str,
    model_dir: Sequence[Path],
    allow_download: bool,
    cache_dir: Path = DEFAULT_CACHE,
    trusted: Sequence[str] = (),
) -> ResolvedWeights:
    """The weights file, found and verified: it is hashed, and refused unless the policy (or an
    operator's pin in ``trusted``) accepts it, before anything reads it as a model."""
    pins = trusted_digests(trusted)
    path = _locate(spec, model=model, model_dir=model_dir, allow_download=allow_download, cache_dir=cache_dir)
    digest = sha256_of(path)
    # A short checksum is a prefix, as torchvision's file names carry (``...-907ea3f9.pth``).
    official = spec.sha256 is not None and digest.startswith(spec.sha256.lower())
    verify = spec.verify
    if (verify.mode == "official" and official) or (verify.mode == "sha256" and digest == verify.pin):
        trusted_by = "official release" if verify.mode == "official" else "pinned in the model config"
    elif digest in pins:
        trusted_by = f"pinned by {TRUSTED_SETTING}"
        log.warning("%s: serving %s (sha256 %s): it is not what the model config trusts (verify: %s), "
                    "but %s pins it", model, path, digest, verify, TRUSTED_SETTING)
    elif verify.mode == "warn":
        trusted_by = "official release" if official else "unverified (verify: warn)"
        if not official:
            log.warning("%s: serving %s unverified (sha256 %s; the model config says verify: warn)", model, path,
                        digest)
    else:
        raise WeightsError(_refusal(spec, model=model, path=path, digest=digest))
    return ResolvedWeights(path=path, sha256=digest, official=official, trusted_by=trusted_by)


def _refusal(spec: WeightsSpec, *, model: str, path: Path, digest: str) -> str:
    if spec.verify.mode == "official":
        expected, fix = (
            f"the official release of {spec.file} (sha256 {spec.sha256})",
            f"put the official {spec.file} there",
        )
    else:
        expected, fix = f"the file pinned by verify: {spec.verify}", "put the pinned file there"
    return (
        f"{model}: refusing weights file {path}: its sha256 is {digest}, but the model config trusts only "
        f"{expected}; the file was not loaded. Either {fix}, or, if you trust this file, pin it: "
        f"verify: sha256:{digest} under weights in the model's config.yaml, or {TRUSTED_SETTING}=sha256:{digest}"
    )


def find_local(spec: WeightsSpec, model_dir: Sequence[Path], cache_dir: Path = DEFAULT_CACHE) -> Path | None:
    """The weights file already on disk, if any, in resolution order (no download)."""
    if spec.path is not None:
        return spec.path if spec.path.is_file() else None
    for candidate in (*(folder / spec.file for folder in model_dir), cache_dir / spec.file):
        if candidate.is_file():
            return candidate
    return None


def _locate(
    spec: WeightsSpec, *, model: str, model_dir: Sequence[Path], allow_download: bool, cache_dir: Path
) -> Path:
    found = find_local(spec, model_dir, cache_dir)
    if found is not None:
        return found
    if spec.path is not None:
        raise WeightsError(f"{model}: weights.path {spec.path} in the model config does not exist")
    looked = []
    if model_dir:
        looked.append(f"$INFERLINE_MODEL_DIR ({os.pathsep.join(map(str, model_dir))})")
    cached = cache_dir / spec.file
    looked.append(f"the download cache ({cache_dir})")
    where = model_dir[0] if model_dir else cache_dir
    advice = f"put {spec.file} in {where} (or point INFERLINE_MODEL_DIR at the folder that has it)"
    if spec.source is None or not allow_download:
        reason = "downloads are off (INFERLINE_ALLOW_DOWNLOAD=false)" if spec.source else "it has no download source"
        raise WeightsError(
            f"{model}: weights file {spec.file} not found in {', '.join(looked)}, and {reason}; {advice}"
        )
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        DOWNLOADERS.get(spec.source)(spec.file, cached)
    except Exception as exc:  # any download failure ends in the same advice
        log.debug("download of %s failed", spec.file, exc_info=exc)
        reason = f"the official download failed ({type(exc).__name__}: {exc})"
    else:
        if cached.is_file():
            return cached
        reason = "the official download did not produce it (offline?)"
    raise WeightsError(f"{model}: weights file {spec.file} not found in {', '.join(looked)}, and {reason}; {advice}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
