"""The client's own layers, without a network: for every family, the model's ``embed`` and ``next_token_logits``
equal what the family's transformers model computes before and after its blocks (embedding scale, embedding
norm, final norm, LM head, final-logit soft-capping). ``forward``, ``generate`` and the HTTP API all go
through these two steps, so this is where a family's local computation is checked once.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from client.model import DistributedModelForCausalLM
from swarm.models.families import family_for
from tests.conftest import FAMILIES as TINY_FAMILIES

pytestmark = pytest.mark.timeout(120)
NAMES = [name for name in TINY_FAMILIES if name not in ("mistral", "qwen2")]  # llama stands for those two


def local_model(folder) -> DistributedModelForCausalLM:
    """The client's local parts of the model in ``folder``, without a swarm."""
    model = DistributedModelForCausalLM(AutoConfig.from_pretrained(folder))
    model._load_local_weights(folder, torch.float32)
    return model.eval()


@pytest.fixture(scope="module", params=NAMES)
def pair(request, tiny_models):
    folder = tiny_models[request.param]
    return local_model(folder), AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_embed_and_next_token_logits_equal_transformers(pair):
    model, local = pair
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    seen = {}
    final_norm = local.get_submodule(family_for(local.config).layout.norm)
    hook = final_norm.register_forward_hook(lambda module, args, output: seen.update(last_block=args[0]))
    try:
        with torch.no_grad():
            expected = local(ids, output_hidden_states=True)
    finally:
        hook.remove()
    with torch.no_grad():
        torch.testing.assert_close(model.embed(ids), expected.hidden_states[0], rtol=0, atol=0)
        torch.testing.assert_close(model.next_token_logits(seen["last_block"]), expected.logits, rtol=0, atol=0)


def test_embed_puts_the_trainable_prefix_in_front_when_asked(tiny_models):
    model = local_model(tiny_models["llama"])
    tuning = model.enable_prompt_tuning("ptune", 3)
    ids = torch.randint(3, 256, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain, prefixed = model.embed(ids), model.embed(ids, prefix=True)
    assert prefixed.shape == (2, 8, model.config.hidden_size)
    torch.testing.assert_close(prefixed[:, 3:], plain, rtol=0, atol=0)
    torch.testing.assert_close(prefixed[:, :3], tuning.prefix.detach().expand(2, -1, -1), rtol=0, atol=0)
