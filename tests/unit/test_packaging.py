"""Every hand-written package is installed under the `inferline` namespace, none top-level."""

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_python_package_folder_is_listed_in_pyproject():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = set()
    for prefix, folder in setuptools["package-dir"].items():
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / folder).parts
            found.add(".".join((prefix, *relative)))
    assert found == listed


def test_nothing_is_installed_as_a_top_level_common_or_services():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(name.startswith("inferline.") for name in setuptools["packages"])


def test_container_requirements_cover_the_base_dependencies():
    """The images install inferline with --no-deps and pinned requirements files: a dependency
    added to pyproject but not to the images would only fail inside a container."""
    import re  # noqa: PLC0415

    root = Path(__file__).resolve().parents[2]
    base = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]

    def name(spec: str) -> str:
        return re.split(r"[<>=!~\[; ]", spec.strip(), maxsplit=1)[0].lower().replace("_", "-")

    folder = root / "deploy" / "docker" / "requirements"
    common = {
        name(line)
        for line in (folder / "common.txt").read_text().splitlines()
        if line and not line.startswith(("#", "-r"))
    }
    for stage in ("controller", "preprocess", "postprocess", "inference-onnx", "gateway"):
        pinned = set(common) | {
            name(line)
            for line in (folder / f"{stage}.txt").read_text().splitlines()
            if line and not line.startswith(("#", "-r"))
        }
        needed = {name(spec) for spec in base} - {"opencv-python-headless", "pillow", "ftfy", "regex"}
        assert needed <= pinned, f"{stage} image lacks {sorted(needed - pinned)}"


def _pinned(requirements: Path) -> dict[str, str]:
    """name -> version of the `name==version` lines of one requirements file, its -r includes too."""
    import re  # noqa: PLC0415

    pins: dict[str, str] = {}
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            pins |= _pinned(requirements.parent / line[3:].strip())
        elif line:
            name, _, version = line.partition("==")
            assert version, f"{requirements.name}: {line!r} is not pinned with =="
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_gateway_image_pins_the_gateway_extra_and_no_model_libraries():
    """The gateway image runs `inferline serve gateway` with exactly pyproject's `gateway` extra
    on top of the common packages; it decodes no image and runs no model."""
    import re  # noqa: PLC0415

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gateway"]
    needed = {re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0]).lower() for spec in extra}
    pinned = _pinned(REPO / "deploy" / "docker" / "requirements" / "gateway.txt")
    assert needed <= set(pinned), f"gateway image lacks {sorted(needed - set(pinned))}"
    assert not {"torch", "torchvision", "ultralytics", "opencv-python-headless", "pillow", "onnxruntime"} & set(pinned)
