"""Failover benchmark: the stall a killed server costs, beside the normal per-token latency.

A local swarm of the default model with two replicas of each half (0:15 and 15:30) generates
greedily; at a chosen token the server currently used for one span is killed (SIGKILL, or SIGTERM
for a graceful exit). The stall is the gap between the token before the kill and the next token,
minus the median gap. The tokens are compared with a run without failure.

Run: ``.venv/bin/python benchmarks/failover.py [--new-tokens 48] [--kill-at 16] [--repeats 2]``
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time

import torch
from transformers import AutoTokenizer

from client import AutoDistributedModelForCausalLM
from swarm.models.modelpath import resolve_model
from swarm.tools.localswarm import LocalSwarm

SPANS = ["0:15", "15:30"]


class Clock:
    """Streamer that timestamps every token and runs ``on_token(index)`` first."""

    def __init__(self, on_token=None):
        self.on_token, self.times = on_token, []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())
        if self.on_token is not None:
            self.on_token(len(self.times) - 1)

    def end(self) -> None:
        pass


def run_once(swarm, model, inputs, new_tokens, kill_at, hop, sig):
    victim = {}
    with model.inference_session(max_length=inputs["input_ids"].shape[1] + new_tokens) as session:
        session.open(batch_size=1)

        def kill(index: int) -> None:
            if index == kill_at:
                server = swarm.by_peer(session.route[hop].peer_id)
                os.kill(server.proc.pid, sig)
                victim["server"], victim["time"] = server, time.perf_counter()

        clock = Clock(kill)
        output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, streamer=clock)
    gaps = [b - a for a, b in zip(clock.times[1:], clock.times[2:], strict=False)]  # decode steps only
    stall_gap = clock.times[kill_at + 1] - victim["time"]
    return output, statistics.median(gaps), stall_gap, victim["server"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--kill-at", type=int, default=16, help="kill after this many generated tokens")
    parser.add_argument("--repeats", type=int, default=2, help="kills per (span, signal) case")
    parser.add_argument(
        "--verify", type=float, default=None, help="the client's verify share (default: the client's default)"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)

    folder = resolve_model(None)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer("Volunteer computing lets many people share their machines to", return_tensors="pt")
    rows = []
    with LocalSwarm(timeout=300) as swarm:
        swarm.start(None, [(span, ()) for span in SPANS for _ in range(2)])
        options = {} if args.verify is None else {"verify": args.verify}
        model = AutoDistributedModelForCausalLM.from_pretrained(None, initial_peers=swarm.initial_peers, **options)
        verify = model.client.config.verify
        try:
            reference = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False)
            for hop, span in enumerate(SPANS):
                for sig in (signal.SIGKILL, signal.SIGTERM):
                    for _ in range(args.repeats):
                        output, median_gap, stall_gap, victim = run_once(
                            swarm, model, inputs, args.new_tokens, args.kill_at, hop, sig
                        )
                        rows.append((span, sig.name, median_gap, stall_gap, torch.equal(output, reference)))
                        victim.proc.wait(timeout=60)
                        swarm.servers.remove(victim)
                        victim.kill_group()
                        swarm.replace(victim)
        finally:
            model.shutdown()

    print(
        f"\nFailover on SmolLM2-135M-Instruct, 2 replicas of {' and '.join(SPANS)}, kill after token {args.kill_at}, "
        f"verify {verify:g}"
    )
    header = ("killed span", "signal", "per-token ms", "kill->next token ms", "stall ms", "same tokens")
    print(" ".join(f"{name:>{width}}" for name, width in zip(header, (11, 7, 13, 20, 9, 11), strict=True)))
    for span, sig, median_gap, stall_gap, same in rows:
        stall = stall_gap - median_gap
        print(
            f"{span:>11} {sig:>7} {median_gap * 1e3:13.1f} {stall_gap * 1e3:20.1f} {stall * 1e3:9.1f} {str(same):>11}"
        )
    return 0 if all(row[-1] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
