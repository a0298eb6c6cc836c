"""The export cache: what serving a ``.pt`` with ``backend: onnxruntime`` loads (issue 17).

The export is made once per source file and exporter, checked against the source module on a
fixed input (``export.verify_export``), and recorded beside it (sha256 of both files, the
largest difference); a cached file whose bytes no longer match its record is made again. A
start with a valid cache imports neither torch nor onnx: only the record and the file's hash.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
from pathlib import Path

from inferline.services.inference.repository import ModelConfig

log = logging.getLogger(__name__)

# The opset export.py writes (DEFAULT_OPSET there), and a number bumped when the exported graph
# changes for the same source and versions: both are parts of the cache key.
OPSET = 17
EXPORT_FORMAT = 1


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_export(config: ModelConfig, weights_path: Path, source_sha256: str, cache_dir: Path) -> Path:
    """An ONNX export of ``weights_path`` for ``config``, made once and reused while its record holds.

    The key is the source file's sha256, what the graph is built from (loader, inputs, outputs)
    and the exporter's versions, so a new source or a new torch makes a new file; the record
    (``.json`` beside it) keeps the export's sha256 and the difference measured against the
    source module, so a truncated or altered file is noticed and made again, not served.
    """
    key_fields = {
        "source_sha256": source_sha256,
        "loader": config.loader,
        "inputs": [(t.name, t.dtype, list(t.shape)) for t in config.inputs],
        "outputs": [(t.name, t.dtype, list(t.shape)) for t in config.outputs],
        "parameters": {k: v for k, v in sorted((config.parameters or {}).items()) if k in ("architecture",)},
        "torch": _version("torch"),
        "opset": OPSET,
        "format": EXPORT_FORMAT,
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
    out = Path(cache_dir) / f"{config.name}-{key}.onnx"
    record_path = out.with_suffix(".json")
    if out.is_file() and record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
        except ValueError:
            record = {}
        if record.get("onnx_sha256") == _sha256(out) and record.get("source_sha256") == source_sha256:
            return out
        log.warning("%s: cached export %s does not match its record: exporting again", config.name, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A file of this process's own, renamed into place: concurrent stages never read a half-written one.
    partial = out.with_name(f"{out.stem}.{os.getpid()}.partial.onnx")
    try:
        from inferline.services.inference import export  # noqa: PLC0415 - torch and onnx, only to export

        export.export_onnx(config, weights_path, partial, dynamic_batch=config.loader != "torchvision_detection")
        difference = export.verify_export(config, weights_path, partial)
        record = {**key_fields, "onnx_sha256": _sha256(partial), "max_abs_diff": difference}
        os.replace(partial, out)
        record_path.write_text(json.dumps(record, indent=1) + "\n")
    finally:
        partial.unlink(missing_ok=True)
    for stale in out.parent.glob(f"{config.name}-*.onnx"):
        # Only this model's own older exports (<name>-<16 hex>), never yolov8n-seg's for yolov8n.
        name, _, key_part = stale.stem.rpartition("-")
        if stale != out and name == config.name and len(key_part) == 16:
            stale.unlink(missing_ok=True)
            stale.with_suffix(".json").unlink(missing_ok=True)
    log.info("%s: exported %s to %s (max abs difference to the source %.2g)",
             config.name, weights_path, out, difference)
    return out
