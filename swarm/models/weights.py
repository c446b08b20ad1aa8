"""Read selected tensors straight from a model folder's safetensors files (single or sharded).

Only the requested tensors are read, so a server's memory grows with its span, not with the model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)


def tensor_index(folder: Path) -> dict[str, Path]:
    """Map each tensor name in the folder to the safetensors file that holds it."""
    folder = Path(folder)
    index_file = folder / "model.safetensors.index.json"
    if index_file.exists():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder}")
    index: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="pt") as reader:
            index.update({name: file for name in reader.keys()})
    return index


def load_tensors(
    folder: Path, select: Callable[[str], bool], dtype: torch.dtype, index: dict[str, Path] | None = None
) -> dict[str, torch.Tensor]:
    """Load the tensors whose names ``select`` accepts, converted to ``dtype``."""
    index = index if index is not None else tensor_index(folder)
    by_file: dict[Path, list[str]] = {}
    for name, file in index.items():
        if select(name):
            by_file.setdefault(file, []).append(name)
    result: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as reader:
            for name in names:
                result[name] = reader.get_tensor(name).to(dtype)
    return result
