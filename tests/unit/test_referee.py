"""The client's referee recomputes a disputed span as transformers does, for every family: replaying a
session's steps (a prefill, then decode steps) with padding, beam reorders, deep prompts and LoRA.

References are local transformers models run on what each case means: a padded row is the same row
unpadded; a reorder is the sequences it makes; deep prompts and LoRA are hooks on the local blocks.
Span (1, 3) never holds the last block, so ``hidden_states[3]`` is a block's output (no final norm).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from client.hop import StepInput
from client.referee import LocalReferee
from swarm.models.adapters import LoraAdapter
from swarm.models.families import family_for
from swarm.spans import BlockRange
from tests.conftest import FAMILIES

pytestmark = pytest.mark.timeout(60)
SPAN = BlockRange(1, 3)
ATOL = 1e-4


def states(model, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Hidden states of unpadded ``ids`` [batch, tokens]: [i] is the input of block i."""
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states


def steps_of(hidden, positions, mask=None, cuts=((0, 6), (6, 7), (7, 9), (9, 10)), **extra) -> list[StepInput]:
    """A session's steps: a prefill, then decode steps of one or two tokens."""
    return [
        StepInput(
            hidden[:, a:b],
            positions[:, a:b],
            None if mask is None else mask[:, a:b],
            **{k: v(a, b) for k, v in extra.items()},
        )
        for a, b in cuts
    ]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tiny_models):
    folder = tiny_models[request.param]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, model


def test_a_padded_batch_equals_each_row_alone(family):
    folder, model = family
    ids = torch.randint(3, 256, (3, 10), generator=torch.Generator().manual_seed(0))
    pads = [0, 4, 7]  # left padding of each row
    mask = torch.ones(3, 10, dtype=torch.bool)
    hidden = torch.randn(3, 10, model.config.hidden_size)  # padding positions hold anything
    outputs = []
    for row, pad in enumerate(pads):
        mask[row, :pad] = False
        row_states = states(model, ids[row : row + 1, pad:])
        hidden[row, pad:] = row_states[SPAN.start][0]
        outputs.append(row_states[SPAN.end][0, -3:])  # its last three tokens are real in every row
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    steps = steps_of(hidden, positions, mask)
    referee = LocalReferee(folder, model.config)
    assert referee.can_run(steps, None)
    torch.testing.assert_close(referee.run(SPAN, steps[:3]), torch.stack(outputs)[:, :2], rtol=0, atol=ATOL)
    torch.testing.assert_close(referee.run(SPAN, steps), torch.stack(outputs)[:, 2:], rtol=0, atol=ATOL)


REFERENCE_FAMILIES = ["llama", "bloom", "falcon-mq", "gemma2"]  # rotary, ALiBi in the block, multi-query, windows


@pytest.fixture(scope="module", params=REFERENCE_FAMILIES)
def reference(request, tiny_models):
    folder = tiny_models[request.param]
    return folder, AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_a_beam_reorder_continues_the_rows_it_keeps(reference):
    folder, model = reference
    generator = torch.Generator().manual_seed(1)
    prefix, new = torch.randint(3, 256, (3, 7), generator=generator), torch.randint(3, 256, (3, 3), generator=generator)
    rows = torch.tensor([2, 0, 0])
    before, after = states(model, prefix), states(model, torch.cat([prefix[rows], new], dim=1))
    hidden = torch.cat([before[SPAN.start], after[SPAN.start][:, 7:]], dim=1)
    positions = torch.arange(10).expand(3, 10)
    steps = steps_of(hidden, positions, cuts=((0, 6), (6, 7), (7, 8), (8, 10)))
    steps[2] = StepInput(steps[2].hidden, steps[2].position_ids, None, reorder=rows)  # before the first new token
    output = LocalReferee(folder, model.config).run(SPAN, steps)
    torch.testing.assert_close(output, after[SPAN.end][:, 8:], rtol=0, atol=ATOL)


def block_module(model, index: int) -> torch.nn.Module:
    family = family_for(model.config)
    names = [name for name, _ in model.named_parameters()]
    return model.get_submodule(family.checkpoint_prefix(family.block_prefix(index), names).rstrip("."))


