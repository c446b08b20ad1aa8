"""Shared fixtures: tiny random models of each family, saved like real Hugging Face folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers as tf

# local swarms fork their servers from a process that imported the server's code once (swarm.tools.zygote):
# about 4 s of CPU saved per server; tests of memory and of process exits start them as interpreters
os.environ.setdefault("STAMEN_FORK_SERVERS", "1")

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
SMALL = {**TINY, "num_hidden_layers": 4}  # the families of tests/swarm/test_families.py
IDS = dict(vocab_size=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
LAYERS4 = ["sliding_attention", "full_attention"] * 2
FAMILIES = {  # name -> (config class, model class, config arguments)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {**TINY}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**TINY, "sliding_window": 4096}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**TINY}),
    # rotary frequencies that change once a sequence passes 16 positions (transformers' "dynamic" scaling)
    "llama-dynamic": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            **SMALL,
            "max_position_embeddings": 16,
            "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
        },
    ),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**SMALL, "head_dim": 16}),
    # a sliding window shorter than the tests' sequences, and rotary on half of each head
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**SMALL, "sliding_window": 7, "partial_rotary_factor": 0.5}),
    # sliding/full layers with a short window; attention and final-logit soft-capping; scaled embeddings
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {**SMALL, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 7, "layer_types": LAYERS4},
    ),
    # per-layer-type rotary (local base 10k, global 1M), q/k norms, final-logit soft-capping
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {**SMALL, "head_dim": 16, "sliding_window": 7, "layer_types": LAYERS4, "final_logit_softcapping": 30.0},
    ),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**SMALL, "num_local_experts": 4, "num_experts_per_tok": 2}),
    # routed experts with a shared expert; block 2 is a dense MLP
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {
            **SMALL,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64,
            "mlp_only_layers": [2],
        },
    ),
    # 6 heads: ALiBi slopes beyond the largest power of two
    "bloom": ("BloomConfig", "BloomForCausalLM", {**IDS, "hidden_size": 48, "n_layer": 4, "n_head": 6}),
    # Falcon-40B-like: new decoder architecture, grouped kv heads, two layer norms, rotary
    "falcon-new": (
        "FalconConfig",
        "FalconForCausalLM",
        {
            **IDS,
            "hidden_size": 64,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_kv_heads": 2,
            "new_decoder_architecture": True,
            "parallel_attn": True,
            "bias": False,
        },
    ),
    # Falcon-7B-like: original architecture, multi-query, parallel attention, rotary, untied head
    "falcon-mq": (
        "FalconConfig",
        "FalconForCausalLM",
        {
            **IDS,
            "hidden_size": 64,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "multi_query": True,
            "parallel_attn": True,
            "bias": False,
            "tie_word_embeddings": False,
        },
    ),
    # Falcon-RW-like: original architecture, ALiBi, sequential attention then MLP, biases
    "falcon-alibi": (
        "FalconConfig",
        "FalconForCausalLM",
        {
            **IDS,
            "hidden_size": 64,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "multi_query": False,
            "parallel_attn": False,
            "alibi": True,
            "bias": True,
        },
    ),
}


def make_tiny_model(folder: Path, family: str, seed: int = 0, std: float = 0.2) -> Path:
    """A random-weight model of ``family`` saved with save_pretrained (safetensors) into ``folder``; its
    matrices have weights of standard deviation ``std``."""
    config_name, model_name, arguments = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(tf, config_name)(**arguments)
    model = getattr(tf, model_name)(config)
    with torch.no_grad():  # larger weights than the default init spread the logits, so greedy ties are rare
        for param in model.parameters():
            if param.ndim >= 2:
                param.normal_(0, std)
    model.save_pretrained(folder)
    return folder


class TinyModels(dict):
    """Family name -> folder of its tiny model, made on first use."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, family: str) -> Path:
        folder = make_tiny_model(self.root / f"tiny-{family}", family, seed=list(FAMILIES).index(family))
        self[family] = folder
        return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    return TinyModels(tmp_path_factory.mktemp("models"))
