"""Fuzz: ten thousand or more hostile messages, drawn by Hypothesis, against a live local server.

Run from the repository root::

    nice -n 10 .venv/bin/python benchmarks/fuzz.py                 # at least 10,000 messages
    .venv/bin/python benchmarks/fuzz.py --messages 2000 --seed 7   # a shorter run from another seed

One ``python -m server`` on 127.0.0.1 serves all 6 blocks of a tiny random Llama (hidden size 64, made here
as the tests make it) with the limits of the fuzz test (``tests.swarm.fuzzcases.server_args``). A client opens
a legitimate session and keeps it open; two hostile peers then play the acts of the fuzz test
(``tests/swarm/fuzzcases.py``: inference streams of drawn messages, raw frames, pushes into others' sessions,
forward/backward passes, forged receipts, unary garbage, floods of sessions) in chunks of ``--chunk`` acts,
each chunk drawn from its own seed (``--seed`` + its index), until ``--messages`` messages are sent. After
about every 1,000 messages: messages, acts, seconds, and the server's memory (PSS of the server with its DHT
process and libp2p daemon). The first ``--warmup`` acts (allocator pools, lazy imports) come before the
reference memory reading.

At the end, the checks (exit status 1 if one fails): the server is alive; it answered only typed errors
(no INTERNAL, no handler that raised, no traceback or error in its log); its memory grew by less than
``--max-growth-mib``; the legitimate session, continued, and a fresh one both give local transformers' greedy
tokens; once the client closed its session, the server holds no session, mailbox or queued work (its
structure sizes, logged on SIGUSR1). Then the server's answers, counted by act and error code.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import BUSY_KEYS, MIB, idle_sizes, load_average, start_time_limit, tree_memory  # noqa: E402
from client import AutoDistributedModelForCausalLM  # noqa: E402
from swarm.tools.localswarm import LocalSwarm, ServerProcess  # noqa: E402
from tests.conftest import make_tiny_model  # noqa: E402
from tests.swarm.fuzzcases import play_acts, server_args  # noqa: E402
from tests.swarm.hostile import Fuzzer, HostilePeer, suspicious  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--messages", type=int, default=10_000, help="messages to send at least (default: 10,000)")
    p.add_argument("--chunk", type=int, default=300, help="acts drawn from one seed (about 1,000 messages)")
    p.add_argument("--warmup", type=int, default=100, help="acts before the reference memory reading")
    p.add_argument("--seed", type=int, default=20261203)
    p.add_argument("--max-growth-mib", type=float, default=64.0, help="allowed growth of the server's PSS")
    p.add_argument("--time-limit", type=int, default=3600, help="seconds for the whole run (default: 1 h)")
    args = p.parse_args(argv)
    if min(args.messages, args.chunk) < 1 or args.warmup < 0:
        p.error("--messages and --chunk must be at least 1, --warmup at least 0")
    return args


def pss_mib(server: ServerProcess) -> float:
    return tree_memory(server.proc.pid).total_pss / MIB


def fuzz(args: argparse.Namespace, server: ServerProcess, model, prompt: torch.Tensor) -> dict:
    """The fuzzing, while a legitimate session stays open; what the checks need."""
    loop = model.client.loop
    peers = [loop.run(HostilePeer.start(server.maddrs)) for _ in range(2)]
    try:
        with model.inference_session(max_length=32) as session:
            model.generate(prompt[:, :4], max_new_tokens=1, do_sample=False)
            victims = [hop.session_id for hop in session.hops]
            fuzzer = Fuzzer(server.peer_id, peers)
            play_acts(fuzzer, loop.run, victims, args.warmup, args.seed - 1)
            before, started, chunk, shown = pss_mib(server), time.monotonic(), 0, 0
            print(f"after {fuzzer.acts} warm-up acts: server PSS {before:.1f} MiB", flush=True)
            sent = fuzzer.messages
            while fuzzer.messages - sent < args.messages and server.proc.poll() is None:
                play_acts(fuzzer, loop.run, victims, args.chunk, args.seed + chunk)
                chunk += 1
                if (fuzzer.messages - sent) // 1000 > shown or fuzzer.messages - sent >= args.messages:
                    shown = (fuzzer.messages - sent) // 1000
                    elapsed = time.monotonic() - started
                    print(
                        f"  {fuzzer.messages - sent:6d} messages, {fuzzer.acts:5d} acts, {elapsed:6.0f} s, "
                        f"server PSS {pss_mib(server):.1f} MiB, INTERNAL so far {len(fuzzer.internal)}",
                        flush=True,
                    )
            elapsed, after = time.monotonic() - started, pss_mib(server)
            continued = (
                model.generate(prompt, max_new_tokens=10, do_sample=False) if server.proc.poll() is None else None
            )
    finally:
        for peer in peers:
            loop.run(peer.shutdown())
    fresh = model.generate(prompt, max_new_tokens=10, do_sample=False) if server.proc.poll() is None else None
    return {"fuzzer": fuzzer, "sent": fuzzer.messages - sent, "elapsed": elapsed, "before": before, "after": after,
            "continued": continued, "fresh": fresh}  # fmt: skip


def checks(args: argparse.Namespace, run: dict, server: ServerProcess, expected: torch.Tensor) -> dict[str, bool]:
    sizes = idle_sizes([server])[0] if server.proc.poll() is None else {}
    print(f"server structure sizes at the end: {sizes}")
    exact = [run[name] is not None and run[name].tolist() == expected.tolist() for name in ("continued", "fresh")]
    return {
        "server alive": server.proc.poll() is None,
        "no INTERNAL error": not run["fuzzer"].internal,
        "no error or traceback in the server's log": not any(suspicious(line) for line in server.output),
        f"PSS grew by less than {args.max_growth_mib:g} MiB": run["after"] - run["before"] < args.max_growth_mib,
        "legitimate session continued exactly": exact[0],
        "fresh generation exact": exact[1],
        "no session left open": bool(sizes) and all(not sizes.get(key) for key in BUSY_KEYS),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start_time_limit(args.time_limit)
    print(f"load average at start: {load_average()}; at least {args.messages} messages, seed {args.seed}")
    with tempfile.TemporaryDirectory() as tmp, LocalSwarm() as swarm:
        folder = make_tiny_model(Path(tmp) / "tiny-llama", "llama")
        local = AutoModelForCausalLM.from_pretrained(folder).eval()
        prompt = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(11))
        expected = local.generate(prompt, max_new_tokens=10, do_sample=False)
        (server,) = swarm.start(folder, [("0:6", server_args(idle_timeout=args.time_limit))])
        model = AutoDistributedModelForCausalLM.from_pretrained(str(folder), initial_peers=swarm.initial_peers)
        try:
            run = fuzz(args, server, model, prompt)
            results = checks(args, run, server, expected)
        finally:
            model.shutdown()
    fuzzer = run["fuzzer"]
    print(f"\nload average at end: {load_average()}")
    print(f"{run['sent']} messages in {fuzzer.acts} acts (with the warm-up) in {run['elapsed']:.0f} s")
    print(f"server PSS {run['before']:.1f} MiB -> {run['after']:.1f} MiB ({run['after'] - run['before']:+.1f} MiB)")
    print("answers by act and error code:")
    for outcome, count in sorted(fuzzer.outcomes.items()):
        print(f"  {count:6d}  {outcome}")
    for line in fuzzer.internal[:10]:
        print(f"  INTERNAL: {line}")
    for name, passed in results.items():
        print(f"{'ok  ' if passed else 'FAIL'}  {name}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
