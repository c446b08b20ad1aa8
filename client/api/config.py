"""APIConfig: everything the HTTP API needs, built by ``python -m client.api`` (or by tests)."""

from __future__ import annotations

from dataclasses import dataclass, field

from client.verdicts import DEFAULT_VERIFY


@dataclass
class APIConfig:
    initial_peers: list[str] = field(default_factory=list)  # multiaddrs of any swarm member
    model: str | None = None  # model name or local Hugging Face folder; None = the default model
    swarm_key: str | None = None  # private swarm: path of the swarm key file
    dht_prefix: str | None = None  # DHT key prefix; None = derived from the model name
    host: str = "127.0.0.1"  # interface the HTTP server listens on
    port: int = 8000  # TCP port; 0 picks a free one
    max_concurrent_requests: int = 16  # requests generating at once (each holds one session on every server)
    lanes: int = 2  # groups of requests stepped in rounds of their own: while one lane's round is on one server,
    # another lane's can be on the next (a pipeline over the chain); 1 = every request in one lockstep round
    api_keys: str | None = None  # JSON file of API keys and their limits (client.api.keys); None = open to all
    fair_share: bool = True  # share rounds fairly between keys while several keys' requests generate
    shared_round_requests: int = 4  # the most requests a lane's round steps while several keys share it
    max_waiting_requests: int = 64  # requests queued for a free slot; beyond this the API answers 429
    max_prompt_tokens: int = 2048  # longest prompt (after the chat template), in tokens
    max_total_tokens: int = 4096  # prompt + max_tokens, capped by the model's max_position_embeddings
    default_max_tokens: int = 256  # max_tokens when a request gives none (capped by max_total_tokens)
    max_body_bytes: int = 1 << 20  # largest request body accepted
    wait_for_blocks: float = 5.0  # seconds to wait for servers of missing blocks before answering 503
    num_threads: int | None = None  # torch threads for the local work (embeddings, head, sampling)
    served_model_name: str | None = None  # model id shown in /v1/models; None = the model's name
    verify: float = DEFAULT_VERIFY  # share of steps checked on another server (ClientConfig.verify)
    local_blocks: int = 0  # private mode: the model's first N blocks run in the API's process (ClientConfig)
    local_last_blocks: int = 0  # ...and its last M blocks
