"""requirements/*.lock pin what pyproject.toml asks for, with hashes, and agree with each other.

./dev setup installs requirements/dev.lock into the venv (``--require-hashes``), the image
installs requirements/image.lock from wheels (Dockerfile); ``./dev lock`` makes both from
pyproject.toml. These tests catch a pyproject.toml change without a new lock, and an image
that would run other versions than the tests did.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DEV_LOCK = ROOT / "requirements" / "dev.lock"
IMAGE_LOCK = ROOT / "requirements" / "image.lock"
PIN = re.compile(r"^(?P<name>[A-Za-z0-9._-]+)==(?P<version>\S+)")
HASH = re.compile(r"--hash=sha256:(?P<digest>[0-9a-f]{64})")


def pins(path: Path) -> dict[str, tuple[str, frozenset[str]]]:
    """name -> (version, hashes) of every requirement in a pip-compile lock file."""
    found: dict[str, tuple[str, frozenset[str]]] = {}
    name = version = None
    hashes: set[str] = set()
    for line in path.read_text().splitlines():
        if match := PIN.match(line):
            if name is not None and version is not None:
                found[name] = (version, frozenset(hashes))
            name, version, hashes = canonicalize_name(match["name"]), match["version"], set()
        hashes.update(match["digest"] for match in HASH.finditer(line))
    if name is not None and version is not None:
        found[name] = (version, frozenset(hashes))
    return found


def requirements(*extras: str) -> list[Requirement]:
    project = PYPROJECT["project"]
    texts = list(project["dependencies"])
    for extra in extras:
        texts += project["optional-dependencies"][extra]
    texts += PYPROJECT["build-system"]["requires"]
    return [Requirement(text) for text in texts]


@pytest.mark.parametrize(
    ("lock", "extras"),
    [(DEV_LOCK, ("test", "demo")), (IMAGE_LOCK, ("demo",))],
    ids=["dev", "image"],
)
def test_lock_pins_what_pyproject_asks_for(lock: Path, extras: tuple[str, ...]) -> None:
    pinned = pins(lock)
    for requirement in requirements(*extras):
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{lock.name} lacks {requirement}: run ./dev lock"
        version, hashes = pinned[name]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{lock.name} pins {name}=={version}, pyproject.toml asks for {requirement}: "
            "run ./dev lock"
        )
        assert hashes, f"{lock.name}: {name} has no hashes"


def test_image_runs_the_versions_the_tests_run() -> None:
    dev, image = pins(DEV_LOCK), pins(IMAGE_LOCK)
    for name, (version, hashes) in image.items():
        assert name in dev, f"{name} is in the image lock only"
        assert dev[name] == (version, hashes), name


def test_venv_has_the_locked_versions() -> None:
    for name, (version, _) in pins(DEV_LOCK).items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{name} is locked but not installed: ./dev setup")
        assert installed == version, f"{name} {installed} installed, {version} locked"


def test_license_is_an_spdx_expression() -> None:
    """A table here makes setuptools print a deprecation on every install."""
    assert PYPROJECT["project"]["license"] == "MIT"
