"""Every family adapter, without a network: the client's local parts and the server's block stacks (split in
two spans, each with its own KV caches) generate exactly what the local transformers model generates.

A stand-in for the inference session runs the server's ``BlockStack`` in process, so ``generate`` drives
the real client code (embeddings, embedding norm, final norm, head, soft-capping) and the real server
computation (family adapters, batch plan, caches, masks). The swarm tests then check the same over real
servers; these find a family bug in seconds.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from client.model import DistributedModelForCausalLM
from swarm.core.blocks import load_block_stack
from swarm.core.cache import KVGeometry
from swarm.core.work import ForwardPass, InferenceStep, Kind
from swarm.models.families import FAMILIES, UnsupportedModelError, family_for, get_family
from swarm.spans import BlockRange
from tests.conftest import FAMILIES as TINY_FAMILIES

pytestmark = pytest.mark.timeout(120)
NAMES = [name for name in TINY_FAMILIES if name not in ("mistral", "qwen2")]  # llama stands for those two


class InProcessSession:
    """What ``RemoteCache`` needs from an inference session, computed by server block stacks in process."""

    def __init__(self, stacks, geometry: KVGeometry, batch: int, max_length: int):
        self.stacks = stacks
        self.caches = [geometry.allocate(len(stack.span), batch, max_length) for stack in stacks]
        self.position, self.padding, self.prefix, self.batch_size = 0, None, 0, batch

    def step(self, hidden, position_ids, mask=None, prompts=None):
        assert prompts is None
        batch, tokens, _ = hidden.shape
        new = mask if mask is not None else torch.ones(batch, tokens, dtype=torch.bool)
        self.padding = new if self.padding is None else torch.cat([self.padding, new], dim=1)
        with torch.inference_mode():
            for stack, cache in zip(self.stacks, self.caches, strict=True):
                cache.set_padding(cache.length, mask, tokens)
                work = InferenceStep(stack.span, hidden, position_ids, cache, kind=Kind.PREFILL)
                hidden = stack.run([work], len(stack.span))[0]
                cache.advance(tokens)
        self.position += tokens
        return hidden.clone()

    def confirm(self) -> None:
        """Nothing to verify: the blocks ran in this process."""


class InProcessPasses:
    """Stateless forward passes through the same block stacks (what ``RemoteBlocks`` asks of a client)."""

    def __init__(self, stacks):
        self.stacks = stacks

    def forward(self, hidden, inputs, keep=False):
        assert inputs.span == BlockRange(0, self.stacks[-1].span.end) and not keep and not inputs.hidden_states
        positions = inputs.position_ids.expand(hidden.shape[0], -1)
        with torch.inference_mode():
            for stack in self.stacks:
                work = ForwardPass(stack.span, hidden, positions, padding=inputs.attention_mask)
                hidden = stack.run([work], len(stack.span))[0]
        return hidden.clone(), None, None


class InProcessClient:
    def __init__(self, stacks):
        self.passes = InProcessPasses(stacks)


@pytest.fixture(scope="module", params=NAMES)
def pair(request, tiny_models):
    folder = tiny_models[request.param]
    server_config = AutoConfig.from_pretrained(folder)
    layers = server_config.num_hidden_layers
    stacks = [
        load_block_stack(folder, server_config, BlockRange(0, 2), torch.float32),
        load_block_stack(folder, server_config, BlockRange(2, layers), torch.float32),
    ]
    config = AutoConfig.from_pretrained(folder)
    model = DistributedModelForCausalLM(config, InProcessClient(stacks))
    model._load_local_weights(folder, torch.float32)
    geometry = KVGeometry.from_config(config, torch.float32)
    local = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model.eval(), local, lambda batch: InProcessSession(stacks, geometry, batch, 64)


def test_greedy_generation_and_logits_match_local(pair):
    model, local, new_session = pair
    prompt = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    options = dict(max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    expected = local.generate(prompt, **options)
    actual = model.generate(prompt, session=new_session(1), **options)
    assert actual.sequences.tolist() == expected.sequences.tolist()
    for got, want in zip(actual.logits, expected.logits, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_left_padded_batch_matches_local(pair):
    model, local, new_session = pair
    ids = torch.randint(3, 256, (3, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    ids = ids.masked_fill(mask == 0, 0)
    options = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    expected = local.generate(ids, **options)
    assert model.generate(ids, session=new_session(3), **options).tolist() == expected.tolist()


def test_stateless_forward_matches_local(pair):
    model, local, _ = pair
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, local(ids).logits, rtol=0, atol=1e-4)


def test_local_parts_follow_the_family(pair):
    model, local, _ = pair
    layout = family_for(model.config).layout
    assert (model.lm_head.weight is model.embed_tokens.weight) == family_for(model.config).tied_head(model.config)
    for path in (layout.embed, layout.embed_norm, layout.norm, layout.head):  # where transformers keeps them
        if path is None:
            continue
        ours, theirs = model.get_submodule(path).state_dict(), local.get_submodule(path).state_dict()
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            torch.testing.assert_close(ours[key], value, rtol=0, atol=0)


def test_other_families_get_an_error_that_lists_the_supported_ones():
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported.*llama.*bloom.*falcon"):
        get_family("gpt2")
    assert {"bloom", "falcon", "mixtral", "qwen2_moe", "qwen3", "gemma2", "gemma3_text", "phi3"} <= set(FAMILIES)


def test_checkpoints_without_the_base_model_prefix_are_found():
    """The original BLOOM files name tensors ``h.0....`` and ``word_embeddings...``, without ``transformer.``."""
    bloom = get_family("bloom")
    names = ["h.0.input_layernorm.weight", "word_embeddings.weight", "word_embeddings_layernorm.bias", "ln_f.weight"]
    assert bloom.checkpoint_prefix(bloom.block_prefix(0), names) == "h.0."
    parts = {"embed_tokens": ("embed", torch.nn.Embedding(4, 2)), "lm_head": ("head", torch.nn.Linear(2, 4))}
    assert bloom.local_weights(parts, names, tied=True) == {"word_embeddings.weight": "embed_tokens.weight"}
    llama = get_family("llama")
    assert llama.checkpoint_prefix(llama.block_prefix(3), ["model.layers.3.mlp.up_proj.weight"]) == "model.layers.3."


def test_requests_batched_together_keep_their_own_length_dependent_rotary(tiny_models):
    """Dynamic (and longrope) rotary picks frequencies from the largest position it sees: a short request
    batched with a long one must get the frequencies it gets alone, as it would locally."""
    folder = tiny_models["llama-dynamic"]
    stack = load_block_stack(folder, AutoConfig.from_pretrained(folder), BlockRange(0, 4), torch.float32)
    generator = torch.Generator().manual_seed(5)
    long, short = torch.randn(1, 24, 64, generator=generator), torch.randn(1, 5, 64, generator=generator)

    def work(hidden):
        return ForwardPass(BlockRange(0, 4), hidden, torch.arange(hidden.shape[1]).unsqueeze(0))

    with torch.inference_mode():
        alone = [stack.run([work(long)], 4)[0], stack.run([work(short)], 4)[0]]
        together = stack.run([work(long), work(short)], 4)
    for got, want in zip(together, alone, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)  # batched matmuls round differently


def test_mixtral_experts_are_fused_from_per_expert_tensors(tiny_models):
    """The checkpoint stores one tensor per expert; the server's block holds transformers' fused layout."""
    folder = tiny_models["mixtral"]
    config = AutoConfig.from_pretrained(folder)
    (block,) = load_block_stack(folder, config, BlockRange(1, 2), torch.float32).blocks
    local = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    expected = local.model.layers[1].state_dict()
    assert block.state_dict().keys() == expected.keys()
    for name, tensor in block.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)
