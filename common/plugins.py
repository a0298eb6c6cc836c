"""Importing a package's family modules, so each registers its recipes or loaders."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path


def import_family_modules(package: str, package_file: str, suffix: str) -> list[str]:
    """Imports every module of ``package`` whose name ends with ``suffix``; returns their names.

    A new model family adds one module (``clip_recipes.py``, ``torchvision_loader.py``) and
    nothing else needs to list it.
    """
    names = []
    for module in pkgutil.iter_modules([str(Path(package_file).parent)]):
        if module.name.endswith(suffix):
            importlib.import_module(f"{package}.{module.name}")
            names.append(module.name)
    return names
