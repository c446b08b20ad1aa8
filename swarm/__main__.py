"""``python -m swarm bootstrap | status | monitor | keygen``: run a DHT-only bootstrap node, show who
serves what (once, or as a live web page), make a swarm key.

Concurrency: the DHT node runs on its own loop thread (``swarm.net.dht``); bootstrap and status are
synchronous (the bootstrap's main thread only waits for SIGINT/SIGTERM); the monitor runs its web
server on an asyncio loop in the main thread (``swarm.tools.monitor``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import pathlib
import signal
import sys
import threading

from swarm.errors import StamenError
from swarm.models.modelpath import DEFAULT_MODEL
from swarm.net.dht import NAT_CHOICES, DHTConfig, SwarmDHT, add_nat_arguments, p2p_options
from swarm.net.membership import SwarmKeyError, generate_key, load_key
from swarm.spans import model_prefix
from swarm.tools.status import build_report, exit_code, format_report

logger = logging.getLogger("swarm")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m swarm", description="Swarm tools: bootstrap node, status, monitor.")
    commands = p.add_subparsers(dest="command", title="commands")

    b = commands.add_parser("bootstrap", help="run a DHT-only node that others join through")
    b.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1; 0.0.0.0 for all)")
    b.add_argument("--port", type=int, default=0, help="TCP port to listen on (default: 0, any free port)")
    b.add_argument("--announce-host", default=None, help="public IP to advertise, when behind NAT (needs --port)")
    b.add_argument("--identity", default=None, help="private key file for a fixed peer id (created if missing)")
    b.add_argument("--initial-peers", nargs="*", default=[], help="multiaddrs of other bootstrap nodes, if any")
    b.add_argument("--swarm-key", default=None, help="swarm key file: run a private swarm only its holders join")
    add_nat_arguments(b)
    b.add_argument("--log-level", default="INFO", help="logging level on stderr (default: INFO)")

    s = commands.add_parser("status", help="show the servers, block coverage and route of a swarm")
    s.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of any swarm members")
    s.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or local folder (default: {DEFAULT_MODEL})")
    s.add_argument("--dht-prefix", default=None, help="DHT key prefix (default: derived from the model name)")
    s.add_argument("--num-blocks", type=positive_int, help="blocks in the model (default: from its config)")
    s.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    s.add_argument("--swarm-key", default=None, help="swarm key file of a private swarm")
    add_nat_arguments(s, listening=False)
    s.add_argument("--log-level", default="WARNING", help="logging level on stderr (default: WARNING)")

    m = commands.add_parser("monitor", help="serve a live web page of the swarm: coverage, servers, route")
    m.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of any swarm members")
    m.add_argument("--model", nargs="+", default=[DEFAULT_MODEL], help="models to watch (names or local folders)")
    m.add_argument("--dht-prefix", nargs="+", help="DHT key prefix of each model (default: from its name)")
    m.add_argument("--num-blocks", nargs="+", type=positive_int, help="blocks of each model (default: its config)")
    m.add_argument("--host", default="127.0.0.1", help="interface to serve the page on (default: 127.0.0.1)")
    m.add_argument("--port", type=int, default=0, help="TCP port of the page (default: 0, any free port)")
    m.add_argument("--refresh", type=float, default=5.0, help="seconds between DHT look-ups (default: 5)")
    m.add_argument("--swarm-key", default=None, help="swarm key file of a private swarm")
    add_nat_arguments(m, listening=False)
    m.add_argument("--log-level", default="WARNING", help="logging level on stderr (default: WARNING)")

    k = commands.add_parser("keygen", help="make a new swarm key file for a private swarm")
    k.add_argument("path", help="file to create (it must not exist); give it to every member")
    k.add_argument("--log-level", default="WARNING", help="logging level on stderr (default: WARNING)")
    return p


def ensure_identity(path: str) -> str:
    """Create a private key file at ``path`` (and its folder) if it is missing; return the expanded path."""
    file = pathlib.Path(path).expanduser().absolute()
    if not file.exists():
        from hivemind.p2p import P2P

        file.parent.mkdir(parents=True, exist_ok=True)
        P2P.generate_identity(str(file))
        logger.info("Generated a new identity in %s", file)
    return str(file)


def join(config: DHTConfig) -> SwarmDHT | None:
    """Start a DHT node; None (after logging why) when it cannot start or reach the initial peers."""
    from hivemind.p2p import P2PDaemonError

    try:
        return SwarmDHT(config)
    except (P2PDaemonError, OSError, TimeoutError, RuntimeError, StamenError) as exc:  # no initial peer answered
        peers = " ".join(config.initial_peers) or "(none)"
        logger.error("Cannot start a DHT node on %s (initial peers: %s): %s", config.host, peers, exc)
        return None


def run_bootstrap(args: argparse.Namespace) -> int:
    """Start the DHT node, print its addresses, wait for SIGINT/SIGTERM, stop."""
    identity = ensure_identity(args.identity) if args.identity else None
    config = DHTConfig(
        initial_peers=list(args.initial_peers),
        host=args.host,
        port=args.port,
        client_mode=False,
        identity_path=identity,
        announce_host=args.announce_host,
        swarm_key=load_key(args.swarm_key) if args.swarm_key else None,
        nat_traversal=NAT_CHOICES[args.nat_traversal],
        auto_relay=args.auto_relay,
    )
    dht = join(config)
    if dht is None:
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        for addr in dht.maddrs:
            print(f"Listening on {addr}", flush=True)
        print("Bootstrap node ready", flush=True)
        logger.info("Bootstrap node %s is up; stop it with Ctrl+C or SIGTERM", dht.peer_id)
        while not stop.wait(timeout=1.0):
            pass
        logger.info("Shutting down the bootstrap node")
    finally:
        dht.shutdown()
    print("Bootstrap node stopped", flush=True)
    return 0


def model_depth(model: str) -> int:
    """Number of transformer blocks of ``model``, read from its config (may convert the default model once)."""
    from transformers import AutoConfig

    from swarm.models.modelpath import resolve_model

    folder = resolve_model(model)
    return int(AutoConfig.from_pretrained(folder).num_hidden_layers)


def join_as_client(args: argparse.Namespace):
    """A client DHT node joined through --initial-peers (with --swarm-key, --nat-traversal); None if it failed."""
    key = load_key(args.swarm_key) if args.swarm_key else None
    nat = NAT_CHOICES[args.nat_traversal]
    return join(DHTConfig(initial_peers=list(args.initial_peers), client_mode=True, swarm_key=key, nat_traversal=nat))


def run_status(args: argparse.Namespace) -> int:
    """Join as a client, fetch the records, print the report; 1 if some blocks have no server."""
    prefix = args.dht_prefix or model_prefix(args.model)
    if args.num_blocks is not None:
        num_blocks = args.num_blocks
    else:
        try:
            num_blocks = model_depth(args.model)
        except (OSError, ValueError) as exc:
            logger.error("Cannot read the depth of model %r (pass --num-blocks): %s", args.model, exc)
            return 2
    dht = join_as_client(args)
    if dht is None:
        return 2
    try:
        servers = dht.fetch_servers(prefix, num_blocks)
    finally:
        dht.shutdown()
    logger.info("Found %d servers under prefix %r", len(servers), prefix)
    report = build_report(servers, num_blocks)
    if args.json:
        print(json.dumps(report), flush=True)
    else:
        print(f"Swarm status for {prefix!r} ({num_blocks} blocks)", flush=True)
        print(format_report(report), flush=True)
    return exit_code(report)


def watched_models(args: argparse.Namespace) -> list:
    """The monitor's models: names, DHT prefixes and depths from --model, --dht-prefix, --num-blocks."""
    from swarm.tools.monitor.app import WatchedModel

    count = len(args.model)
    for option in ("dht_prefix", "num_blocks"):
        given = getattr(args, option)
        if given is not None and len(given) != count:
            raise ValueError(f"--{option.replace('_', '-')} needs one value per --model ({count})")
    return [
        WatchedModel(
            name=model,
            prefix=args.dht_prefix[i] if args.dht_prefix else model_prefix(model),
            num_blocks=args.num_blocks[i] if args.num_blocks else model_depth(model),
        )
        for i, model in enumerate(args.model)
    ]


