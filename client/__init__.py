"""Uses the swarm: ``from client import AutoDistributedModelForCausalLM``.

- ``model``: the causal LM (local embeddings/norm/head, remote blocks, ``generate``, loss, hidden states)
- ``classification``: the sequence classifier (local score head)
- ``pretrained``: what both share: loading the local parts, connecting, the tuning API (prompts, LoRA)
- ``base``: the family's module layout, the base model (``model.model``) and ``RemoteCache``
- ``layers``: the model's blocks as a module (len, slices, iteration), run by servers (and by the client in
  private mode), and the autograd function through the servers
- ``passes``: stateless forward and backward passes, split into bounded requests, with failover
- ``lora``, ``ptune``: LoRA weights and trainable prompts kept on the client
- ``swarmclient``: SwarmClient (DHT, libp2p, routes, sessions, passes)
- ``handle``: ClientHandle, what sessions, chains, verification and passes need of SwarmClient (a protocol, so
  none of them imports ``swarmclient``)
- ``session``: InferenceSession (steps through a chain hop by hop, failover, moves off leaving servers, beam
  reorders)
- ``chain``: Chain, the one chain runner (open sessions on servers covering a span, run a step, replay a
  history, close), used by sessions, verification shadows and referees
- ``retry``: the one retry policy (what a server's failure means, how many failovers an operation gets)
- ``sequence``: RouteManager (swarm view, bans, waiting for missing blocks; async look-ups, shared by callers)
- ``hop``: one server's part of a session (its stream, step history, liveness ping), steps merged for replay
- ``envelope``: what every request to one server carries (its dtype, compression, membership proof, voucher)
- ``verify``: verification (shadow sessions on other servers check each hop's outputs, a referee settles
  disputes, cheaters are flagged and replaced, a session that used wrong outputs goes back to the last
  verified token; a failed server's shadow takes its place); ``shadows``: the shadows, the verifier chains
  behind them and the search for a referee; ``verdicts``: its pure
  decisions (distances, tolerances by dtype, verdicts, check windows); ``referee``: the client's own
  computation of a disputed span; ``resume``: how ``generate`` goes on from the verified prefix after that
- ``private``: private mode, the model's first (and last) blocks computed on the client (``local_blocks``,
  ``local_last_blocks``), with the servers' compute core, so servers never see the prompt's embeddings
- ``points``: receipts for the work servers did (signed, sent periodically) and the volunteer's voucher
- ``__main__``: ``python -m client``, a completion in the terminal
- ``bans``: the ban policy (pure): exponential bans whose failures decay with successes and time
- ``loop``: the background event loop that owns libp2p
- ``config``: ClientConfig
- ``api/``: ``python -m client.api``, an OpenAI-compatible HTTP API and chat page over the swarm (an
  application of this package: its own docstring maps its modules and its concurrency model)

Concurrency: the public API is synchronous; network work runs on one background asyncio loop
(uvloop); DHT look-ups are awaited there (``RouteManager``). Code already on that loop (the API's
engine) uses the async forms (``InferenceSession.open_async``, ``step_async``). Autograd's backward calls the
servers from the thread that runs it, through the same loop. Imports only ``proto`` and ``swarm``.
"""

from client.classification import (
    AutoDistributedModelForSequenceClassification,
    DistributedModelForSequenceClassification,
)
from client.config import ClientConfig
from client.model import AutoDistributedModelForCausalLM, DistributedModelForCausalLM

__all__ = [
    "AutoDistributedModelForCausalLM",
    "AutoDistributedModelForSequenceClassification",
    "ClientConfig",
    "DistributedModelForCausalLM",
    "DistributedModelForSequenceClassification",
]
