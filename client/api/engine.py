"""The generation engine: tasks on the client's event loop step the open requests in lockstep rounds.

Each request has its own ``InferenceSession`` (its own session on every server), so requests join and
leave between rounds. A request first opens its session and runs its prompt through the swarm on its
own (prefill: a long prompt never holds up the others' rounds); then it joins a lane, the least loaded of
``APIConfig.lanes`` (default 2). Each lane is one task that steps its requests in rounds of their own: while
one lane's round is on the first server of the chain, another's can be on the next server, so the chain's
servers compute at the same time (a pipeline) instead of taking turns; lanes hand requests to each other
between rounds to stay even. Each round of a lane:

1. the local work of all requests in the round as one batch, on one worker thread (off the event loop):
   the model's ``next_token_logits`` over their last hidden states (final norm, LM head, soft-cap), then
   per request sampling with its own settings and generator, then the model's ``embed`` of the new tokens
   (the same two steps ``forward`` and ``generate`` use, so the API computes the model as they do);
2. each request takes its token (text, stop strings, eos, max_tokens) and its handler gets the new text;
3. the requests still going step their sessions at once (``asyncio.gather`` of ``step_async``), so every
   server receives their decode steps together and runs them as one batch. The round is declared
   (``client.chain.DeclaredRound``: its number, and to each server how many of its steps that server gets),
   so a server runs it as soon as its steps are in, without waiting on a timer.

Fair share between API keys (``client.api.keys``): while requests of several keys are generating, a
round steps at most ``shared_round_requests`` of its lane's requests, picked fairly between keys (the key
with the fewest steps first, and within a key the request that waited longest), so a key with 16 streams
does not make another key's single stream wait for rounds of 16; a lone key's rounds step all its requests.

Before its last event, a request waits until verification confirmed every step of it (``confirm_async``).
When a check finds that a server's outputs were wrong, the request's session goes back to the last
verified token (``SessionRewound``): the request keeps the tokens that came from verified outputs and goes
on from there on honest servers, so a whole answer is what an honest swarm gives. A streamed answer
cannot take back text it sent: if it sent text of the tokens taken back, it ends with an error event
(code ``unverified_output``).

A request whose HTTP client went away is marked cancelled; it leaves at the end of the round (its step
in flight is not interrupted, which would look like a server failure) and its session is closed on
every server.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from client.api.config import APIConfig
from client.api.decoding import TextTracker, eos_ids, new_generator, sample
from client.api.errors import APIError
from client.api.keys import APIKey, Limiter, fair_pick, level_counts
from client.api.lanes import Lane, surplus
from client.api.protocol import CompletionRequest
from client.chain import DeclaredRound
from client.model import DistributedModelForCausalLM
from client.session import InferenceSession, SessionRewound
from swarm.routing.chains import Hop

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Event:
    text: str = ""  # new text of the completion
    finish_reason: str | None = None  # set on the last event: "stop" or "length"
    error: BaseException | None = None  # the request failed after it started


class Generation:
    """One request in the engine. Its handler awaits ``opened``, then reads ``events`` until the last one."""

    def __init__(self, request: CompletionRequest, tracker: TextTracker, api_key: APIKey):
        self.request, self.tracker, self.api_key = request, tracker, api_key
        self.last_round = -1  # the last round that stepped it (a shared round takes those waiting longest first)
        self.generator = new_generator(request.sampling.seed)  # used only on the engine's worker thread
        self.session: InferenceSession | None = None
        self.hidden: torch.Tensor | None = None  # [1, hidden_size]: last output, waiting for the next round
        self.opened: asyncio.Future = asyncio.get_running_loop().create_future()
        self.opened.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "never retrieved"
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.route: list[dict] = []  # the servers that answered: peer id, public name, blocks
        self.cancelled = False  # its HTTP client went away
        self.released = False

    @property
    def usage(self) -> dict[str, int]:
        prompt, completion = len(self.request.prompt_ids), len(self.tracker.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Engine:
    """Create, ``start`` and ``stop`` on the client's event loop; every method runs there."""

    def __init__(self, model: DistributedModelForCausalLM, tokenizer, config: APIConfig, limiter: Limiter):
        self.model, self.tokenizer, self.config, self.limiter = model, tokenizer, config, limiter
        self.eos_ids = eos_ids(model.generation_config, tokenizer)
        self._slots = asyncio.Semaphore(config.max_concurrent_requests)
        self._waiting = 0
        self._open: set[Generation] = set()
        self._lanes = [Lane(index) for index in range(max(1, config.lanes))]
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="stamen-api-local")
        self._tasks: list[asyncio.Task] = []
        self.rounds = 0  # rounds stepped so far (the next round's number), and the steps sent in them
        self.round_items = 0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(lane), name=f"stamen-api-lane-{lane.index}") for lane in self._lanes]

    async def submit(self, request: CompletionRequest, api_key: APIKey) -> Generation:
        """Admit the request under its key's limits (429), wait for a free slot (429 if too many wait already)
        and start it."""
        self.limiter.admit(api_key, len(request.prompt_ids))
        try:
            if self._slots.locked() and self._waiting >= self.config.max_waiting_requests:
                raise APIError(
                    429,
                    f"Too many requests: {self.config.max_concurrent_requests} are generating and "
                    f"{self._waiting} waiting; try again later.",
                    "rate_limit_error",
                    None,
                    "too_many_requests",
                )
            self._waiting += 1
            try:
                await self._slots.acquire()
            finally:
                self._waiting -= 1
        except BaseException:
            self.limiter.release(api_key)
            raise
        decode = functools.partial(self.tokenizer.decode, skip_special_tokens=True)
        tracker = TextTracker(decode, request.stop, self.eos_ids, request.max_tokens)
        generation = Generation(request, tracker, api_key)
        self._open.add(generation)
        generation.task = asyncio.create_task(self._start(generation))
        generation.task.add_done_callback(lambda task: task.cancelled() and self._release(generation))
        return generation

    def cancel(self, generation: Generation) -> None:
        """The request's client went away (or the handler is done): free its sessions. Idempotent."""
        if generation.released:
            return
        generation.cancelled = True
        if generation.task is not None and not generation.task.done():
            generation.task.cancel()  # opening or prefilling: only this request's session is involved
        for lane in self._lanes:
            lane.wake.set()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for generation in list(self._open):
            if generation.task is not None:
                generation.task.cancel()
            self._fail(generation, APIError(503, "The API server is shutting down.", "service_unavailable"))
        self._worker.shutdown(wait=False)

    async def _start(self, generation: Generation) -> None:
        """Open the request's session and run its prompt through the swarm; then it joins the rounds."""
        prompt = generation.request.prompt_ids
        try:
            session = self.model.client.inference_session(len(prompt) + generation.request.max_tokens)
            generation.session = session
            await session.open_async(batch_size=1)
            generation.opened.set_result(None)
            ids = torch.tensor([prompt], dtype=torch.int64)  # [1, prompt]
            positions = torch.arange(len(prompt), dtype=torch.int64)[None]  # [1, prompt]
            embeddings = await asyncio.get_running_loop().run_in_executor(self._worker, self._embed, ids)
            hidden = await session.step_async(embeddings, positions)  # [1, prompt, hidden_size]
            generation.hidden = hidden[:, -1]  # [1, hidden_size]
        except Exception as exc:
            self._fail(generation, exc)
            return
        lane = min(self._lanes, key=lambda candidate: candidate.load)
        lane.joining.append(generation)
        lane.wake.set()

    async def _run(self, lane: Lane) -> None:
        while True:
            if not lane.active and not lane.joining:
                lane.wake.clear()
                await lane.wake.wait()
            lane.active.extend(lane.joining)
            lane.joining.clear()
            self._drop_cancelled(lane)
            self._even_out(lane)
            if not lane.active:
                continue
            try:
                await self._round(lane)
            except Exception as exc:  # a bug, not one request's fault: fail this round's requests, keep serving
                logger.exception("Engine round failed")
                for generation in list(lane.active):
                    self._fail(generation, exc)

    def _even_out(self, lane: Lane) -> None:
        """Between two of its rounds, ``lane`` hands requests to the least loaded lane if it has too many
        (requests end at different times); a moved request joins that lane's next round."""
        moving = surplus(self._lanes, lane)
        if moving:
            least = min(self._lanes, key=lambda other: other.load)
            least.joining.extend(lane.active[-moving:])
            del lane.active[-moving:]
            least.wake.set()

    def _pick(self, lane: Lane) -> list[Generation]:
        """The requests this round of ``lane`` steps: all of them, unless fair share is on and requests of
        several keys are generating; then at most ``shared_round_requests``, shared fairly between keys."""
        keys = {g.api_key.name for other in self._lanes for g in other.active}
        if not self.config.fair_share or len(keys) < 2 or len(lane.active) <= self.config.shared_round_requests:
            return list(lane.active)
        waiting: dict[str, list[Generation]] = {}
        for generation in sorted(lane.active, key=lambda g: g.last_round):
            waiting.setdefault(generation.api_key.name, []).append(generation)
        weights = {g.api_key.name: g.api_key.weight for g in lane.active}
        lane.counts = level_counts(lane.counts, set(waiting))
        return fair_pick(waiting, self.config.shared_round_requests, lane.counts, weights)

    async def _round(self, lane: Lane) -> None:
        generations = self._pick(lane)
        for generation in generations:
            generation.last_round = self.rounds
        started = time.perf_counter()
        hidden = torch.cat([generation.hidden for generation in generations])  # [n, hidden_size]
        tokens, embeddings = await asyncio.get_running_loop().run_in_executor(
            self._worker, self._local_work, hidden, generations
        )  # embeddings: [n, 1, hidden_size]
        local_seconds = time.perf_counter() - started
        stepping, now = [], time.monotonic()
        for generation, token, embedding in zip(generations, tokens, embeddings, strict=True):
            if generation.cancelled:
                continue
            self.limiter.of(generation.api_key).use(1, now)
            piece = generation.tracker.add(token)
            if piece:
                generation.events.put_nowait(Event(piece))
            if generation.tracker.finish_reason:
                self._finish(generation)
            else:
                stepping.append((generation, embedding[None]))  # [1, 1, hidden_size]
        # a round is numbered and sized before any of its steps is sent, so servers can batch it once complete
        round_id, round_size = self.rounds, len(stepping)
        self.rounds += 1
        self.round_items += round_size
        declared = DeclaredRound(round_id, [generation.session for generation, _ in stepping])
        results = await asyncio.gather(
            *(g.session.step_async(e, torch.tensor([[g.session.position]]), declared=declared) for g, e in stepping),
            return_exceptions=True,
        )
        for (generation, _), result in zip(stepping, results, strict=True):
            if isinstance(result, SessionRewound):
                lane.discard(generation)
                asyncio.get_running_loop().create_task(self._resume(generation, result.position))
            elif isinstance(result, BaseException):
                self._fail(generation, result)
            else:
                generation.hidden = result[:, -1]  # [1, hidden_size]
        self._drop_cancelled(lane)
        logger.debug(
            "Round %d (lane %d) of %d of its %d requests (%d stepped): local %.1f ms, swarm step %.1f ms",
            round_id,
            lane.index,
            len(generations),
            len(lane.active),
            round_size,
            1000 * local_seconds,
            1000 * (time.perf_counter() - started - local_seconds),
        )

    @torch.no_grad()
    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """On the worker thread: the model's embedding step, [batch, tokens] -> [batch, tokens, hidden_size]."""
        return self.model.embed(ids)

    @torch.no_grad()
    def _local_work(self, hidden: torch.Tensor, generations: list[Generation]) -> tuple[list[int], torch.Tensor]:
        """On the worker thread: the model's next-token logits over the batch (in float32, as ``generate``
        samples them), per-request sampling, the model's embedding step for the new tokens."""
        logits = self.model.next_token_logits(hidden).float()  # [n, vocab]
        tokens = [sample(logits[i], g.request.sampling, g.generator) for i, g in enumerate(generations)]
        return tokens, self._embed(torch.tensor(tokens, dtype=torch.int64)[:, None])  # [n, 1, hidden_size]

    def _finish(self, generation: Generation) -> None:
        for lane in self._lanes:
            lane.discard(generation)
        asyncio.get_running_loop().create_task(self._conclude(generation))

    async def _conclude(self, generation: Generation) -> None:
        """The last event, once verification confirmed the answer's steps (``InferenceSession.confirm_async``)
        and the route is described (names come from the DHT view: off the loop)."""
        if not await self._survived(generation, generation.session.confirm_async()):
            return
        hops = generation.session.route
        self._release(generation)
        try:
            generation.route = await asyncio.get_running_loop().run_in_executor(None, self._describe, hops)
        except Exception:  # the answer matters more than the names of its servers
            logger.warning("Could not describe the route", exc_info=True)
            generation.route = [{"peer_id": hop.peer_id, "public_name": "", "blocks": str(hop.span)} for hop in hops]
        generation.events.put_nowait(Event(finish_reason=generation.tracker.finish_reason))

    async def _survived(self, generation: Generation, work: Awaitable[T]) -> T | bool | None:
        """``work``'s result (True for None), or None when it failed: then the generation was resumed from
        the last verified token (``SessionRewound``) or failed with the error."""
        try:
            result = await work
        except SessionRewound as rewound:
            await self._resume(generation, rewound.position)
            return None
        except Exception as exc:
            self._fail(generation, exc)
            return None
        return True if result is None else result

    async def _resume(self, generation: Generation, position: int) -> None:
        """Verification took back the session's outputs from token ``position`` on (``SessionRewound``): keep the
        tokens that came from verified outputs and go on from there. A stream that already sent text of the
        tokens taken back cannot unsend it: it ends with an error event instead."""
        prompt, old = generation.request.prompt_ids, generation.tracker
        kept = old.tokens[: max(0, position + 1 - len(prompt))]
        tracker = TextTracker(old.decode, old.stops, old.eos_ids, old.max_tokens)
        for token in kept:
            tracker.add(token)
        if generation.request.stream and len(old.sent) > len(tracker.sent):
            message = (
                f"A server of this answer's route was caught returning wrong outputs; the text streamed from "
                f"completion token {len(kept)} on was not verified. The server is no longer used: send the "
                "request again."
            )
            self._fail(generation, APIError(502, message, "server_error", None, "unverified_output"))
            return
        generation.tracker = tracker
        ids = torch.tensor([prompt + kept], dtype=torch.int64)[:, position:]  # [1, tokens to send again]
        positions = torch.arange(position, position + ids.shape[1], dtype=torch.int64)[None]

        async def send_again() -> torch.Tensor:  # [1, tokens, hidden_size]
            embeddings = await asyncio.get_running_loop().run_in_executor(self._worker, self._embed, ids)
            return await generation.session.step_async(embeddings, positions)

        if (hidden := await self._survived(generation, send_again())) is None:
            return
        generation.hidden = hidden[:, -1]
        lane = min(self._lanes, key=lambda candidate: candidate.load)
        lane.joining.append(generation)
        lane.wake.set()

    def _describe(self, hops: list[Hop]) -> list[dict]:
        route = []
        for hop in hops:
            info = self.model.client.routes.server(hop.peer_id)
            route.append(
                {"peer_id": hop.peer_id, "public_name": info.public_name if info else "", "blocks": str(hop.span)}
            )
        return route

    def _fail(self, generation: Generation, error: BaseException) -> None:
        if generation.released:
            return
        if not generation.opened.done():
            generation.opened.set_exception(error)
        else:
            generation.events.put_nowait(Event(error=error))
        self._release(generation)

    def _drop_cancelled(self, lane: Lane) -> None:
        for generation in [g for g in lane.active + lane.joining if g.cancelled]:
            self._release(generation)

    def _release(self, generation: Generation) -> None:
        """Close the request's session on every server and give its slot back. Idempotent."""
        if generation.released:
            return
        generation.released = True
        self.limiter.release(generation.api_key)
        self._open.discard(generation)
        for lane in self._lanes:
            lane.discard(generation)
        if generation.session is not None:
            generation.session.close()
        if not generation.opened.done():  # cancelled before its session opened
            generation.opened.cancel()
        self._slots.release()
