"""Fuzzing a live server with malformed and hostile messages drawn by Hypothesis (``tests.swarm.fuzzcases``).

A thousand acts with a fixed seed (random fields, wrong dtypes and shapes, huge declared shapes with tiny or
truncated buffers, unknown or inconsistent compressions, NaN/inf, wild positions, out-of-order steps, raw
bytes, frames that declare huge lengths, pushes into other peers' sessions, floods of sessions and steps,
unary garbage, forward and backward passes with random gradients, deep prompts, LoRA weights and adapter
names, beam reorders) from two hostile peers, while a legitimate session stays open. Afterwards: the server
is up, never answered INTERNAL, its memory did not grow beyond a bound, it holds no session, mailbox, queued
step or held push once the client closed its own, and both the old session and a new one give the local
model's tokens.
``benchmarks/fuzz.py`` runs the same acts for longer.
"""

from __future__ import annotations

import time

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import BUSY_KEYS, idle_sizes
from client import AutoDistributedModelForCausalLM
from swarm.tools.localswarm import LocalSwarm
from tests.swarm.fuzzcases import play_acts, server_args
from tests.swarm.hostile import Fuzzer, HostilePeer, rss_mb, suspicious

SEED = 20261122
CASES = 1000  # Hypothesis examples (acts of one to a dozen messages): about 60 s on 2 cores
WARMUP = 60  # acts played before the first memory reading (allocator pools, lazy imports)
# Everything a case can make the server hold is bounded: messages of ~100 KB (64 tokens of 64 floats),
# 4 sessions per peer of at most 2048 cached tokens (~3 MB of KV for the tiny model), streams closed
# after each case. 64 MB leaves room for allocator noise while catching any per-case leak (600 cases)
# or buffering of the ~2 MB that each giant-frame case sends.
MAX_RSS_GROWTH_MB = 64


def group_rss_mb(pid: int) -> float:
    """The server with its children (hivemind's DHT process and the p2p daemon)."""
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20


@pytest.fixture(scope="module")
def fuzzed_server(tiny_models):
    folder = tiny_models["llama"]
    with LocalSwarm() as swarm:
        (server,) = swarm.start(folder, [("0:6", server_args(idle_timeout=300))])
        model = AutoDistributedModelForCausalLM.from_pretrained(str(folder), initial_peers=swarm.initial_peers)
        try:
            yield server, model, AutoModelForCausalLM.from_pretrained(folder).eval()
        finally:
            model.shutdown()


@pytest.mark.timeout(300)
def test_fuzzed_server_stays_up_bounded_and_correct(fuzzed_server):
    server, model, local = fuzzed_server
    loop = model.client.loop
    prompt = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(11))
    expected = local.generate(prompt, max_new_tokens=10, do_sample=False)
    peers = [loop.run(HostilePeer.start(server.maddrs)) for _ in range(2)]
    try:
        with model.inference_session(max_length=32) as session:
            model.generate(prompt[:, :4], max_new_tokens=1, do_sample=False)  # a session open during the fuzzing
            victims = [hop.session_id for hop in session.hops]  # its ids on the server: pushes aim at them
            fuzzer = Fuzzer(server.peer_id, peers)
            play_acts(fuzzer, loop.run, victims, WARMUP, SEED - 1)
            before, group_before, started = rss_mb(server.proc.pid), group_rss_mb(server.proc.pid), time.monotonic()
            play_acts(fuzzer, loop.run, victims, CASES, SEED)
            elapsed, after, group_after = (
                time.monotonic() - started,
                rss_mb(server.proc.pid),
                group_rss_mb(server.proc.pid),
            )
            assert server.proc.poll() is None, "".join(server.output[-50:])
            assert session.position == 4
            continued = model.generate(prompt, max_new_tokens=10, do_sample=False)
            assert [hop.session_id for hop in session.hops] == victims  # the same server-side session, no replay
    finally:
        for peer in peers:
            loop.run(peer.shutdown())
    fresh = model.generate(prompt, max_new_tokens=10, do_sample=False)  # a new session after the fuzzing
    (sizes,) = idle_sizes([server])  # no session, mailbox, queued step or held push left (they go within seconds)

    print(f"\n{fuzzer.acts} acts ({fuzzer.messages} messages), {CASES} timed in {elapsed:.1f} s")
    print(f"server RSS {before:.0f} MB -> {after:.0f} MB")
    print(f"server with its DHT process and p2p daemon: {group_before:.0f} MB -> {group_after:.0f} MB")
    for outcome, count in sorted(fuzzer.outcomes.items()):
        print(f"  {count:5d}  {outcome}")
    assert not fuzzer.internal, fuzzer.internal[:5]
    assert sizes and not any(sizes.get(key) for key in BUSY_KEYS), sizes
    assert not [line for line in server.output if suspicious(line)], "".join(filter(suspicious, server.output))
    assert after - before < MAX_RSS_GROWTH_MB
    assert continued.tolist() == expected.tolist()
    assert fresh.tolist() == expected.tolist()
    assert server.proc.poll() is None
