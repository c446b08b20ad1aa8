"""Prompt tuning as in Petals: trainable prompt embeddings on the client, everything else frozen.

- ``ptune``: ``pre_seq_len`` trainable embeddings are put before the input's embeddings.
- ``deep_ptune``: the same, plus one trainable prompt per block (zeros at first), sent with each request;
  the servers add block i's prompt to the hidden states of the first ``pre_seq_len`` positions before
  block i.

The model strips the prefix's positions from its outputs (logits, hidden states), so they line up
with ``input_ids`` and ``labels``.
"""

from __future__ import annotations

import torch
from torch import nn

MODES = ("ptune", "deep_ptune")


class PromptTuning(nn.Module):
    def __init__(self, mode: str, pre_seq_len: int, hidden_size: int, num_blocks: int, init_std: float):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"tuning_mode must be one of {MODES}, got {mode!r}")
        if pre_seq_len < 1:
            raise ValueError(f"pre_seq_len must be at least 1 for tuning_mode={mode!r}, got {pre_seq_len}")
        self.mode, self.pre_seq_len = mode, pre_seq_len
        self.prefix = nn.Parameter(torch.randn(pre_seq_len, hidden_size) * init_std)  # [prefix, hidden]
        self.deep = nn.Parameter(torch.zeros(num_blocks, pre_seq_len, hidden_size)) if mode == "deep_ptune" else None

    def prefix_for(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """The prefix embeddings of every row, [batch, pre_seq_len, hidden]."""
        return self.prefix.to(dtype).unsqueeze(0).expand(batch, -1, -1)

    def deep_prompts(self, dtype: torch.dtype) -> torch.Tensor | None:
        """Per-block prompts for the servers, [num_blocks, 1, pre_seq_len, hidden] (None without deep_ptune)."""
        return None if self.deep is None else self.deep.to(dtype).unsqueeze(1)
