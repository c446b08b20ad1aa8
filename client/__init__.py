"""Uses the swarm: ``from client import AutoDistributedModelForCausalLM``.

- ``model``: the transformers-compatible model (local embeddings/norm/head, remote blocks, ``generate``)
- ``swarmclient``: SwarmClient (DHT, libp2p, routes) and stateless forward passes
- ``session``: InferenceSession (streams through a chain, history for replay, failover)
- ``sequence``: RouteManager (swarm view, bans, waiting for missing blocks)
- ``__main__``: ``python -m client``, a completion in the terminal
- ``bans``: the ban policy (pure): exponential bans whose failures decay with successes and time
- ``loop``: the background event loop that owns libp2p
- ``config``: ClientConfig
- ``api/``: ``python -m client.api``, an OpenAI-compatible HTTP API and chat page over the swarm (an
  application of this package: its own docstring maps its modules and its concurrency model)

Concurrency: the public API is synchronous; network work runs on one background asyncio loop
(uvloop); blocking DHT look-ups run in that loop's default executor. Code already on that loop (the API's
engine) uses the async forms (``InferenceSession.open_async``, ``step_async``). Imports only ``proto`` and
``swarm``.
"""

from client.config import ClientConfig
from client.model import AutoDistributedModelForCausalLM, DistributedModelForCausalLM

__all__ = ["AutoDistributedModelForCausalLM", "DistributedModelForCausalLM", "ClientConfig"]
