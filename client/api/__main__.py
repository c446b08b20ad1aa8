"""``python -m client.api --initial-peers MADDR``: an OpenAI-compatible HTTP API and a chat page over a swarm."""

from __future__ import annotations

import os

# Before torch loads libgomp (see client/__main__.py): short OpenMP spinning leaves cores to the servers.
os.environ.setdefault("GOMP_SPINCOUNT", "20000")

import argparse  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

from client.api.app import APIServer  # noqa: E402
from client.api.config import APIConfig  # noqa: E402
from client.private import add_private_arguments  # noqa: E402
from swarm.errors import StamenError  # noqa: E402
from swarm.models.modelpath import DEFAULT_MODEL  # noqa: E402

LIMITS = {
    "max_concurrent_requests": "requests generating at once (each holds a session on every server of its chain)",
    "lanes": "groups of requests stepped in rounds of their own, so the servers of a chain work at once",
    "shared_round_requests": "the most requests a lane's round steps while several API keys share it (fair share)",
    "max_waiting_requests": "requests waiting for a free slot; beyond this the API answers 429",
    "max_prompt_tokens": "longest prompt in tokens (after the chat template)",
    "max_total_tokens": "prompt + max_tokens (also capped by the model's context length)",
    "default_max_tokens": "max_tokens of a request that gives none",
    "max_body_bytes": "largest request body",
}


def parse_args(argv: list[str] | None = None) -> tuple[APIConfig, str]:
    d = APIConfig()
    p = argparse.ArgumentParser(
        prog="python -m client.api", description="An OpenAI-compatible HTTP API and a chat page over a swarm."
    )
    p.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of any swarm member")
    p.add_argument("--model", default=None, help=f"model name or local folder (default: {DEFAULT_MODEL})")
    p.add_argument("--served-model-name", default=None, help="model id shown in /v1/models (default: its name)")
    p.add_argument("--swarm-key", default=None, help="swarm key file of a private swarm")
    p.add_argument("--dht-prefix", default=None, help="DHT key prefix (default: derived from the model name)")
    p.add_argument("--host", default=d.host, help=f"interface to listen on (default: {d.host})")
    p.add_argument("--port", type=int, default=d.port, help=f"TCP port (default: {d.port}; 0 picks a free one)")
    for name, text in LIMITS.items():
        p.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=getattr(d, name),
            help=f"{text} (default: {getattr(d, name)})",
        )
    p.add_argument(
        "--wait-for-blocks",
        type=float,
        default=d.wait_for_blocks,
        help=f"seconds to wait for servers of missing blocks before answering 503 (default: {d.wait_for_blocks})",
    )
    p.add_argument(
        "--verify",
        type=float,
        default=d.verify,
        help=f"share of steps checked on another server (1: every step before use; 0: none; default {d.verify:.3g})",
    )
    add_private_arguments(p)
    p.add_argument(
        "--api-keys",
        default=None,
        help="JSON file of API keys (key, name, limits); requests without a valid key get 401 (default: no keys)",
    )
    p.add_argument(
        "--fair-share",
        choices=["on", "off"],
        default="on",
        help="share rounds fairly between API keys while several generate (off: every request in every round)",
    )
    p.add_argument("--num-threads", type=int, default=None, help="torch threads for the local work")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    for name in LIMITS:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.port < 65536 or args.wait_for_blocks < 0:
        p.error("--port must be 0..65535 and --wait-for-blocks at least 0")
    if not 0 <= args.verify <= 1:
        p.error("--verify must be within [0, 1]")
    config = APIConfig(
        initial_peers=args.initial_peers,
        model=args.model,
        served_model_name=args.served_model_name,
        swarm_key=args.swarm_key,
        dht_prefix=args.dht_prefix,
        host=args.host,
        port=args.port,
        wait_for_blocks=args.wait_for_blocks,
        num_threads=args.num_threads,
        verify=args.verify,
        local_blocks=args.local_blocks,
        local_last_blocks=args.local_last_blocks,
        api_keys=args.api_keys,
        fair_share=args.fair_share == "on",
        **{name: getattr(args, name) for name in LIMITS},
    )
    return config, args.log_level


def main(argv: list[str] | None = None) -> int:
    config, log_level = parse_args(argv)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = APIServer(config)
    try:
        url = server.start()
        print(f"Serving the API on {url}", flush=True)
        print(f"Chat page: {url}/", flush=True)
        while not stop.wait(timeout=1.0):
            pass
    except (ValueError, OSError, StamenError) as exc:  # bad arguments, a busy port, or the swarm would not let us in
        logging.getLogger("client.api").error("%s", exc)
        return 2
    finally:
        server.shutdown()
    print("API stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
