"""LoRA adapters of the remote blocks: the weights, which linear layers they fit, the wire form, and the
folder format servers preload (``--adapters NAME=PATH``) and clients save.

A LoRA adapter adds ``(x @ a^T) @ b^T * alpha / rank`` to the output of some linear layers of some
blocks (``a``: [rank, in_features], ``b``: [out_features, rank]). Weights are keyed by (absolute block
index, the linear layer's name inside the block, e.g. ``"self_attn.q_proj"``).

Folder format (written by ``save_adapter``, read by ``load_adapter``):

- ``adapter_config.json``: ``{"format": "stamen-lora", "rank": 8, "alpha": 16.0, "model_type": "llama",
  "target_modules": ["self_attn.q_proj", "self_attn.v_proj"]}``
- ``adapter_model.safetensors``: for each block ``i`` and module ``m``, tensors ``"i.m.a"`` [rank, in] and
  ``"i.m.b"`` [out, rank] (float32); blocks without tensors have no LoRA.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import PretrainedConfig

from proto import pb
from swarm.net import tensors
from swarm.spans import BlockRange

FORMAT = "stamen-lora"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
DEFAULT_TARGETS = ("q_proj", "v_proj")

Key = tuple[int, str]  # (absolute block, linear layer's name inside the block)


@dataclass
class LoraAdapter:
    """LoRA weights for some linear layers of some blocks."""

    rank: int
    alpha: float
    weights: dict[Key, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # key -> (a, b)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def modules(self) -> set[str]:
        return {module for _, module in self.weights}

    def within(self, blocks: BlockRange) -> LoraAdapter:
        """The part of this adapter on ``blocks``."""
        kept = {key: value for key, value in self.weights.items() if key[0] in blocks}
        return LoraAdapter(self.rank, self.alpha, kept)

    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())

    def to_proto(self) -> pb.LoraWeights:
        return pb.LoraWeights(
            rank=self.rank,
            alpha=self.alpha,
            weights=[
                pb.LoraWeight(block=block, module=module, a=tensors.to_proto(a), b=tensors.to_proto(b))
                for (block, module), (a, b) in self.weights.items()
            ],
        )


def linear_layers(family, config: PretrainedConfig, index: int = 0) -> dict[str, tuple[int, int]]:
    """Every linear layer of a block of the model: name inside the block -> (in_features, out_features)."""
    block = family.build_block(config, index)  # on the meta device: no memory
    return {
        name: (module.in_features, module.out_features)
        for name, module in block.named_modules()
        if isinstance(module, nn.Linear)
    }


def resolve_targets(available: dict[str, tuple[int, int]], targets: tuple[str, ...] | list[str]) -> list[str]:
    """The linear layers that ``targets`` name, as full names inside a block. A target matches a layer
    whose name is the target or ends with ``"." + target`` (``"q_proj"`` matches ``"self_attn.q_proj"``)."""
    chosen = []
    for target in targets:
        found = [name for name in available if name == target or name.endswith("." + target)]
        if not found:
            raise ValueError(f"no linear layer named {target!r} in a block; the blocks have {sorted(available)}")
        chosen.extend(name for name in found if name not in chosen)
    return chosen


def save_adapter(folder: str | Path, adapter: LoraAdapter, model_type: str = "") -> Path:
    """Write ``adapter`` in the folder format servers load with ``--adapters NAME=PATH``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for (block, module), (a, b) in adapter.weights.items():
        state[f"{block}.{module}.a"] = a.detach().to(torch.float32).contiguous()
        state[f"{block}.{module}.b"] = b.detach().to(torch.float32).contiguous()
    save_file(state, str(folder / WEIGHTS_FILE))
    config = {
        "format": FORMAT,
        "rank": adapter.rank,
        "alpha": adapter.alpha,
        "model_type": model_type,
        "target_modules": sorted(adapter.modules()),
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def load_adapter(
    folder: str | Path, blocks: BlockRange | None = None, dtype: torch.dtype = torch.float32
) -> LoraAdapter:
    """Read an adapter folder (only the tensors of ``blocks``, if given). Raises ValueError if malformed."""
    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{folder}: cannot read {CONFIG_FILE}: {exc}") from exc
    if config.get("format") != FORMAT or not isinstance(config.get("rank"), int) or config["rank"] < 1:
        raise ValueError(f"{folder}: not a {FORMAT} adapter (format, and rank >= 1, expected in {CONFIG_FILE})")
    adapter = LoraAdapter(config["rank"], float(config.get("alpha", config["rank"])))
    parts: dict[Key, dict[str, torch.Tensor]] = {}
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as reader:
        for name in reader.keys():
            block, _, rest = name.partition(".")
            module, _, which = rest.rpartition(".")
            if not block.isdigit() or which not in ("a", "b") or not module:
                raise ValueError(f"{folder}: unexpected tensor {name!r} (expected BLOCK.MODULE.a / .b)")
            if blocks is None or int(block) in blocks:
                parts.setdefault((int(block), module), {})[which] = reader.get_tensor(name).to(dtype)
    for key, pair in parts.items():
        if set(pair) != {"a", "b"}:
            raise ValueError(f"{folder}: block {key[0]} module {key[1]} lacks its a or b tensor")
        adapter.weights[key] = (pair["a"], pair["b"])
    return adapter
