"""Our Llama block, norm and rotary embedding (``swarm.models.decoder``) give the same bits as transformers'
``LlamaDecoderLayer``, ``LlamaRMSNorm`` and ``LlamaRotaryEmbedding`` with the same weights, for the rope types
a Llama checkpoint may declare; our config reads a config.json as ``LlamaConfig`` does; and a server of a Llama
model (its config and blocks loaded) imports no transformers modeling code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama as hf

from swarm.core.attention import ATTENTION_NAME, Plan, Segment, register_hf_attention
from swarm.models import decoder
from swarm.models.base import PLAN_KWARG
from swarm.models.families import load_config

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


LEGACY = {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}  # fmt: skip


@pytest.mark.parametrize(
    "values",
    [{}, {"num_key_value_heads": 2, "head_dim": 32, "rope_parameters": ROPES["dynamic"]}, LEGACY],
    ids=["defaults", "modern", "legacy-rope"],
)
def test_our_config_reads_a_llama_config_json_as_transformers_does(tmp_path, values):
    LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, **values).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw = {key: value for key, value in raw.items() if key not in ("head_dim", "num_key_value_heads")} | values
    (tmp_path / "config.json").write_text(json.dumps(raw))  # as older checkpoints write it
    ours, theirs = load_config(tmp_path), LlamaConfig.from_pretrained(tmp_path)
    assert isinstance(ours, decoder.DecoderConfig)
    assert ours.to_json_string(use_diff=False) == theirs.to_json_string(use_diff=False)


def test_a_server_of_a_llama_model_imports_no_transformers_modeling_code(tiny_models):
    heavy = ("transformers.modeling_utils", "torch._dynamo", "sympy", "scipy", "accelerate", "hivemind.averaging")
    probe = (
        "import sys, torch, server.__main__\n"
        "from swarm.core.blocks import load_block_stack\n"
        "from swarm.models.families import load_config\n"
        "from swarm.spans import BlockRange\n"
        f"folder = {str(tiny_models['llama'])!r}\n"
        "load_block_stack(folder, load_config(folder), BlockRange(0, 1), torch.float32)\n"
        f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=100, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
