"""APIServer: the API's lifecycle. ``start`` joins the swarm and listens; ``shutdown`` is idempotent."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from aiohttp import web
from transformers import AutoTokenizer

from client.api.config import APIConfig
from client.api.engine import Engine
from client.api.keys import Limiter, load_keys
from client.api.protocol import Limits
from client.api.routes import Routes
from client.model import AutoDistributedModelForCausalLM, DistributedModelForCausalLM
from swarm.models.modelpath import DEFAULT_MODEL, resolve_model

logger = logging.getLogger(__name__)


def model_ids(config: APIConfig) -> tuple[str, ...]:
    """The names a request may give as ``model``: the shown one first (a folder is shown by its name)."""
    given = config.model or DEFAULT_MODEL
    shown = config.served_model_name or (Path(given).name if Path(given).is_dir() else given)
    return tuple(dict.fromkeys([shown, given]))


def limits(config: APIConfig, model: DistributedModelForCausalLM) -> Limits:
    total = min(config.max_total_tokens, getattr(model.config, "max_position_embeddings", None) or 2**31)
    return Limits(
        model_ids=model_ids(config),
        vocab_size=model.config.vocab_size,
        max_prompt_tokens=min(config.max_prompt_tokens, total - 1),
        max_total_tokens=total,
        default_max_tokens=config.default_max_tokens,
    )


class APIServer:
    def __init__(self, config: APIConfig):
        self.config = config
        self.url: str | None = None
        self.model: DistributedModelForCausalLM | None = None
        self.engine: Engine | None = None
        self._runner: web.AppRunner | None = None

    def start(self) -> str:
        """Load the tokenizer and the model's local parts, join the swarm, listen; returns the URL."""
        config = self.config
        limiter = Limiter(load_keys(config.api_keys) if config.api_keys else None, time.monotonic)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(config.model))
        self.model = AutoDistributedModelForCausalLM.from_pretrained(
            config.model,
            initial_peers=config.initial_peers,
            dht_prefix=config.dht_prefix,
            swarm_key=config.swarm_key,
            wait_for_blocks=config.wait_for_blocks,
            verify=config.verify,
            local_blocks=config.local_blocks,
            local_last_blocks=config.local_last_blocks,
        )
        self.url = self.model.client.loop.run(self._listen(tokenizer, limiter))
        return self.url

    async def _listen(self, tokenizer, limiter: Limiter) -> str:
        """On the client's event loop: the engine and the HTTP server share it with libp2p."""
        self.engine = Engine(self.model, tokenizer, self.config, limiter)
        self.engine.start()
        routes = Routes(self.engine, tokenizer, limits(self.config, self.model), int(time.time()))
        # handler_cancellation: a handler whose client disconnects is cancelled, so its sessions are freed
        self._runner = web.AppRunner(routes.app(self.config.max_body_bytes), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def shutdown(self) -> None:
        """Stop answering, free every open request's sessions, leave the swarm."""
        model, self.model = self.model, None
        if model is None:
            return
        try:
            model.client.loop.run(self._stop(), timeout=15)
        except (TimeoutError, RuntimeError):
            logger.warning("The API did not stop cleanly", exc_info=True)
        model.shutdown()

    async def _stop(self) -> None:
        if self.engine is not None:
            await self.engine.stop()
        if self._runner is not None:
            await self._runner.cleanup()
