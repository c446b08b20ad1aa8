"""Fine-tuning pieces without a network: request splitting, the family layout, the adapter folder format,
checks on prompts, adapters, gradients and reorders, the session's reorders, LoRA on batched requests,
and backward work through the compute core (slices, intermediate gradients) against plain autograd."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoConfig

from client.base import Layout, RemoteCache
from client.hop import StepInput, merge_steps
from client.lora import RemoteLora
from client.passes import PassInputs, even_pieces, split
from client.session import InferenceSession
from proto import pb
from server import extras, validation
from server.scheduler import Scheduler, SchedulerConfig
from swarm import errors
from swarm.core.backward import BackwardPass
from swarm.core.blocks import load_block_stack
from swarm.core.work import ForwardPass, Work
from swarm.models.adapters import LoraAdapter, linear_layers, load_adapter, resolve_targets, save_adapter
from swarm.models.families import get_family
from swarm.net import tensors
from swarm.spans import BlockRange

pytestmark = pytest.mark.timeout(60)
LAYERS = {"self_attn.q_proj": (64, 64), "self_attn.v_proj": (64, 32), "mlp.down_proj": (128, 64)}
LIMITS = validation.Limits(
    BlockRange(0, 6),
    64,
    torch.float32,
    max_request_tokens=64,
    max_length=128,
    max_adapter_bytes=1 << 20,
    lora_layers=LAYERS,
)
SPAN = BlockRange(0, 6)


def inputs(**fields) -> PassInputs:
    return PassInputs(BlockRange(0, 30), torch.zeros(8, 128, dtype=torch.int64), **fields)


def test_split_keeps_every_request_under_the_budget_with_few_requests():
    hidden = 576 * 128 * 4  # bytes of one row of 128 tokens
    assert split(30, 8, 128, 576, inputs(), False, 2 << 20) == (30, 7)  # rows only: 2 chunks
    assert split(30, 8, 128, 576, inputs(), True, 2 << 20) == (30, 3)  # input and gradient: 3 chunks
    blocks, rows = split(30, 8, 128, 576, inputs(hidden_states=True), False, 2 << 20)
    assert blocks * rows * hidden <= 2 << 20 and rows >= 1
    assert split(30, 1, 128, 576, inputs(hidden_states=True), False, 1) == (1, 1)  # nothing fits: one at a time
    adapter = LoraAdapter(8, 16, {(b, "q"): (torch.zeros(8, 576), torch.zeros(576, 8)) for b in range(30)})
    blocks, rows = split(30, 1, 16, 576, inputs(adapter=adapter), False, 10 * 8 * 576 * 2 * 4)
    assert blocks < 10 and rows == 1  # the adapter's weights limit the blocks per request


def test_a_span_is_cut_in_even_pieces():
    sizes = [len(piece) for piece in even_pieces(BlockRange(15, 30), 12)]
    assert sizes == [8, 7]  # not 12 + 3
    assert [len(piece) for piece in even_pieces(BlockRange(0, 6), 6)] == [6]
    assert [(p.start, p.end) for p in even_pieces(BlockRange(0, 5), 2)] == [(0, 2), (2, 3), (3, 5)]


def test_layout_follows_the_family_weight_names():
    assert Layout.of(get_family("llama")) == Layout("model", "embed_tokens", "layers", "norm", "lm_head")


def test_lora_targets_and_adapter_folder_roundtrip(tmp_path, tiny_models):
    config = AutoConfig.from_pretrained(tiny_models["llama"])
    layers = linear_layers(get_family("llama"), config)
    assert layers["self_attn.q_proj"] == (64, 64) and layers["self_attn.k_proj"] == (64, 32)
    assert resolve_targets(layers, ("q_proj", "v_proj")) == ["self_attn.q_proj", "self_attn.v_proj"]
    with pytest.raises(ValueError, match="no linear layer named 'x_proj'"):
        resolve_targets(layers, ("x_proj",))
    lora = RemoteLora(layers, 6, rank=4, alpha=8)
    with torch.no_grad():
        for param in lora.parameters():
            param.normal_()
    adapter, params = lora.adapter(BlockRange(2, 4))
    assert sorted(adapter.weights) == [(b, m) for b in (2, 3) for m in ("self_attn.q_proj", "self_attn.v_proj")]
    assert len(params) == 8 and all(p.requires_grad for p in params)
    saved = save_adapter(tmp_path / "a", lora.adapter(BlockRange(0, 6))[0], "llama")
    loaded = load_adapter(saved, BlockRange(2, 4))
    assert (loaded.rank, loaded.alpha, sorted(loaded.weights)) == (4, 8.0, sorted(adapter.weights))
    for key, (a, b) in adapter.weights.items():
        assert torch.equal(loaded.weights[key][0], a) and torch.equal(loaded.weights[key][1], b)
    (tmp_path / "a" / "adapter_config.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a stamen-lora adapter"):
        load_adapter(saved)


def tensor(value: torch.Tensor) -> pb.Tensor:
    return tensors.to_proto(value)


def test_prompt_gradient_and_reorder_checks():
    prompts = extras.prompts(tensor(torch.ones(6, 1, 3, 64)), LIMITS, SPAN, 2, 5)
    assert prompts.shape == (6, 1, 3, 64)
    assert extras.prompts(pb.Tensor(), LIMITS, SPAN, 2, 5) is None
    for bad in (torch.ones(6, 1, 6, 64), torch.ones(6, 3, 3, 64), torch.ones(5, 1, 3, 64), torch.ones(6, 2, 3, 63)):
        with pytest.raises(errors.InvalidRequestError, match="prompts"):
            extras.prompts(tensor(bad), LIMITS, SPAN, 2, 5)
    with pytest.raises(errors.InvalidRequestError, match="exceed"):
        extras.prompts(tensor(torch.ones(6, 2, 6, 64)), LIMITS, SPAN, 2, 6)  # 72 prompt tokens, 64 allowed
    with pytest.raises(errors.InvalidRequestError, match="NaN"):
        extras.gradient(tensor(torch.full((2, 5, 64), float("nan"))), "grad_output", (2, 5, 64), LIMITS)
    with pytest.raises(errors.InvalidRequestError, match="single block"):
        extras.block_gradients(tensor(torch.ones(0, 2, 5, 64)), LIMITS, BlockRange(3, 4), (2, 5, 64))
    assert extras.reorder(tensor(torch.tensor([0, 1, 2])), 3) is None  # the identity: nothing to do
    assert extras.reorder(tensor(torch.tensor([2, 2, 0])), 3).tolist() == [2, 2, 0]
    for bad in (torch.tensor([0, 3, 1]), torch.tensor([-1, 0, 1]), torch.tensor([0, 1])):
        with pytest.raises(errors.InvalidRequestError, match="reorder"):
            extras.reorder(tensor(bad), 3)


def test_adapter_checks():
    def sent(rank=4, module="self_attn.v_proj", block=1, a=None, b=None) -> pb.Adapter:
        a = torch.ones(rank, 64) if a is None else a
        b = torch.ones(32, rank) if b is None else b
        weight = pb.LoraWeight(block=block, module=module, a=tensor(a), b=tensor(b))
        return pb.Adapter(lora=pb.LoraWeights(rank=rank, alpha=8, weights=[weight]))

    adapter = extras.adapter(sent(), LIMITS, SPAN, {}, trainable=True)
    a, b = adapter.weights[(1, "self_attn.v_proj")]
    assert adapter.scaling == 2 and a.requires_grad and b.requires_grad
    assert extras.adapter(pb.Adapter(), LIMITS, SPAN, {}, trainable=False) is None
    preloaded = LoraAdapter(2, 2, {(0, "self_attn.q_proj"): (torch.ones(2, 64), torch.ones(64, 2))})
    assert extras.adapter(pb.Adapter(name="mine"), LIMITS, BlockRange(3, 6), {"mine": preloaded}, False).weights == {}
    with pytest.raises(errors.AdapterNotFoundError):
        extras.adapter(pb.Adapter(name="other"), LIMITS, SPAN, {"mine": preloaded}, False)
    bad = {
        "rank": sent(rank=33),
        "linear layer": sent(module="self_attn.o_proj"),
        "outside": sent(block=6),
        "shape": sent(b=torch.ones(64, 4)),
        "NaN": sent(a=torch.full((4, 64), float("nan"))),
    }
    for match, message in bad.items():
        with pytest.raises(errors.InvalidRequestError, match=match):
            extras.adapter(message, LIMITS, SPAN, {}, trainable=False)
    small = validation.Limits(BlockRange(0, 6), 64, torch.float32, 64, 128, max_adapter_bytes=100, lora_layers=LAYERS)
    with pytest.raises(errors.InvalidRequestError, match="exceed the limit"):
        extras.adapter(sent(), small, SPAN, {}, trainable=False)


class _Client:
    config = None


def test_session_composes_reorders_and_reorders_its_padding():
    session = InferenceSession.__new__(InferenceSession)
    session.batch_size, session.position, session._reorder = 3, 4, None
    session.padding = torch.tensor([[True] * 4, [False, True, True, True], [False, False, True, True]])
    cache = RemoteCache(session)
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    cache.reorder_cache(torch.tensor([1, 1, 0]))
    assert session._reorder.tolist() == [
        0,
        0,
        2,
    ]  # row i of the servers' cache becomes their row [2, 0, 0][[1, 1, 0][i]]
    assert session.padding[:, 0].tolist() == [True, True, False]
    with pytest.raises(NotImplementedError):
        cache.crop(-1)
    with pytest.raises(NotImplementedError):
        cache.batch_repeat_interleave(2)


@pytest.fixture(scope="module")
def stack(tiny_models):
    folder = tiny_models["llama"]
    return load_block_stack(folder, AutoConfig.from_pretrained(folder), SPAN, torch.float32)


def run(stack, works: list[Work], chunk: int = 4096) -> list[torch.Tensor]:
    async def submit_all():
        scheduler = Scheduler(stack, SchedulerConfig(chunk_token_blocks=chunk))
        try:
            return await asyncio.gather(*(scheduler.submit(work) for work in works))
        finally:
            scheduler.shutdown()

    return asyncio.run(submit_all())


def test_each_request_of_a_batch_gets_its_own_lora(stack):
    generator = torch.Generator().manual_seed(0)

    def lora() -> LoraAdapter:
        pair = (torch.randn(2, 64, generator=generator), torch.randn(32, 2, generator=generator))
        return LoraAdapter(2, 4, {(block, "self_attn.v_proj"): pair for block in range(6)})

    adapters = [lora(), None, lora()]
    hidden = [torch.randn(1, 1, 64, generator=generator) for _ in adapters]
    alone = []
    for adapter, x in zip(adapters, hidden, strict=True):
        work = ForwardPass(SPAN, x, torch.zeros(1, 1, dtype=torch.int64), adapter=adapter)
        alone.append(run(stack, [work])[0])
    with torch.inference_mode():  # one batched computation: the base linear once, each delta on its own rows
        works = [ForwardPass(SPAN, x, torch.zeros(1, 1, dtype=torch.int64)) for x in hidden]
        for work, adapter in zip(works, adapters, strict=True):
            work.adapter = adapter
        together = stack.run(works, 6)
    for got, want in zip(together, alone, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # batched matmuls round differently
    assert not torch.allclose(
        alone[0], run(stack, [ForwardPass(SPAN, hidden[0], torch.zeros(1, 1, dtype=torch.int64))])[0]
    )


@pytest.mark.parametrize("chunk", [4096, 10], ids=["one slice", "one block per slice"])
def test_backward_work_equals_autograd_through_the_blocks(stack, chunk):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 64, generator=generator)
    grad_output = torch.randn(2, 5, 64, generator=generator)
    grad_blocks = torch.randn(5, 2, 5, 64, generator=generator)
    prompts = torch.randn(6, 1, 2, 64, generator=generator)
    positions = torch.arange(5).expand(2, 5)

    leaf, prompt_leaf = x.clone().requires_grad_(), prompts.clone().requires_grad_()
    reference = ForwardPass(SPAN, leaf, positions)
    reference.prompts, reference.block_outputs = prompt_leaf, []
    output = stack.run([reference], 6)[0]
    torch.autograd.backward([output, *reference.block_outputs[:-1]], [grad_output, *grad_blocks.unbind(0)])

    work = BackwardPass(SPAN, x.clone(), positions, prompts=prompts.clone().requires_grad_())
    work.grad_output, work.grad_block_outputs = grad_output, grad_blocks
    (grad,) = run(stack, [work], chunk)
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(work.prompts.grad, prompt_leaf.grad, rtol=1e-5, atol=1e-5)
    assert all(not p.requires_grad and p.grad is None for p in stack.parameters())  # the weights stay frozen


def test_replay_merges_steps_but_keeps_reorders_and_prompts_in_place():
    def step(tokens: int, prompts: int = 0, reorder=None) -> StepInput:
        deep = torch.full((6, 1, prompts, 64), float(tokens)) if prompts else None
        return StepInput(torch.zeros(3, tokens, 64), torch.zeros(3, tokens, dtype=torch.int64), None, deep, reorder)

    rows = torch.tensor([2, 0, 1])
    merged = merge_steps([step(3, 3), step(2, 1), step(1, reorder=rows), step(1), step(1, 1)], max_tokens=100)
    assert [m.hidden.shape[1] for m in merged] == [5, 2, 1]
    assert merged[0].prompts.shape[2] == 4 and merged[0].reorder is None  # prompts stay on the first tokens
    assert merged[1].prompts is None and merged[1].reorder.tolist() == [2, 0, 1]  # the reorder comes first
    assert merged[2].prompts.shape[2] == 1  # prompts after unprompted tokens cannot join them
