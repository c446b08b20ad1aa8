"""Our Llama block, norm and rotary embedding (``swarm.models.decoder``) give the same bits as transformers'
``LlamaDecoderLayer``, ``LlamaRMSNorm`` and ``LlamaRotaryEmbedding`` with the same weights, for the rope types
a Llama checkpoint may declare; and a server of a Llama model imports no transformers modeling code."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama as hf

from swarm.core.attention import ATTENTION_NAME, Plan, Segment, register_hf_attention
from swarm.models import decoder
from swarm.models.base import PLAN_KWARG

pytestmark = pytest.mark.timeout(120)

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "llama3": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8,
    },
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},  # changes past 16 positions
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
}  # fmt: skip


def config(rope: dict, **extra) -> LlamaConfig:
    arguments = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
    arguments.update(num_hidden_layers=2, max_position_embeddings=16, rope_parameters=rope, **extra)
    made = LlamaConfig(**arguments)
    made._attn_implementation = ATTENTION_NAME
    return made


@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize("extra", [{}, {"attention_bias": True, "mlp_bias": True}], ids=["plain", "biases"])
def test_our_llama_block_equals_transformers_bit_for_bit(rope, extra):
    register_hf_attention()
    cfg = config(ROPES[rope], **extra)
    torch.manual_seed(0)
    theirs = hf.LlamaDecoderLayer(cfg, layer_idx=0).eval()
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.normal_(0, 0.2)
    ours = decoder.DecoderLayer(cfg, layer_idx=0).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    batch, tokens = 2, 24  # past max_position_embeddings: dynamic rope rescales
    hidden = torch.randn(1, batch * tokens, cfg.hidden_size)
    positions = torch.arange(tokens).repeat(batch).unsqueeze(0)
    rotary = (hf.LlamaRotaryEmbedding(cfg), decoder.RotaryEmbedding(cfg))
    embeddings = [r(hidden, position_ids=positions) for r in rotary]
    assert all(torch.equal(a, b) for a, b in zip(*embeddings, strict=True)), "rotary cos/sin differ"
    kwargs = {PLAN_KWARG: Plan([Segment(0, batch, tokens)])}
    with torch.no_grad():
        expected = theirs(hidden, position_ids=positions, position_embeddings=embeddings[0], **kwargs)
        got = ours(hidden, position_ids=positions, position_embeddings=embeddings[1], **kwargs)
    expected = expected[0] if isinstance(expected, tuple) else expected
    assert torch.equal(got, expected)


def test_our_norm_equals_transformers_in_half_precision():
    theirs, ours = hf.LlamaRMSNorm(64, eps=1e-5), decoder.RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        theirs.weight.normal_()
    ours.load_state_dict(theirs.state_dict())
    hidden = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    assert torch.equal(ours.to(torch.bfloat16)(hidden), theirs.to(torch.bfloat16)(hidden))


def test_a_server_imports_no_transformers_modeling_code():
    heavy = ("transformers.modeling_utils", "torch._dynamo", "sympy", "scipy", "hivemind.averaging")
    probe = f"import sys, server.__main__; print([m for m in {heavy!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=100, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
