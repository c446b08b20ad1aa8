"""``python -m server --blocks 10:20``: host a span of blocks of a model in a swarm."""

from __future__ import annotations

import os

# Before torch loads libgomp (it reads this once): after each parallel region, OpenMP worker threads
# spin for milliseconds, taking a core from the next process of a chain on the same machine. A short
# spin measured 5-7.5 -> 2-3.5 ms of overhead per hop on 2 cores and costs local compute ~1 ms/token.
os.environ.setdefault("GOMP_SPINCOUNT", "20000")


import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

import server.lean  # noqa: E402, F401  (before the rest: hivemind without its __init__)
from server.config import ServerConfig  # noqa: E402
from server.server import Server  # noqa: E402
from swarm.errors import StamenError  # noqa: E402
from swarm.models.modelpath import DEFAULT_MODEL  # noqa: E402
from swarm.net.dht import NAT_CHOICES, DHTConfig, add_nat_arguments, p2p_options  # noqa: E402
from swarm.spans import parse_blocks  # noqa: E402


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    d = ServerConfig()  # defaults, for the help text
    p = argparse.ArgumentParser(prog="python -m server", description="Host a span of transformer blocks in a swarm.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--blocks", help="span of blocks to host, START:END (end exclusive), e.g. 10:20")
    where.add_argument(
        "--num-blocks", type=int, help="host N blocks where the swarm is weakest, and move as it changes"
    )
    p.add_argument("--model", default=None, help=f"model name or local Hugging Face folder (default: {DEFAULT_MODEL})")
    p.add_argument("--initial-peers", nargs="*", default=[], help="multiaddrs of swarm members; none = new swarm")
    p.add_argument("--host", default=d.host, help=f"interface to listen on (default: {d.host})")
    p.add_argument("--port", type=int, default=d.port, help="TCP port to listen on (default: 0, any free port)")
    p.add_argument("--announce-host", default=None, help="public IP to advertise, when behind NAT")
    add_nat_arguments(p)
    p.add_argument(
        "--announce-port",
        type=int,
        default=None,
        help="port to advertise with --announce-host when it differs from --port (port forwarding, a proxy)",
    )
    p.add_argument("--dtype", default=d.dtype, help="float32, bfloat16, float16 or auto (float32 on CPU)")
    p.add_argument("--dht-prefix", default=None, help="DHT key prefix (default: derived from the model name)")
    p.add_argument("--cache-tokens", type=int, default=d.cache_tokens, help="KV-cache budget in tokens (batch x len)")
    p.add_argument("--public-name", default="", help="name shown to others in `python -m swarm status`")
    p.add_argument("--max-request-tokens", type=int, default=d.max_request_tokens, help="max batch x tokens a request")
    p.add_argument(
        "--max-length-limit", type=int, default=d.max_length_limit, help="largest max_length a session may ask for"
    )
    p.add_argument(
        "--max-sessions-per-peer",
        type=int,
        default=d.max_sessions_per_peer,
        help=f"inference sessions one peer may hold open at once (default: {d.max_sessions_per_peer})",
    )
    p.add_argument(
        "--max-queued-steps",
        type=int,
        default=d.max_queued_steps,
        help=f"steps a client may send ahead of the answers on one stream (default: {d.max_queued_steps})",
    )
    p.add_argument(
        "--max-message-bytes",
        type=int,
        default=None,
        help="largest message accepted on a stream (default: room for the largest valid step)",
    )
    p.add_argument(
        "--session-idle-timeout",
        type=float,
        default=d.session_idle_timeout,
        help="seconds before an idle session is closed",
    )
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        default=d.max_batch_tokens,
        help=f"decode steps of many sessions run as one batch of up to this many rows x tokens "
        f"(default: {d.max_batch_tokens})",
    )
    p.add_argument(
        "--fair-share",
        choices=["on", "off"],
        default="on" if d.fair_share else "off",
        help="when several peers' work waits, share compute fairly between them, weighted by standing "
        "(off: urgency and points only, as before; default: on)",
    )
    p.add_argument(
        "--chunk-token-blocks",
        type=int,
        default=d.chunk_token_blocks,
        help="long prompts and forward passes run in slices of about this many tokens x blocks, so decode steps "
        f"of other sessions wait at most one slice (default: {d.chunk_token_blocks})",
    )
    p.add_argument(
        "--adapters",
        nargs="*",
        default=[],
        metavar="NAME=PATH",
        help="LoRA adapter folders to preload (see README, 'Fine-tuning through the swarm'); clients pick them by name",
    )
    p.add_argument(
        "--max-lora-rank", type=int, default=d.max_lora_rank, help="largest rank of a LoRA adapter a client may send"
    )
    p.add_argument("--num-threads", type=int, default=None, help="torch threads for compute (default: torch's)")
    p.add_argument("--identity", default=None, help="private key file for a fixed peer id")
    p.add_argument(
        "--announce-period",
        type=float,
        default=d.announce_period,
        help=f"seconds between refreshes of this server's DHT record (default: {d.announce_period})",
    )
    p.add_argument("--swarm-key", default=None, help="swarm key file: serve and join only this private swarm")
    p.add_argument("--rebalance-period", type=float, default=d.rebalance_period, help="seconds between balance checks")
    p.add_argument(
        "--balance-quality",
        type=float,
        default=d.balance_quality,
        help="move only if the swarm's throughput would grow by more than 1/this (default 0.75)",
    )
    p.add_argument("--throughput-cache", default=None, help="file caching the measured speed")
    p.add_argument("--test-step-delay", type=float, default=0.0, help="testing only: extra seconds per inference step")
    p.add_argument("--test-drop-pushes", action="store_true", help="testing only: fail every push to the next server")
    p.add_argument("--log-level", default="INFO", help="DEBUG shows one line per RPC")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        blocks = parse_blocks(args.blocks) if args.blocks else None
    except ValueError as exc:
        p.error(str(exc))
    if args.num_blocks is not None and args.num_blocks < 1:
        p.error("--num-blocks must be at least 1")
    limits = (
        "cache_tokens",
        "max_request_tokens",
        "max_length_limit",
        "max_sessions_per_peer",
        "max_queued_steps",
        "max_batch_tokens",
        "chunk_token_blocks",
        "max_lora_rank",
    )
    for limit in limits:
        if getattr(args, limit) < 1:
            p.error(f"--{limit.replace('_', '-')} must be at least 1")
    if not 0 < args.announce_period < ServerConfig.record_ttl:
        p.error(f"--announce-period must be above 0 and below the record lifetime ({ServerConfig.record_ttl:.0f} s)")
    adapters = {}
    for item in args.adapters:
        name, _, path = item.partition("=")
        if not name or not path or name in adapters:
            p.error(f"--adapters takes distinct NAME=PATH items, got {item!r}")
        adapters[name] = path
    if args.max_message_bytes is not None and args.max_message_bytes < 1:
        p.error("--max-message-bytes must be at least 1")
    if args.announce_host and not (args.port or args.announce_port):
        p.error("--announce-host needs a fixed --port or an --announce-port (the port others reach it through)")
    if args.announce_port is not None and not (args.announce_host and 0 < args.announce_port < 65536):
        p.error("--announce-port needs --announce-host and a port in 1..65535")
    nat = NAT_CHOICES[args.nat_traversal]
    try:
        p2p_options(DHTConfig(host=args.host, nat_traversal=nat, auto_relay=args.auto_relay))
    except ValueError as exc:
        p.error(str(exc))
    return ServerConfig(
        blocks=blocks,
        num_blocks=args.num_blocks,
        model=args.model,
        initial_peers=args.initial_peers,
        host=args.host,
        port=args.port,
        announce_host=args.announce_host,
        nat_traversal=nat,
        auto_relay=args.auto_relay,
        announce_port=args.announce_port,
        dtype=args.dtype,
        dht_prefix=args.dht_prefix,
        cache_tokens=args.cache_tokens,
        public_name=args.public_name,
        max_request_tokens=args.max_request_tokens,
        max_length_limit=args.max_length_limit,
        max_sessions_per_peer=args.max_sessions_per_peer,
        max_queued_steps=args.max_queued_steps,
        max_message_bytes=args.max_message_bytes,
        session_idle_timeout=args.session_idle_timeout,
        max_batch_tokens=args.max_batch_tokens,
        chunk_token_blocks=args.chunk_token_blocks,
        fair_share=args.fair_share == "on",
        num_threads=args.num_threads,
        adapters=adapters,
        max_lora_rank=args.max_lora_rank,
        identity_path=args.identity,
        announce_period=args.announce_period,
        swarm_key=args.swarm_key,
        rebalance_period=args.rebalance_period,
        balance_quality=args.balance_quality,
        throughput_cache=args.throughput_cache,
        test_step_delay=args.test_step_delay,
        test_drop_pushes=args.test_drop_pushes,
    )


def announce_listening(server: Server) -> None:
    """Its addresses as soon as its DHT node listens: others may join through it while it loads."""
    for addr in server.maddrs:
        print(f"Listening on {addr}", flush=True)
    print(f"Joining as {server.peer_id}", flush=True)


def announce_ready(server: Server) -> None:
    announce_span(server)
    server.on_move = announce_span


def announce_span(server: Server) -> None:
    print(
        f"Serving blocks {server.span} of {server.model_name} as {server.peer_id} "
        f"(dht prefix {server.prefix}, {server.speed.inference:.0f} block-steps/s)",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        Server(config).run(announce_ready, on_listening=announce_listening)
    except (ValueError, StamenError) as exc:  # bad arguments, or the swarm would not let us in
        logging.getLogger("server").error("%s", exc)
        return 2
    print("Server stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
