"""The compute core without a network: continuous batching is exact, declared rounds run as one batch,
long work yields to decode steps, one failing request does not fail the others, and abandoned work is dropped."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from transformers import AutoConfig

from server.scheduler import Scheduler, SchedulerConfig
from swarm.core.blocks import load_block_stack
from swarm.core.cache import KVGeometry
from swarm.core.work import ForwardPass, InferenceStep, Kind, Round
from swarm.spans import BlockRange

pytestmark = pytest.mark.timeout(120)
SPAN = BlockRange(0, 6)


@pytest.fixture(scope="module")
def stack(tiny_models):
    folder = tiny_models["llama"]
    config = AutoConfig.from_pretrained(folder)
    return load_block_stack(folder, config, SPAN, torch.float32), KVGeometry.from_config(config, torch.float32)


def step_work(cache, hidden, position, mask=None) -> InferenceStep:
    batch, tokens, _ = hidden.shape
    cache.set_padding(cache.length, mask, tokens)
    positions = torch.arange(position, position + tokens).expand(batch, tokens)
    return InferenceStep(SPAN, hidden, positions, cache, kind=Kind.DECODE if batch * tokens <= 16 else Kind.PREFILL)


def run_alone(stack, work: InferenceStep) -> torch.Tensor:
    with torch.inference_mode():
        output = stack.run([work], len(SPAN))[0]
    work.cache.advance(work.hidden.shape[1])
    return output


def test_sessions_batched_together_equal_each_run_alone(stack):
    stack, geometry = stack
    generator = torch.Generator().manual_seed(0)
    shapes = [(1, 5), (2, 9), (1, 1), (3, 4)]  # (rows, prompt tokens): different lengths and batch sizes
    masks = [None, torch.tensor([[False, False, True, True, True, True, True, True, True], [True] * 9]), None, None]
    alone, batched = [], []
    for (rows, tokens), mask in zip(shapes, masks, strict=True):
        prompt = torch.randn(rows, tokens, 64, generator=generator)
        for caches in (alone, batched):
            cache = geometry.allocate(len(SPAN), rows, 32)
            run_alone(stack, step_work(cache, prompt, 0, mask))
            caches.append(cache)
    scheduler = Scheduler(stack, SchedulerConfig(max_batch_tokens=64))
    try:
        for _ in range(4):  # four decode steps, every session at once
            inputs = [torch.randn(rows, 1, 64, generator=generator) for rows, _ in shapes]
            expected = [run_alone(stack, step_work(c, x, c.length)) for c, x in zip(alone, inputs, strict=True)]

            async def all_at_once(inputs=inputs):
                works = [step_work(c, x, c.length) for c, x in zip(batched, inputs, strict=True)]
                return await asyncio.gather(*(scheduler.submit(work) for work in works))

            got = asyncio.run(all_at_once())
            for want, have in zip(expected, got, strict=True):
                torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-4)  # batched matmuls round differently
        assert scheduler.batched_items > scheduler.slices  # they really ran together
    finally:
        scheduler.shutdown()


def test_decode_steps_keep_their_pace_while_a_large_forward_runs(stack):
    stack, geometry = stack
    scheduler = Scheduler(stack, SchedulerConfig(chunk_token_blocks=4096))  # 4096-token forward: 1 block a slice
    cache = geometry.allocate(len(SPAN), 1, 64)
    big = ForwardPass(SPAN, torch.randn(16, 256, 64), torch.arange(256).expand(16, 256))
    with torch.inference_mode():
        expected = stack.run([ForwardPass(SPAN, big.hidden, big.position_ids)], len(SPAN))[0]

    async def race():
        forward = asyncio.ensure_future(scheduler.submit(big))
        done_before = 0
        for position in range(20):
            await scheduler.submit(step_work(cache, torch.randn(1, 1, 64), position))
            done_before += not forward.done()
        return await forward, done_before

    try:
        output, done_before = asyncio.run(race())
    finally:
        scheduler.shutdown()
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-5)
    assert done_before >= 4  # 6 slices of forward: decode steps ran between them, not after all of them


def test_a_failing_request_does_not_fail_the_others_in_its_batch(stack):
    stack, geometry = stack
    good, broken = geometry.allocate(len(SPAN), 1, 8), geometry.allocate(len(SPAN), 1, 1)
    broken.advance(1)  # full: writing one more token fails inside the computation
    hidden = torch.randn(1, 1, 64)
    with torch.inference_mode():
        expected = stack.run([InferenceStep(SPAN, hidden, torch.zeros(1, 1, dtype=torch.long))], len(SPAN))[0]
    scheduler = Scheduler(stack)

    async def together():
        works = [step_work(broken, hidden, 1), step_work(good, hidden, 0)]
        return await asyncio.gather(*(scheduler.submit(work) for work in works), return_exceptions=True)

    try:
        failed, output = asyncio.run(together())
    finally:
        scheduler.shutdown()
    assert isinstance(failed, Exception)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-5)
    assert good.length == 1 and broken.length == 1


def test_work_of_a_peer_that_went_away_is_dropped(stack):
    stack, _ = stack
    scheduler = Scheduler(stack, SchedulerConfig(chunk_token_blocks=1))
    big = ForwardPass(SPAN, torch.randn(8, 128, 64), torch.arange(128).expand(8, 128))

    async def abandon():
        task = asyncio.ensure_future(scheduler.submit(big))
        await asyncio.sleep(0)  # queued
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        small = ForwardPass(SPAN, torch.randn(1, 2, 64), torch.arange(2).expand(1, 2))
        await scheduler.submit(small)  # the worker is free again; the abandoned pass never finished
        return big.cursor

    try:
        cursor = asyncio.run(abandon())
    finally:
        scheduler.shutdown()
    assert cursor < SPAN.end


@pytest.mark.parametrize("complete", [True, False], ids=["all steps come", "one never comes"])
def test_a_declared_round_runs_as_one_batch_when_its_steps_are_in(stack, complete):
    stack, geometry = stack
    declared = Round("client", 1, 3)
    caches = [geometry.allocate(len(SPAN), 1, 8) for _ in range(3)]
    scheduler = Scheduler(stack, SchedulerConfig(batch_wait=2.0))

    def step(cache):
        work = step_work(cache, torch.randn(1, 1, 64), 0)
        work.round = declared
        return work

    async def round_of_steps():
        early = [asyncio.ensure_future(scheduler.submit(step(cache))) for cache in caches[:2]]
        await asyncio.sleep(0.2)  # the round's last step is late (a slow client)
        ran_early = scheduler.slices
        started = time.monotonic()
        if complete:
            await scheduler.submit(step(caches[2]))
        await asyncio.gather(*early)
        return ran_early, time.monotonic() - started

    try:
        ran_early, waited = asyncio.run(round_of_steps())
    finally:
        scheduler.shutdown()
    assert ran_early == 0  # the two steps in waited for the third
    assert scheduler.slices == 1 and scheduler.batched_items == (3 if complete else 2)
    if complete:
        assert waited < 1.0  # ran once the round was in, not at the timer's bound
