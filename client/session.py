"""Inference session: streams hidden states through a chain of servers, one step at a time.

Each server of the chain (``client.chain``) holds its own session (KV cache) for its span. The client
keeps, per server, the inputs it sent in this session (``client.hop``). When a server fails (an error, a broken
stream, or no answer and no reply to a liveness ping), the client bans it, finds a replacement chain
for that span only, replays those inputs into it (merged into a few prefill steps), and carries on;
other servers keep their sessions. With lazy verification the failed server's shadow (``client.verify``),
which holds those inputs already, takes its place instead (after catching up on the last few steps). A
server that is leaving (shutdown or a move) says so in its answers while it keeps serving: the client then
builds the replacement in the background and swaps it in at a step boundary, so a graceful exit costs no
stall.

Beam search reorders the session's rows: ``reorder`` keeps the hypothesis indices until the next step,
which carries them to every server (each reorders its cache before running the step); the history
keeps them with that step, so a replay reorders at the same points. A session may carry a LoRA
adapter (sent when each server's session opens) and deep prompts (sent with the steps that hold the
first tokens). Failures are judged by the client's one retry policy (``client.retry``).

Verification (``client.verify``) may find, a few steps late, that a server's outputs were wrong: the session
then goes back to the last verified token (``rewind_async``: a new chain without that server, fed the
session's own inputs up to there) and raises ``SessionRewound`` from its next step, or from ``confirm``
(check every step so far now), so that its caller generates again from there.

Concurrency: all methods ending in ``_async`` and the private coroutines run on the client's event
loop; ``step`` is the synchronous entry for any thread. One caller at a time per session.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import torch

from client.chain import Chain, ChainSpec, DeclaredRound
from client.handle import ClientHandle
from client.hop import HopSession, StepInput
from client.retry import Attempts
from client.verify import Verifier
from swarm.errors import SessionRewound
from swarm.models.adapters import LoraAdapter
from swarm.net.receipts import work_units
from swarm.net.rpc import ServerFailure
from swarm.routing.chains import Hop
from swarm.spans import BlockRange

logger = logging.getLogger(__name__)

__all__ = ["InferenceSession", "SessionRewound", "StepInput"]

T = TypeVar("T")


class InferenceSession:
    """Use as a context manager. One caller at a time: a session is one conversation's state."""

    def __init__(self, client: ClientHandle, max_length: int, adapter: LoraAdapter | str | None = None):
        self.client, self.max_length = client, max_length
        self.config = client.config
        self.adapter = adapter  # LoRA weights (detached) or a preloaded adapter's name, for every step
        self.position = 0  # tokens processed so far (per sequence)
        self.prefix = 0  # of them, trainable prompt tokens the model put before the caller's tokens
        self.padding: torch.Tensor | None = None  # [batch, position] bool: the padding mask the servers hold
        self._reorder: torch.Tensor | None = None  # hypothesis indices for the next step (beam search)
        self.batch_size: int | None = None
        self.local = client.local  # private mode: blocks the client runs itself (``client.private``)
        if self.local is not None:
            self.local.check_adapter(adapter)
        self._caches = None  # private mode: the KV caches of the client's own blocks, once the session steps
        self._spec = ChainSpec.of(self.config, max_length, adapter, self.local.remote if self.local else None)
        self._chain: Chain | None = None  # opened by ``open`` or the first step
        self._handovers: dict[HopSession, asyncio.Task] = {}  # leaving server -> its replacement being built
        self._inputs: list[StepInput] = []  # every step the session ran, as sent to its first server (for rewinds)
        self.closed = False
        verify = self.config.verify
        # checks on other servers
        self.verifier = Verifier(client, self._spec, verify, lambda: self.position) if verify > 0 else None

    @property
    def route(self) -> list[Hop]:
        """The servers this session currently goes through, with the blocks each one runs."""
        return [hop.hop for hop in self.hops]

    @property
    def hops(self) -> list[HopSession]:
        """This session's part on each server of its chain (empty before it opens and once it is closed)."""
        return list(self._chain.hops) if self._chain is not None and not self.closed else []

    @property
    def relayed(self) -> int:
        """Push mode: inputs the client had to relay because a server did not push them."""
        return self._chain.relayed if self._chain is not None else 0

    @property
    def moving(self) -> int:
        """Replacements for leaving servers still being built (each swaps in at the next step once ready)."""
        return sum(not task.done() for task in self._handovers.values())

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self, batch_size: int = 1) -> InferenceSession:
        """Choose the chain and open its streams now (``step`` does it lazily otherwise)."""
        return self.client.loop.run(self.open_async(batch_size))

    async def open_async(self, batch_size: int = 1) -> InferenceSession:
        """``open`` for code running on the client's event loop. Raises ``MissingBlocksError`` if some
        blocks have no server after ``wait_for_blocks``."""
        if self.batch_size is not None and batch_size != self.batch_size:
            raise ValueError(f"session already opened for a batch of {self.batch_size}")
        if self.closed:
            raise RuntimeError("this inference session is closed")
        self.batch_size = batch_size
        if self._chain is None:
            chain = await self._open_with_retries(batch_size)
            if self.closed:  # closed while opening: nobody will close these streams later
                chain.close()
                raise RuntimeError("this inference session was closed while it opened")
            self._chain = chain
        return self

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep row ``rows[i]`` of the session as row i from the next step on (beam search)."""
        rows = rows.to(torch.int64).reshape(-1)
        if self.batch_size is not None and rows.numel() != self.batch_size:
            raise ValueError(f"reorder needs {self.batch_size} row indices, got {rows.numel()}")
        if self.position == 0:
            raise ValueError("nothing to reorder yet: the session holds no tokens")
        self._reorder = rows if self._reorder is None else self._reorder[rows]
        self.padding = self.padding[rows]

    def step(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run new tokens through all blocks; returns the last block's hidden states for them.

        ``hidden`` [batch, new_tokens, hidden_size], ``position_ids`` [batch, new_tokens], ``attention_mask``
        [batch, new_tokens] bool (False marks padding) or None, ``prompts`` [num_blocks, 1 or batch, k, hidden]
        deep prompts of the session's first k tokens (or None). Synchronous; any thread may call it."""
        return self.client.loop.run(self.step_async(hidden, position_ids, attention_mask, prompts))

    async def step_async(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
        declared: DeclaredRound | None = None,
    ) -> torch.Tensor:
        """``step`` for code running on the client's event loop (e.g. one engine stepping many sessions).
        ``declared``: the round of several sessions' decode steps this step is part of (``client.chain``), so
        servers batch the round as soon as it is in; a step split into several messages declares none."""
        if self.closed:
            raise RuntimeError("this inference session is closed")
        await self._rewind_if_caught()
        batch, tokens, hidden_size = hidden.shape
        if self.batch_size is None:
            self.batch_size = batch
        if batch != self.batch_size:
            raise ValueError(f"session was opened for a batch of {self.batch_size}, got {batch}")
        if self.position + tokens > self.max_length:
            raise ValueError(f"session max_length {self.max_length} exceeded ({self.position} + {tokens} tokens)")
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, tokens):
            raise ValueError(f"attention_mask must be [{batch}, {tokens}] (the new tokens), got {attention_mask.shape}")
        new_padding = attention_mask if attention_mask is not None else torch.ones(batch, tokens, dtype=torch.bool)
        self.padding = new_padding if self.padding is None else torch.cat([self.padding, new_padding], dim=1)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        chunk = self._spec.chunk_tokens(batch, hidden_size, prompts is not None)
        outputs = []
        for start in range(0, tokens, chunk):
            end = min(tokens, start + chunk)
            mask = attention_mask[:, start:end] if attention_mask is not None else None
            first = self.position  # the chunk's first token in the session; deep prompts cover the first k tokens
            chunk_prompts = prompts[:, :, first : first + end - start] if prompts is not None else None
            if chunk_prompts is not None and chunk_prompts.shape[2] == 0:
                chunk_prompts = None
            reorder, self._reorder = self._reorder, None
            item = StepInput(hidden[:, start:end], position_ids[:, start:end], mask, chunk_prompts, reorder)
            outputs.append(await self._step_all(item, declared if end - start == tokens else None))
            self.position += end - start
        return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]

    async def _step_all(self, item: StepInput, declared: DeclaredRound | None) -> torch.Tensor:
        """A step through every block: the servers', and in private mode the client's own before and after."""
        if self.local is None:
            return await self._step(item, declared)
        if self._caches is None:
            self._caches = self.local.open(item.hidden.shape[0], self.max_length)
        adapter = self.adapter if isinstance(self.adapter, LoraAdapter) else None
        return await self.local.around(self._caches, self.position, item, adapter, lambda x: self._step(x, declared))

    async def _step(self, inputs: StepInput, declared: DeclaredRound | None = None) -> torch.Tensor:
        attempts = Attempts(self.client.routes, self.config.max_retries, "inference step")
        batch = inputs.hidden.shape[0]
        if self._chain is None:
            self._chain = await self._open_with_retries(batch, attempts)
        chain = self._chain
        await self._finish_handovers()
        if self.config.push and len(chain.hops) > 1:
            chain.send_headers(inputs, declared)
        index, current, pushed = 0, inputs, False
        while index < len(chain.hops):
            hop = chain.hops[index]
            shadow = self.verifier.start(hop, current, chain.hops) if self.verifier is not None else None
            try:
                output, pushed = await chain.run(hop, current, delivered=pushed, declared=declared)
                if self.verifier is not None:
                    output = await self.verifier.check(hop, current, output, shadow)
            except ServerFailure as failure:
                attempts.failed(failure)
                self._cancel_handover(hop)
                await self._replace(hop, batch, attempts)
                pushed = False
                continue  # the replacement replayed the history; now run this step through it
            hop.history.append(current)
            self.client.routes.mark_ok(hop.peer_id)
            self.client.receipts.add(hop.peer_id, work_units(tuple(current.hidden.shape), hop.hop.span))
            if hop.draining and hop not in self._handovers:
                logger.info("Server %s is leaving; moving its blocks %s in the background", hop.peer_id, hop.hop.span)
                self._handovers[hop] = asyncio.ensure_future(self._prepare_handover(hop, batch))
            current = dataclasses.replace(current, hidden=output)
            index += 1
        self._inputs.append(inputs)
        return current.hidden

    async def confirm_async(self) -> None:
        """Check every step so far now and wait for the checks (lazy verification checks in windows, in the
        background). Raises ``SessionRewound`` if one found a wrong output (the session went back to the last
        verified token); steps nobody could check are logged and left for a later check."""
        if self.verifier is not None:
            await self.verifier.confirm()
            await self._rewind_if_caught()

    def confirm(self) -> None:
        """``confirm_async`` from any thread."""
        self.client.loop.run(self.confirm_async())

    async def _rewind_if_caught(self) -> None:
        """Lazy verification found that a server returned wrong outputs the session used (waiting first while
        a dispute is being settled): go back to the last verified token and raise ``SessionRewound``."""
        if self.verifier is None:
            return
        await self.verifier.settled()
        position = self.verifier.take_rewind()
        if position is None:
            return
        await self.rewind_async(position)
        raise SessionRewound(
            position,
            f"a server returned wrong outputs from token {position} on; the session went back to {position} "
            "tokens on honest servers: step again from there",
        )

    async def rewind_async(self, tokens: int) -> None:
        """Go back to the session's first ``tokens`` tokens: a new chain (without flagged servers) is given
        the inputs of those tokens; the servers that held more are let go."""
        if not 0 <= tokens <= self.position:
            raise ValueError(f"cannot rewind to {tokens} tokens: the session holds {self.position}")
        for hop in list(self._handovers):
            self._cancel_handover(hop)
        if self._chain is not None:
            self._chain.close()
            self._chain = None
        kept = cut_steps(self._inputs, tokens)
        if kept:
            attempts = Attempts(self.client.routes, self.config.max_retries, "rewinding a session")
            self._chain = await _retrying(attempts, lambda: self._replayed(self._spec.span, self.batch_size, kept))
        if self.verifier is not None:
            self.verifier.prune(self._chain.hops if self._chain is not None else [], obsolete_from=tokens)
        self._inputs, self.position, self._reorder = kept, tokens, None
        if self._caches is not None:
            self.local.cut(self._caches, tokens)
        self.padding = self.padding[:, :tokens] if tokens and self.padding is not None else None
        self.prefix = self.prefix if tokens >= self.prefix else 0
        logger.warning("Session rewound to %d tokens, now on servers %s", tokens, [h.peer_id for h in self.hops])

    def rewind(self, tokens: int) -> None:
        """``rewind_async`` from any thread."""
        self.client.loop.run(self.rewind_async(tokens))

    async def _open_with_retries(self, batch: int, attempts: Attempts | None = None) -> Chain:
        attempts = attempts or Attempts(self.client.routes, self.config.max_retries, "inference step")
        return await _retrying(attempts, lambda: Chain.open(self.client, self._spec, self._spec.span, batch))

    async def _replace(self, failed: HopSession, batch: int, attempts: Attempts) -> None:
        """Put other servers in place of ``failed``: its verification shadow, which already holds its inputs,
        else new servers with its inputs so far replayed into them."""
        failed.stream.close()
        replacement = await self.verifier.take_over(failed) if self.verifier is not None else None
        if replacement is not None:
            logger.info("The verifier of server %s takes its place: %s", failed.peer_id, replacement.peer_ids)
        else:
            replacement = await _retrying(attempts, lambda: self._replayed(failed.hop.span, batch, failed.history))
        self._chain.replace(failed, replacement)

    async def _replayed(self, span: BlockRange | None, batch: int, steps: list[StepInput]) -> Chain:
        """A new chain for ``span`` that holds ``steps``."""
        replacement = await Chain.open(self.client, self._spec, span, batch)
        await replacement.replay(steps)
        logger.info("Replayed %d steps into %d replacement server(s)", len(steps), len(replacement.hops))
        return replacement

    async def _prepare_handover(self, leaving: HopSession, batch: int) -> tuple[Chain, int]:
        """Build a replacement for a server that is leaving, replaying its history so far."""
        attempts = Attempts(self.client.routes, self.config.max_retries, "moving off a leaving server")
        exclude = frozenset({leaving.peer_id})
        span = leaving.hop.span
        replacement = await _retrying(attempts, lambda: Chain.open(self.client, self._spec, span, batch, exclude))
        done = len(leaving.history)
        await replacement.replay(leaving.history[:done])
        return replacement, done

    async def _finish_handovers(self) -> None:
        """Swap in the replacements that are ready, after catching them up with the steps sent meanwhile."""
        for leaving, task in list(self._handovers.items()):
            if not task.done():
                continue
            del self._handovers[leaving]
            if task.cancelled() or task.exception() is not None:
                logger.info("Could not move away from leaving server %s yet: %r", leaving.peer_id, task)
                continue
            if leaving not in self._chain.hops:  # it failed meanwhile and was replaced the usual way
                _close_replacement(task)
                continue
            replacement, done = task.result()
            try:
                await replacement.replay(leaving.history[done:])
            except ServerFailure as failure:
                logger.info("Replacement for leaving server %s failed: %s", leaving.peer_id, failure)
                continue
            self._chain.replace(leaving, replacement)
            leaving.stream.close()
            logger.info("Moved blocks %s off leaving server %s", leaving.hop.span, leaving.peer_id)

    def _cancel_handover(self, hop: HopSession) -> None:
        task = self._handovers.pop(hop, None)
        if task is not None:
            task.cancel()
            task.add_done_callback(_close_replacement)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        chain, verifier = self._chain, self.verifier
        tasks, self._handovers = list(self._handovers.values()), {}

        def close_all() -> None:
            if verifier is not None:
                verifier.finish()
            if chain is not None:
                chain.close()
            for task in tasks:
                task.cancel()
                task.add_done_callback(_close_replacement)

        self.client.loop.loop.call_soon_threadsafe(close_all)


async def _retrying(attempts: Attempts, action: Callable[[], Awaitable[T]]) -> T:
    """Run ``action`` (open or replace part of the chain) until it succeeds or attempts run out."""
    while True:
        try:
            return await action()
        except ServerFailure as failure:
            attempts.failed(failure)


def cut_steps(steps: list[StepInput], tokens: int) -> list[StepInput]:
    """The first ``tokens`` tokens of consecutive ``steps`` (a step across the cut keeps its first part)."""
    kept, left = [], tokens
    for step in steps:
        size = step.hidden.shape[1]
        if left <= 0:
            break
        if size > left:
            step = dataclasses.replace(
                step,
                hidden=step.hidden[:, :left],
                position_ids=step.position_ids[:, :left],
                attention_mask=step.attention_mask[:, :left] if step.attention_mask is not None else None,
                prompts=step.prompts[:, :, :left] if step.prompts is not None else None,
            )
        kept.append(step)
        left -= size
    return kept


def _close_replacement(task: asyncio.Task) -> None:
    """A cancelled handover may have opened streams already: close them."""
    if task.cancelled() or task.exception() is not None:
        return
    replacement, _ = task.result()
    replacement.close()
