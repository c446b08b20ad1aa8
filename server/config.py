"""ServerConfig: everything a server needs, built by the CLI (or by tests) and passed down whole."""

from __future__ import annotations

from dataclasses import dataclass, field

from swarm.spans import BlockRange


@dataclass
class ServerConfig:
    blocks: BlockRange | None = None  # span to host (--blocks 10:20); None = choose (needs num_blocks)
    num_blocks: int | None = None  # --num-blocks N: host N blocks where the swarm is weakest, and rebalance
    model: str | None = None  # model name or local folder; None = the default model (SmolLM2-135M-Instruct)
    initial_peers: list[str] = field(default_factory=list)  # multiaddrs to join; empty = start a new swarm
    host: str = "0.0.0.0"  # interface to listen on
    port: int = 0  # TCP port to listen on; 0 picks a free one
    announce_host: str | None = None  # public IP to advertise when behind NAT/port forwarding
    nat_traversal: bool | None = None  # port mapping, AutoNAT, relays; None = on unless host is loopback
    auto_relay: bool = False  # behind NAT without port forwarding: become reachable through relays
    announce_port: int | None = None  # port to advertise with announce_host; None = the listening port
    dtype: str = "auto"  # float32, bfloat16, float16, or auto (float32 on CPU)
    dht_prefix: str | None = None  # DHT key prefix; None = derived from the model name
    cache_tokens: int = 16384  # KV-cache budget in tokens (batch x max_length summed over sessions)
    public_name: str = ""  # name shown to others in `swarm status`
    max_request_tokens: int = 8192  # largest batch x new_tokens a single request may carry
    max_length_limit: int = 8192  # largest max_length a session may ask for
    max_sessions_per_peer: int = 16  # inference sessions one peer may hold open at once (TOO_MANY_REQUESTS beyond)
    max_queued_steps: int = 8  # steps a client may send ahead of the server's answers on one stream
    max_message_bytes: int | None = None  # largest message on a stream; None = room for the largest valid step
    session_idle_timeout: float = 120.0  # seconds without a step before a session is closed and its cache freed
    announce_period: float = 10.0  # seconds between DHT refreshes of this server's record
    record_ttl: float = 30.0  # seconds a record stays valid in the DHT without refresh
    shutdown_grace: float = 5.0  # seconds to let steps in flight finish on SIGTERM/SIGINT
    max_batch_tokens: int = 256  # decode steps of many sessions run as one batch of up to this many rows x tokens
    fair_share: bool = True  # a busy server shares its compute fairly between peers (--fair-share off: urgency order)
    chunk_token_blocks: int = 4096  # long work runs in slices of about this many tokens x blocks between decode steps
    max_lora_rank: int = 32  # largest rank of a LoRA adapter a client may send with its requests
    max_adapter_bytes: int | None = None  # bytes of LoRA weights one request may carry; None = max rank on every layer
    adapters: dict[str, str] = field(default_factory=dict)  # LoRA adapters to preload: name -> folder (--adapters)
    num_threads: int | None = None  # torch intra-op threads; None = torch's default
    identity_path: str | None = None  # private key file for a fixed peer id
    swarm_key: str | None = None  # private swarm: path of the swarm key file (only its holders get served)
    rebalance_period: float = 60.0  # seconds between checks whether moving would help the swarm (--num-blocks)
    balance_quality: float = 0.75  # move only if the swarm's throughput would grow by more than 1/this
    move_grace: float = 30.0  # seconds sessions on the old span may finish after a move before handoff
    ping_period: float = 30.0  # seconds between round-trip measurements to the next servers
    max_pinged: int = 8  # most next servers to ping
    throughput_cache: str | None = None  # JSON file caching measured speed; None = <stamen cache>/throughput.json
    test_step_delay: float = 0.0  # test only: extra seconds per inference step (simulates a slow server)
    test_drop_pushes: bool = False  # test only: every push to the next server fails (clients must relay)
