"""What this server can do: inference and forward speed of one block, measured once and cached.

The cache (``<stamen cache>/throughput.json``) is keyed by everything the numbers depend on: model,
dtype, torch threads and version, and the CPU/GPU, so a restart on the same machine is instant.
"""

from __future__ import annotations

import fcntl
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from swarm.core.blocks import BlockStack
from swarm.core.cache import KVGeometry
from swarm.core.work import ForwardPass, InferenceStep, Kind

logger = logging.getLogger(__name__)

FORWARD_TOKENS = 128  # tokens in the batched forward measurement


@dataclass(frozen=True)
class Throughput:
    inference: float  # single-token steps per second through one block (batch 1)
    forward: float  # tokens per second through one block in a batched forward pass


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def cache_key(model: str, dtype: torch.dtype, config_hash: str) -> str:
    return "|".join([model, config_hash, str(dtype), str(torch.get_num_threads()), torch.__version__, device_name()])


def measure(
    stack: BlockStack, geometry: KVGeometry, dtype: torch.dtype, repeats: int = 8, step_delay: float = 0.0
) -> Throughput:
    """Time single-token steps with a KV cache, then one batched forward, through the whole span
    (``step_delay``: the test-only slowdown each inference step gets, so it shows in the figures)."""
    blocks, span = len(stack.span), stack.span
    hidden = torch.randn(1, 1, stack.config.hidden_size, dtype=dtype)
    cache = geometry.allocate(blocks, 1, repeats + 2)

    def step(position: int) -> None:
        stack.run([InferenceStep(span, hidden, torch.full((1, 1), position), cache)], blocks)
        cache.advance(1)

    with torch.inference_mode():
        step(0)  # warm-up
        started = time.perf_counter()
        for position in range(1, repeats + 1):
            step(position)
        inference = repeats * blocks / max(time.perf_counter() - started + repeats * step_delay, 1e-9)

        batch = torch.randn(1, FORWARD_TOKENS, stack.config.hidden_size, dtype=dtype)
        positions = torch.arange(FORWARD_TOKENS).unsqueeze(0)
        started = time.perf_counter()
        stack.run([ForwardPass(span, batch, positions)], blocks)
        forward = FORWARD_TOKENS * blocks / max(time.perf_counter() - started, 1e-9)
    return Throughput(inference, forward)


def warm_up(stack: BlockStack, geometry: KVGeometry, dtype: torch.dtype, tokens: int = 16) -> None:
    """One prompt and one decode step through the span with a KV cache, before serving: the first prefill
    of a fresh process costs about twice a warm one (allocator and kernel set-up), and the first prefill a
    server gets is often a failover replay that a user is waiting for."""
    blocks, span = len(stack.span), stack.span
    cache = geometry.allocate(blocks, 1, tokens + 1)
    with torch.inference_mode():
        for kind, start, count in ((Kind.PREFILL, 0, tokens), (Kind.DECODE, tokens, 1)):
            hidden = torch.randn(1, count, stack.config.hidden_size, dtype=dtype)
            positions = torch.arange(start, start + count).unsqueeze(0)
            stack.run([InferenceStep(span, hidden, positions, cache, kind=kind)], blocks)
            cache.advance(count)


def cached_measure(
    stack: BlockStack,
    geometry: KVGeometry,
    dtype: torch.dtype,
    key: str,
    cache_file: Path | None,
    step_delay: float = 0.0,
) -> Throughput:
    """The cached figures for ``key`` if any, else measure and store them (never cached with a test delay)."""
    if step_delay:
        cache_file = None
    if cache_file is not None:
        try:
            entry = json.loads(cache_file.read_text()).get(key)
            if entry:
                logger.info("Using cached throughput from %s", cache_file)
                return Throughput(**entry)
        except (OSError, ValueError, TypeError):
            pass
    result = measure(stack, geometry, dtype, step_delay=step_delay)
    logger.info(
        "Measured throughput: %.0f inference steps/s, %.0f forward tokens/s per block", *asdict(result).values()
    )
    if cache_file is not None:
        _store(cache_file, key, result)
    return result


def _store(cache_file: Path, key: str, result: Throughput) -> None:
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with open(cache_file.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                entries = json.loads(cache_file.read_text())
            except (OSError, ValueError):
                entries = {}
            entries[key] = asdict(result)
            tmp = cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(entries, indent=1))
            tmp.replace(cache_file)
    except OSError:
        logger.warning("Could not cache the throughput in %s", cache_file, exc_info=True)
