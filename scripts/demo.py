"""Demo: start a local swarm of 2 servers on the default model and stream an answer from it.

Run with ``.venv/bin/python scripts/demo.py [--servers N] [prompt]``; it stops its servers when done.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from swarm.models.modelpath import resolve_model
from swarm.tools.localswarm import LocalSwarm

NUM_BLOCKS = 30  # SmolLM2-135M-Instruct


def spans(count: int) -> list[str]:
    edges = [round(i * NUM_BLOCKS / count) for i in range(count + 1)]
    return [f"{a}:{b}" for a, b in zip(edges, edges[1:], strict=False)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("prompt", nargs="?", default="What is the capital of France? Answer in one sentence.")
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    print("Preparing the default model (converted once from GGUF, then cached)...", flush=True)
    resolve_model(None)
    with LocalSwarm(timeout=300) as swarm:
        for blocks in spans(args.servers):
            print(f"Starting a server for blocks {blocks}...", flush=True)
            (server,) = swarm.start(None, [(blocks, ())])
            print(f"  ready: {server.peer_id} at {server.maddrs[0]}", flush=True)
        print(f"\nPrompt: {args.prompt}\nAnswer: ", end="", flush=True)
        command = [sys.executable, "-m", "client", "--initial-peers", *swarm.initial_peers, "--chat"]
        command += ["--max-new-tokens", str(args.max_new_tokens), args.prompt]
        code = subprocess.call(command)
        print("\nStopping the swarm.", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