def test_deep_prompts_are_added_before_each_block(reference):
    folder, model = reference
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 256, (2, 10), generator=generator)
    layers = model.config.num_hidden_layers
    prompts = torch.randn(layers, 1, 3, model.config.hidden_size, generator=generator)  # the first 3 tokens

    def add_prompt(index):
        def hook(module, args, kwargs):
            if args:
                hidden = args[0].clone()
                hidden[:, :3] += prompts[index, 0]
                return (hidden, *args[1:]), kwargs
            hidden = kwargs["hidden_states"].clone()
            hidden[:, :3] += prompts[index, 0]
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    handles = [block_module(model, i).register_forward_pre_hook(add_prompt(i), with_kwargs=True) for i in range(layers)]
    try:
        expected = states(model, ids)  # hidden_states hold each block's input before its prompt is added
    finally:
        for handle in handles:
            handle.remove()
    positions = torch.arange(10).expand(2, 10)
    steps = steps_of(expected[SPAN.start], positions, cuts=((0, 2), (2, 6), (6, 10)))
    steps[0] = StepInput(steps[0].hidden, steps[0].position_ids, None, prompts[:, :, :2])  # prompts split over steps
    steps[1] = StepInput(steps[1].hidden, steps[1].position_ids, None, prompts[:, :, 2:3])
    output = LocalReferee(folder, model.config).run(SPAN, steps)
    torch.testing.assert_close(output, expected[SPAN.end][:, 6:], rtol=0, atol=ATOL)


def test_the_sessions_lora_is_applied(reference):
    folder, model = reference
    generator = torch.Generator().manual_seed(3)
    name, linear = next((n, m) for n, m in block_module(model, 0).named_modules() if isinstance(m, torch.nn.Linear))
    adapter = LoraAdapter(2, 4.0)
    for block in range(model.config.num_hidden_layers):
        adapter.weights[(block, name)] = (
            torch.randn(2, linear.in_features, generator=generator) * 0.1,
            torch.randn(linear.out_features, 2, generator=generator) * 0.1,
        )

    def add_delta(block):
        a, b = adapter.weights[(block, name)]
        return lambda module, args, output: output + args[0] @ a.t() @ b.t() * adapter.scaling

    layers = range(model.config.num_hidden_layers)
    handles = [block_module(model, i).get_submodule(name).register_forward_hook(add_delta(i)) for i in layers]
    ids = torch.randint(3, 256, (2, 10), generator=generator)
    try:
        expected = states(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    steps = steps_of(expected[SPAN.start], torch.arange(10).expand(2, 10))
    referee = LocalReferee(folder, model.config)
    assert referee.can_run(steps, adapter) and not referee.can_run(steps, "preloaded-on-servers")
    torch.testing.assert_close(referee.run(SPAN, steps, adapter=adapter), expected[SPAN.end][:, 9:], rtol=0, atol=ATOL)
    assert not torch.allclose(referee.run(SPAN, steps), expected[SPAN.end][:, 9:], atol=ATOL)  # it mattered


def test_the_referee_keeps_the_weights_of_one_span(tiny_models):
    folder = tiny_models["llama"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    expected = states(model, torch.randint(3, 256, (1, 4), generator=torch.Generator().manual_seed(4)))
    steps = steps_of(expected[1], torch.arange(4).expand(1, 4), cuts=((0, 4),))
    referee = LocalReferee(folder, model.config)
    assert referee.loaded is None  # nothing until a dispute
    referee.run(BlockRange(1, 4), steps)
    assert referee.loaded == BlockRange(1, 4)
    steps = steps_of(expected[2], torch.arange(4).expand(1, 4), cuts=((0, 4),))
    torch.testing.assert_close(referee.run(BlockRange(2, 3), steps), expected[3], rtol=0, atol=ATOL)
    assert referee.loaded == BlockRange(1, 4)  # a span inside the kept one reuses its blocks
    steps = steps_of(expected[0], torch.arange(4).expand(1, 4), cuts=((0, 4),))
    referee.run(BlockRange(0, 2), steps)
    assert referee.loaded == BlockRange(0, 2)  # any other span replaces them