def run_monitor(args: argparse.Namespace) -> int:
    """Join as a client and serve the monitor page until SIGINT/SIGTERM."""
    try:
        models = watched_models(args)
    except (OSError, ValueError) as exc:
        logger.error("Cannot watch %s: %s (pass --num-blocks for models not available here)", args.model, exc)
        return 2
    dht = join_as_client(args)
    if dht is None:
        return 2
    import uvloop

    from swarm.tools.monitor.app import Monitor, serve

    async def main() -> None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await serve(Monitor(dht, models, args.refresh), args.host, args.port, stop)

    try:
        uvloop.run(main())
    except OSError as exc:
        logger.error("Cannot serve the monitor on %s:%s: %s", args.host, args.port, exc)
        return 2
    finally:
        dht.shutdown()
    print("Monitor stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "bootstrap" and args.announce_host and not args.port:
        parser.error("--announce-host needs a fixed --port (the advertised address would say port 0)")
    if args.command == "bootstrap":
        nat = NAT_CHOICES[args.nat_traversal]
        try:
            p2p_options(DHTConfig(host=args.host, nat_traversal=nat, auto_relay=args.auto_relay))
        except ValueError as exc:
            parser.error(str(exc))
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    try:
        if args.command == "keygen":
            print(f"Wrote a new swarm key to {generate_key(args.path)}; share it only with members", flush=True)
            return 0
        if args.command == "bootstrap":
            return run_bootstrap(args)
        if args.command == "monitor":
            return run_monitor(args)
        return run_status(args)
    except SwarmKeyError as exc:
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
