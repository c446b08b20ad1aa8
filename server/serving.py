"""Serving: everything that serves one span (blocks, compute scheduler, sessions, limits, adapters).

A server has one current Serving; when it moves to another span it builds a new one, switches new
work to it, and retires the old one once its sessions end (or hands them off after a grace period:
their next step gets SHUTTING_DOWN and the client replays them elsewhere).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import torch
from transformers import PretrainedConfig

from server import validation
from server.config import ServerConfig
from server.scheduler import Scheduler, SchedulerConfig
from server.sessions import Session, SessionStore
from swarm.core.backward import BackwardPass
from swarm.core.blocks import BlockStack
from swarm.core.cache import CacheBudget, KVGeometry
from swarm.core.work import ForwardPass, InferenceStep, Round, step_kind
from swarm.models.adapters import LoraAdapter, load_adapter
from swarm.spans import BlockRange

logger = logging.getLogger(__name__)


@dataclass
class Serving:
    span: BlockRange
    stack: BlockStack
    scheduler: Scheduler
    store: SessionStore
    limits: validation.Limits
    adapters: dict[str, LoraAdapter] = field(default_factory=dict)  # preloaded (--adapters), on this span
    leaving: bool = False  # no new sessions; open ones are still served, and told to move elsewhere
    draining: bool = False  # no new sessions or steps (the end of a shutdown, or of a retirement after a move)

    @classmethod
    def build(
        cls,
        stack: BlockStack,
        config: ServerConfig,
        model_config: PretrainedConfig,
        dtype: torch.dtype,
        budget: CacheBudget,
    ) -> Serving:
        span = stack.span
        geometry = KVGeometry.from_config(model_config, dtype)
        layers = stack.lora.available()
        limits = validation.Limits.build(span, model_config.hidden_size, dtype, config, layers)
        adapters = {name: _preload(name, path, span, dtype, layers) for name, path in config.adapters.items()}
        scheduler = Scheduler(
            stack,
            SchedulerConfig(
                max_batch_tokens=config.max_batch_tokens,
                chunk_token_blocks=config.chunk_token_blocks,
                fair_share=config.fair_share,
                step_delay=config.test_step_delay,
            ),
        )
        return cls(span, stack, scheduler, SessionStore(budget, geometry, span), limits, adapters)

    async def inference_step(
        self,
        session: Session,
        step: validation.Step,
        prompts: torch.Tensor | None = None,
        reorder: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run a validated step of ``session`` through its blocks (its cache grows by the new tokens);
        ``reorder`` picks the session's rows first (beam search), ``prompts`` are the step's deep prompts.
        A step with ``round_size`` > 0 is part of the client's declared round ``round_id``: that many steps
        of the round come to these blocks together, and run as one batch as soon as they are all in."""
        batch, tokens, _ = step.hidden.shape
        session.cache.check_room(tokens)
        session.cache.set_padding(session.position, step.attention_mask, tokens)
        work = InferenceStep(
            session.blocks,
            step.hidden,
            step.position_ids,
            session.cache,
            session.block_offset,
            points=session.points,
            peer=session.peer,
            kind=step_kind(batch * tokens, self.scheduler.config.decode_tokens),
            prompts=prompts,
            adapter=session.adapter,
            reorder=reorder,
            round=Round(session.peer, step.round_id, step.round_size) if step.round_size > 0 else None,
        )
        return await self.scheduler.submit(work)

    async def forward(
        self,
        blocks: BlockRange,
        step: validation.Step,
        prompts: torch.Tensor | None = None,
        adapter: LoraAdapter | None = None,
        hidden_states: bool = False,
        points: float = 0.0,
        peer: str = "",
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """A stateless pass of a validated batch through ``blocks``: the output, and with ``hidden_states``
        the outputs of every block but the last (``points``, ``peer``: the requester's standing and id)."""
        fields = self._stateless(blocks, step, prompts, adapter, points, peer)
        work = ForwardPass(
            blocks, step.hidden, step.position_ids, **fields, block_outputs=[] if hidden_states else None
        )
        output = await self.scheduler.submit(work)
        return output, (work.block_outputs[:-1] if hidden_states else None)

    async def backward(
        self,
        blocks: BlockRange,
        step: validation.Step,
        grad_output: torch.Tensor,
        grad_block_outputs: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
        adapter: LoraAdapter | None = None,
        points: float = 0.0,
        peer: str = "",
    ) -> torch.Tensor:
        """The gradient w.r.t. the batch's input through ``blocks`` (activations recomputed). Gradients of
        ``prompts`` and of the adapter's weights that require grad accumulate in their ``.grad``."""
        work = BackwardPass(
            blocks,
            step.hidden,
            step.position_ids,
            **self._stateless(blocks, step, prompts, adapter, points, peer),
            grad_output=grad_output,
            grad_block_outputs=grad_block_outputs,
        )
        return await self.scheduler.submit(work)

    def _stateless(self, blocks: BlockRange, step: validation.Step, prompts, adapter, points, peer) -> dict:
        """The fields of a stateless pass through ``blocks`` (no cache; padding from the request)."""
        offset = blocks.start - self.span.start
        return dict(
            block_offset=offset, padding=step.attention_mask, points=points, peer=peer, prompts=prompts, adapter=adapter
        )

    async def wind_down(self, grace: float) -> None:
        """Tell clients to move (in every answer) while serving their sessions for up to ``grace`` seconds or
        until they have left, then refuse steps and let the ones in flight finish."""
        self.leaving = True
        deadline = time.monotonic() + grace
        while len(self.store) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if len(self.store):
            logger.info("Handing off %d sessions on blocks %s to other servers", len(self.store), self.span)
        self.draining = True
        deadline = time.monotonic() + grace
        while self.scheduler.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def retire(self, grace: float) -> None:
        """After a move: wind down, then stop computing."""
        await self.wind_down(grace)
        self.scheduler.shutdown()


def _preload(name: str, path: str, span: BlockRange, dtype: torch.dtype, layers: dict) -> LoraAdapter:
    """An adapter folder's weights on ``span``, checked against the blocks' linear layers."""
    adapter = load_adapter(path, span, dtype)
    for (block, module), (a, b) in adapter.weights.items():
        if module not in layers:
            raise ValueError(f"adapter {name} ({path}): no linear layer {module!r} in block {block}")
        in_features, out_features = layers[module]
        if tuple(a.shape) != (adapter.rank, in_features) or tuple(b.shape) != (out_features, adapter.rank):
            raise ValueError(f"adapter {name} ({path}): block {block} {module}: a, b shapes do not fit the layer")
    logger.info(
        "Loaded adapter %s (rank %d, %d layers in %s) from %s", name, adapter.rank, len(adapter.weights), span, path
    )
    return adapter
