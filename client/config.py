"""ClientConfig: how a client finds and uses the swarm."""

from __future__ import annotations

from dataclasses import dataclass, field

from client.verdicts import DEFAULT_VERIFY


@dataclass
class ClientConfig:
    initial_peers: list[str] = field(default_factory=list)  # multiaddrs of any swarm member
    swarm_key: str | None = None  # private swarm: path of the swarm key file
    dht_prefix: str | None = None  # DHT key prefix; None = derived from the model name
    wait_for_blocks: float = 30.0  # seconds to wait for a missing block to get a server before raising
    update_period: float = 5.0  # seconds a fetched view of the swarm stays fresh
    connect_timeout: float = 5.0  # seconds to open a stream to a server
    step_timeout: float = 10.0  # base seconds to wait for one step's answer from a server...
    step_timeout_per_token: float = 0.05  # ...plus this many seconds per token the step carries;
    slow_step_factor: float = 20.0  # once a server has answered decode steps: at most this x its usual time...
    min_step_timeout: float = 2.0  # ...but never less than this many seconds
    max_retries: int = 8  # failovers allowed per step before the error reaches the caller
    ban_base: float = 5.0  # seconds a failed server is avoided; doubles with each repeated failure
    ban_max: float = 300.0  # longest ban, in seconds
    ban_forgive_steps: int = 8  # successful calls to a server that forgive one of its past failures
    ban_forget_after: float = 600.0  # seconds without a failure after which a server's failures are forgotten
    max_message_bytes: int = 2 << 20  # larger steps are split (the libp2p daemon caps messages at 4 MiB)
    max_pass_bytes: int = (4 << 20) - (128 << 10)  # forward/backward requests and answers are split to fit this
    pass_concurrency: int = 1  # chunks of a forward/backward pass in flight at once (>1 pipelines across servers)
    push: bool = False  # servers send each step's output straight to the next server of the chain
    ping_period: float = 60.0  # seconds a measured round trip to a server stays fresh
    allowed_peers: list[str] | None = None  # if set, use only these servers
    blocked_peers: list[str] = field(default_factory=list)  # never use these servers
    nat_traversal: bool | None = None  # True: reach servers behind NAT through relays; None/False: no relays
    compression: str = "none"  # activations on the wire: none (exact), float16 or int8, with servers that support it
    receipt_period: float = 10.0  # seconds between handing servers signed receipts for their work (points)
    points_key: str | None = None  # a volunteer's server identity file: use that server's standing (points)
    verify: float = DEFAULT_VERIFY  # share of steps that end a check on another server (1: check every step
    # before using it; 0: never); see client.verify
    local_blocks: int = 0  # private mode: the client computes the model's first N blocks itself (client.private)
    local_last_blocks: int = 0  # ...and its last M blocks
    allow_unverified: bool = False  # verify=1: use a step no other server could check (with a WARNING) instead of
    # failing it with VerificationImpossible after waiting wait_for_blocks for a verifier

    def __post_init__(self) -> None:
        if not 0.0 <= self.verify <= 1.0:
            raise ValueError(f"verify must be within [0, 1], got {self.verify}")
        if self.local_blocks < 0 or self.local_last_blocks < 0:
            raise ValueError("local_blocks and local_last_blocks must not be negative")
