"""The registry of model families a swarm can serve, by ``config.model_type``.

One adapter per family (``swarm.models.base.Family`` and its subclasses); each module documents how its
family's block is built and called, its extra inputs, weight names, and what the client keeps:

- ``llama``: Llama (our own block, ``decoder``), Mistral, Qwen2, Qwen3, Phi-3 (the default rotary decoder adapter)
- ``gemma``: Gemma 2, Gemma 3 text (scaled embeddings, soft-capping, rotary per layer type)
- ``moe``: Mixtral, Qwen2-MoE (experts fused at load time)
- ``bloom``: BLOOM (ALiBi, attention in the block), ``falcon``: Falcon (both decoder architectures)

A model of any other family gets an ``UnsupportedModelError`` that lists these.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from pathlib import Path

from transformers import PretrainedConfig

from swarm.models import bloom, falcon, gemma, llama, moe
from swarm.models.base import PLAN_KWARG, Family, LocalLayout, UnsupportedModelError, attention_kind, soft_cap

__all__ = [
    "FAMILIES",
    "PLAN_KWARG",
    "Family",
    "LocalLayout",
    "UnsupportedModelError",
    "attention_kind",
    "family_for",
    "get_family",
    "load_config",
    "soft_cap",
]

FAMILIES: dict[str, Callable[[], Family]] = {  # model_type -> adapter factory (imports transformers' module)
    "llama": llama.llama,
    "mistral": llama.mistral,
    "qwen2": llama.qwen2,
    "qwen3": llama.qwen3,
    "phi3": llama.phi3,
    "gemma2": gemma.gemma2,
    "gemma3_text": gemma.gemma3_text,
    "mixtral": moe.mixtral,
    "qwen2_moe": moe.qwen2_moe,
    "bloom": bloom.bloom,
    "falcon": falcon.falcon,
}


@cache
def get_family(model_type: str) -> Family:
    """The adapter for ``config.model_type``; raises UnsupportedModelError for families we cannot serve."""
    factory = FAMILIES.get(model_type)
    if factory is None:
        raise UnsupportedModelError(
            f"model family {model_type!r} is not supported; supported families (config.model_type): "
            + ", ".join(FAMILIES)
        )
    return factory()


def family_for(config: PretrainedConfig) -> Family:
    """The adapter for ``config``, after checking that this variant of the family can be served."""
    family = get_family(config.model_type)
    family.check(config)
    return family


def load_config(folder: Path) -> PretrainedConfig:
    """The config of the model in ``folder``: through its family's own config class where it has one (Llama:
    transformers' LlamaConfig would import its modeling stack), else ``AutoConfig``."""
    model_type = json.loads((Path(folder) / "config.json").read_text()).get("model_type")
    factory = FAMILIES.get(model_type)
    config_class = factory().config_class if factory is not None else None
    if config_class is not None:
        return config_class.from_pretrained(folder)
    from transformers import AutoConfig  # the config classes of some families import transformers' modeling code

    return AutoConfig.from_pretrained(folder)
