"""``python -m client --initial-peers MADDR "prompt"``: stream a completion from the swarm to the terminal."""

from __future__ import annotations

import os

# Before torch loads libgomp (it reads this once): after each parallel region, OpenMP worker threads
# spin for milliseconds, taking a core from the next process of a chain on the same machine. A short
# spin measured 5-7.5 -> 2-3.5 ms of overhead per hop on 2 cores and costs local compute ~1 ms/token.
os.environ.setdefault("GOMP_SPINCOUNT", "20000")

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

from transformers import AutoTokenizer, TextStreamer

from client.model import AutoDistributedModelForCausalLM
from client.private import add_private_arguments
from client.verdicts import DEFAULT_VERIFY
from swarm.models.modelpath import DEFAULT_MODEL, resolve_model
from swarm.net.dht import NAT_CHOICES, add_nat_arguments


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m client", description="Generate text with a model served by a swarm.")
    p.add_argument("prompt", help="text to complete")
    p.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of any swarm member")
    p.add_argument("--model", default=None, help=f"model name or local folder (default: {DEFAULT_MODEL})")
    p.add_argument("--dht-prefix", default=None, help="DHT key prefix (default: derived from the model name)")
    p.add_argument("--swarm-key", default=None, help="swarm key file of a private swarm")
    add_nat_arguments(p, listening=False)
    p.add_argument(
        "--compression",
        choices=["none", "float16", "int8"],
        default="none",
        help="activations on the wire (default none: exact; float16 and int8 round, for slow links)",
    )
    p.add_argument(
        "--points-key", default=None, help="your server's identity file: busy servers serve you by its points"
    )
    p.add_argument(
        "--verify",
        type=float,
        default=DEFAULT_VERIFY,
        help=f"share of steps checked on another server (1: every step before use; 0: none; default "
        f"{DEFAULT_VERIFY:.3g}: every 12th step checks the last 12 in the background)",
    )
    add_private_arguments(p)
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (with --sample)")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    if not 0 <= args.verify <= 1:
        p.error("--verify must be within [0, 1]")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    if args.chat and tokenizer.chat_template:
        messages = [{"role": "user", "content": args.prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = args.prompt
    inputs = tokenizer(text, return_tensors="pt")
    model = AutoDistributedModelForCausalLM.from_pretrained(
        args.model,
        initial_peers=args.initial_peers,
        dht_prefix=args.dht_prefix,
        swarm_key=args.swarm_key,
        nat_traversal=NAT_CHOICES[args.nat_traversal],
        points_key=args.points_key,
        compression=args.compression,
        verify=args.verify,
        local_blocks=args.local_blocks,
        local_last_blocks=args.local_last_blocks,
    )
    try:
        sampling = dict(do_sample=True, temperature=args.temperature) if args.sample else dict(do_sample=False)
        streamer = TextStreamer(tokenizer, skip_prompt=args.chat, skip_special_tokens=True)
        model.generate(**inputs, max_new_tokens=args.max_new_tokens, streamer=streamer, **sampling)
    finally:
        model.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
