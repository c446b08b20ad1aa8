"""A flood with real processes: one peer's 6 concurrent streams do not starve another peer's single
stream at a busy server (fair share), every token stays exact, and the server shows its usage per peer."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from client import AutoDistributedModelForCausalLM
from swarm.tools.localswarm import LocalSwarm

pytestmark = pytest.mark.timeout(300)
FLOOD, TOKENS = 6, 12
# a server at capacity: 2 rows per decode batch, each slice 200 ms longer than its compute (the server sets the pace)
BUSY = ("--max-batch-tokens", "2", "--test-step-delay", "0.2", "--announce-period", "1")


class FirstToken(BaseStreamer):
    """Waits at ``barrier`` once its generation has its first new token (the first put is the prompt)."""

    def __init__(self, barrier: threading.Barrier):
        self.barrier, self.puts = barrier, 0

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.barrier.wait(timeout=120)

    def end(self) -> None:
        pass


def prompt(index: int) -> torch.Tensor:
    return torch.randint(3, 256, (1, 5 + index), generator=torch.Generator().manual_seed(300 + index))


def status(swarm: LocalSwarm, folder) -> dict:
    command = [sys.executable, "-m", "swarm", "status", "--initial-peers", *swarm.initial_peers]
    command += ["--model", str(folder), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    return json.loads(done.stdout)


def test_a_flooding_peer_does_not_starve_a_single_stream(tiny_models):
    folder = tiny_models["llama"]
    local = AutoModelForCausalLM.from_pretrained(folder).eval()
    with LocalSwarm() as swarm:
        swarm.start(folder, [("0:6", BUSY)])
        flooder = AutoDistributedModelForCausalLM.from_pretrained(str(folder), initial_peers=swarm.initial_peers)
        normal = AutoDistributedModelForCausalLM.from_pretrained(str(folder), initial_peers=swarm.initial_peers)
        try:
            barrier = threading.Barrier(FLOOD + 1)
            finished, outputs = {}, {}

            def generate(name: str, model, index: int) -> None:
                streamer = FirstToken(barrier) if name != "normal" else None
                if name == "normal":
                    barrier.wait(timeout=120)  # every flooding stream has its first token
                outputs[name] = model.generate(prompt(index), max_new_tokens=TOKENS, do_sample=False, streamer=streamer)
                finished[name] = time.monotonic()

            threads = [threading.Thread(target=generate, args=(f"flood{i}", flooder, i)) for i in range(FLOOD)]
            threads.append(threading.Thread(target=generate, args=("normal", normal, FLOOD)))
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=240)
            assert len(outputs) == FLOOD + 1, "a generation did not finish"
            for index, name in enumerate([*(f"flood{i}" for i in range(FLOOD)), "normal"]):
                expected = local.generate(prompt(index), max_new_tokens=TOKENS, do_sample=False)
                assert outputs[name].tolist() == expected.tolist(), name
            # the single stream got its share of each batch: it ended first although it started last
            assert finished["normal"] < min(finished[f"flood{i}"] for i in range(FLOOD))

            peers = {str(flooder.client.dht.peer_id): "flooder", str(normal.client.dht.peer_id): "normal"}
            deadline = time.monotonic() + 60
            while True:  # the server announces its usage per peer (every second here)
                (row,) = status(swarm, folder)["servers"]
                usage = {peers.get(u["peer_id"]): u["served"] for u in row["usage"]}
                if {"flooder", "normal"} <= set(usage) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert row["fair_share"] is True
            assert usage["flooder"] > usage["normal"] > 0
        finally:
            flooder.shutdown()
            normal.shutdown()
