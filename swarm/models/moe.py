"""Mixture-of-experts families: Mixtral and Qwen2-MoE.

Blocks are transformers' ``MixtralDecoderLayer`` / ``Qwen2MoeDecoderLayer``: rotary attention through the
attention-function registry, then a sparse MoE layer (a top-k router ``mlp.gate`` and the experts; Qwen2-MoE
adds a shared expert with its own sigmoid gate, and may keep dense MLPs in some layers). Routing is per
token, so a server runs the experts once for the tokens of every request in a batch.

Weights: checkpoints store one tensor per expert and projection (Mixtral:
``block_sparse_moe.experts.E.w1/w3/w2.weight`` for gate/up/down; Qwen2-MoE:
``mlp.experts.E.gate_proj/up_proj/down_proj.weight``), while transformers 5 keeps all experts of a layer in
two fused parameters, ``mlp.experts.gate_up_proj`` [experts, 2 * intermediate, hidden] (gate rows, then up
rows) and ``mlp.experts.down_proj`` [experts, hidden, intermediate]. ``from_pretrained`` fuses them with its
weight-conversion mapping; a server loads single blocks, so ``block_state`` does the same fusion for the
block it loads (and renames Mixtral's ``block_sparse_moe`` to ``mlp``). Checkpoints already in the fused
layout load as they are; a layout this code does not know is refused with the shapes it found.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from swarm.models.base import Family, UnsupportedModelError


@dataclass(frozen=True)
class MoEFamily(Family):
    expert_weights: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # an expert's gate, up, down
    renames: tuple[tuple[str, str], ...] = ()  # (checkpoint prefix, module prefix) within a block

    def block_state(self, state: dict[str, torch.Tensor], block: nn.Module) -> dict[str, torch.Tensor]:
        names = block.state_dict().keys()
        for old, new in self.renames:
            if not any(name.startswith(old) for name in names):
                state = {new + name[len(old) :] if name.startswith(old) else name: t for name, t in state.items()}
        for path, module in block.named_modules():
            if isinstance(getattr(module, "gate_up_proj", None), nn.Parameter):
                state = self._fuse_experts(state, path, module)
        return state

    def _fuse_experts(self, state: dict[str, torch.Tensor], path: str, experts: nn.Module) -> dict[str, torch.Tensor]:
        """Per-expert checkpoint tensors under ``path`` -> the fused ``gate_up_proj`` and ``down_proj``."""
        prefix = f"{path}."
        if prefix + "gate_up_proj" in state:  # the checkpoint is already fused
            return state
        if not getattr(experts, "is_concatenated", True):
            raise UnsupportedModelError(f"{self.name}: interleaved gate/up expert weights are not supported")
        gate, up, down = self.expert_weights
        state = dict(state)

        def take(expert: int, weight: str) -> torch.Tensor:
            name = f"{prefix}{expert}.{weight}.weight"
            if name not in state:
                raise ValueError(f"{self.name} block: the checkpoint has no expert tensor {name}")
            return state.pop(name)

        count = experts.gate_up_proj.shape[0]
        gate_up = torch.stack([torch.cat([take(e, gate), take(e, up)]) for e in range(count)])  # [E, 2I, H]
        down_proj = torch.stack([take(e, down) for e in range(count)])  # [E, H, I]
        if getattr(experts, "is_transposed", False):
            gate_up, down_proj = gate_up.transpose(1, 2), down_proj.transpose(1, 2)  # [E, H, 2I], [E, I, H]
        for name, fused in (("gate_up_proj", gate_up), ("down_proj", down_proj)):
            expected = tuple(getattr(experts, name).shape)
            if tuple(fused.shape) != expected:
                raise UnsupportedModelError(
                    f"{self.name}: fused {prefix}{name} would be {tuple(fused.shape)}, the block expects {expected}"
                )
            state[prefix + name] = fused.contiguous()
        return state


def mixtral() -> Family:
    from transformers.models.mixtral import modeling_mixtral as m

    return MoEFamily(
        "mixtral",
        "Mixtral",
        m.MixtralDecoderLayer,
        m.MixtralRMSNorm,
        m.MixtralRotaryEmbedding,
        expert_weights=("w1", "w3", "w2"),
        renames=(("block_sparse_moe.", "mlp."),),
    )


def qwen2_moe() -> Family:
    from transformers.models.qwen2_moe import modeling_qwen2_moe as m

    return MoEFamily("qwen2_moe", "Qwen2-MoE", m.Qwen2MoeDecoderLayer, m.Qwen2MoeRMSNorm, m.Qwen2MoeRotaryEmbedding)
