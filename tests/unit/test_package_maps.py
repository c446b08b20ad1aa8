"""Each package's ``__init__`` docstring is its map (hivemind's convention): it names every module and
subpackage the package holds, and names none that are gone."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOP = ("proto", "swarm", "server", "client")


def _packages() -> list[Path]:
    found = []
    for top in TOP:
        found += sorted(init.parent for init in (ROOT / top).rglob("__init__.py") if "static" not in init.parts)
    return found


def _children(package: Path) -> set[str]:
    """Modules (without .py) and subpackages of a package."""
    names = {p.stem for p in package.glob("*.py") if p.name != "__init__.py"}
    names |= {p.name for p in package.iterdir() if (p / "__init__.py").exists()}
    return names


def _docstring(package: Path) -> str:
    return ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""


@pytest.mark.timeout(30)
@pytest.mark.parametrize("package", _packages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_package_map_lists_its_modules(package: Path):
    doc = _docstring(package)
    missing = sorted(name for name in _children(package) if f"``{name}``" not in doc and f"``{name}/``" not in doc)
    assert not missing, f"{package.relative_to(ROOT)}/__init__.py does not list {missing}"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("package", _packages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_package_map_names_no_missing_module(package: Path):
    """A map entry (a line starting with ``- ``name``:``) names a module or folder that exists."""
    listed = re.findall(r"^\s*- ``([\w.]+)/?``", _docstring(package), flags=re.M)
    existing = _children(package) | {p.name for p in package.iterdir() if p.is_dir()}
    stale = sorted(name for name in listed if name not in existing)
    assert not stale, f"{package.relative_to(ROOT)}/__init__.py lists modules that do not exist: {stale}"
