"""ServerConfig: everything a server needs, built by the CLI (or by tests) and passed down whole."""

from __future__ import annotations

from dataclasses import dataclass, field

from swarm.spans import BlockRange


@dataclass
class ServerConfig:
    blocks: BlockRange  # span of blocks to host, e.g. BlockRange(10, 20) for --blocks 10:20
    model: str | None = None  # model name or local folder; None = the default model (SmolLM2-135M-Instruct)
    initial_peers: list[str] = field(default_factory=list)  # multiaddrs to join; empty = start a new swarm
    host: str = "0.0.0.0"  # interface to listen on
    port: int = 0  # TCP port to listen on; 0 picks a free one
    announce_host: str | None = None  # public IP to advertise when behind NAT/port forwarding
    dtype: str = "auto"  # float32, bfloat16, float16, or auto (float32 on CPU)
    dht_prefix: str | None = None  # DHT key prefix; None = derived from the model name
    cache_tokens: int = 16384  # KV-cache budget in tokens (batch x max_length summed over sessions)
    public_name: str = ""  # name shown to others in `swarm status`
    max_request_tokens: int = 8192  # largest batch x new_tokens a single request may carry
    max_length_limit: int = 8192  # largest max_length a session may ask for
    session_idle_timeout: float = 120.0  # seconds without a step before a session is closed and its cache freed
    step_timeout: float = 120.0  # seconds a stream may wait before its first message
    announce_period: float = 10.0  # seconds between DHT refreshes of this server's record
    record_ttl: float = 30.0  # seconds a record stays valid in the DHT without refresh
    shutdown_grace: float = 5.0  # seconds to let steps in flight finish on SIGTERM/SIGINT
    num_threads: int | None = None  # torch intra-op threads; None = torch's default
    identity_path: str | None = None  # private key file for a fixed peer id
