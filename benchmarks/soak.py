"""Soak: many short sessions through a local swarm; each server's memory and long-lived structures over time.

Run from the repository root::

    nice -n 10 .venv/bin/python benchmarks/soak.py             # 10,000 sessions of the default model
    .venv/bin/python benchmarks/soak.py --quick                # 400 sessions, a checkpoint every 100

Three ``python -m server`` processes on 127.0.0.1: two split the model's blocks in halves and one holds them
all, so chains take one or two hops (pushing between servers) and verification finds shadows. Session kinds,
drawn at random with varied batch (1-3 rows), prompt length and new tokens: greedy generation by a client
(verify=0), greedy generation by a second client that checks every step on other servers (verify=1: shadow
chains), a stateless forward and backward pass (the gradient of the loss w.r.t. the input embeddings goes back
through the servers), and a completion through ``python -m client.api`` (its own client). Every
``--check-every``-th generation is compared with local transformers' greedy output (the reference): it must be
the same tokens.

Every ``--every`` sessions, once the servers are idle (no session open, nothing queued), the benchmark prints
each server's memory (proportional set size of the server and its children, its libp2p daemon included) and
the sizes of the server's own long-lived structures, which the server logs when sent SIGUSR1 (``Structure
sizes: {...}``). The memory of the first checkpoint is the reference the later ones are compared with.
A session that fails (an exception, or an HTTP error from the API) is counted and printed, and the run goes on.
Other processes on the machine slow the run down (not the memory): the load average is printed at start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    MIB,
    idle_sizes,
    load_average,
    start_time_limit,
    structure_sizes,
    tree_memory,
)
from client import AutoDistributedModelForCausalLM  # noqa: E402
from swarm.models.modelpath import resolve_model  # noqa: E402
from swarm.tools.localswarm import LocalSwarm  # noqa: E402

PREFIX = "soak-bench"
DATA = Path(__file__).parent / "data" / "stories.txt"
KINDS = {"generate": 0.45, "verified": 0.15, "backward": 0.2, "api": 0.2}  # session kind -> share of sessions
PROGRESS_EVERY = 100  # sessions between progress lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", default=None, help="model name or folder (default: the default model)")
    p.add_argument("--sessions", type=int, default=10_000, help="sessions in all (default: 10,000)")
    p.add_argument("--every", type=int, default=1000, help="sessions between memory checkpoints (default: 1000)")
    p.add_argument("--check-every", type=int, default=50, help="every Nth generation is compared with transformers")
    p.add_argument("--num-threads", type=int, default=1, help="torch threads here and in each server (default: 1)")
    p.add_argument("--quick", action="store_true", help="300 sessions, a checkpoint every 100 (CI)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds for servers to start serving")
    p.add_argument("--time-limit", type=int, default=4 * 3600, help="seconds for the whole run (default: 4 h)")
    args = p.parse_args(argv)
    if args.quick:
        args.sessions, args.every, args.check_every = 300, 100, 20
    if min(args.sessions, args.every, args.check_every) < 1:
        p.error("--sessions, --every and --check-every must be at least 1")
    return args


class Soak:
    """The swarm, its clients, the local reference, and the running counts of one soak run."""

    def __init__(self, swarm: LocalSwarm, folder: Path, args: argparse.Namespace):
        self.swarm, self.folder, self.args = swarm, folder, args
        self.rng = random.Random(args.seed)
        self.reference = AutoModelForCausalLM.from_pretrained(folder).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        self.text = tokenizer(DATA.read_text())["input_ids"]
        self.vocab = self.reference.config.vocab_size
        connect = AutoDistributedModelForCausalLM.from_pretrained
        self.plain = connect(str(folder), initial_peers=swarm.initial_peers, dht_prefix=PREFIX, verify=0.0)
        self.checked = connect(str(folder), initial_peers=swarm.initial_peers, dht_prefix=PREFIX, verify=1.0)
        self.api_url = swarm.start_api(folder, "--dht-prefix", PREFIX).url
        with urllib.request.urlopen(self.api_url + "/v1/models", timeout=60) as response:
            self.api_model = json.loads(response.read())["data"][0]["id"]
        self.counts = {kind: 0 for kind in KINDS}
        self.compared = self.mismatches = self.generations = 0
        self.failures: list[str] = []  # sessions that raised (e.g. the API's 503 when a route look-up timed out)

    def shutdown(self) -> None:
        self.plain.shutdown()
        self.checked.shutdown()

    def prompt(self, rows: int, length: int) -> torch.Tensor:
        """``rows`` pieces of the stories, ``length`` tokens each (real text: no near-ties of random tokens)."""
        starts = [self.rng.randrange(len(self.text) - length) for _ in range(rows)]
        return torch.tensor([[t % self.vocab for t in self.text[s : s + length]] for s in starts])

    def session(self) -> None:
        kind = self.rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        rows, length, new = self.rng.randint(1, 3), self.rng.randint(2, 24), self.rng.randint(1, 4)
        ids = self.prompt(rows, length)
        if kind in ("generate", "verified"):
            self.generate(self.plain if kind == "generate" else self.checked, ids, new)
        elif kind == "backward":
            embeds = self.plain.get_input_embeddings()(ids).detach().requires_grad_()
            self.plain(inputs_embeds=embeds, labels=ids).loss.backward()
            if embeds.grad is None or not torch.isfinite(embeds.grad).all():
                raise RuntimeError("the backward pass through the swarm gave no finite gradient")
        else:
            self.complete(ids[0].tolist(), new)
        self.counts[kind] += 1

    def generate(self, model, ids: torch.Tensor, new: int) -> None:
        output = model.generate(ids, max_new_tokens=new, do_sample=False)
        self.generations += 1
        if self.generations % self.args.check_every:
            return
        with torch.no_grad():
            expected = self.reference.generate(ids, max_new_tokens=new, do_sample=False)
        self.compared += 1
        self.mismatches += not torch.equal(output, expected)

    def complete(self, prompt: list[int], new: int) -> None:
        body = json.dumps({"model": self.api_model, "prompt": prompt, "max_tokens": new, "temperature": 0}).encode()
        request = urllib.request.Request(
            self.api_url + "/v1/completions", body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                if not json.loads(response.read())["choices"]:
                    raise RuntimeError("the API answered no choice")
        except urllib.error.HTTPError as exc:  # the API says why in its body
            raise RuntimeError(f"API answered {exc.code}: {exc.read()[:300]!r}") from None


def checkpoint(soak: Soak, done: int) -> dict:
    servers = soak.swarm.live()
    sizes = idle_sizes(servers)
    pss = [tree_memory(server.proc.pid).total_pss / MIB for server in servers]
    row = {"sessions": done, "pss_mib": pss, "sizes": sizes, "kinds": dict(soak.counts)}
    row |= {"compared": soak.compared, "mismatches": soak.mismatches, "failures": len(soak.failures)}
    print(f"  {json.dumps(row)}", flush=True)
    return row


def run(args: argparse.Namespace) -> dict:
    """Run a soak; the checkpoints (memory, sizes, counts) and the spans of the servers."""
    torch.set_num_threads(args.num_threads)
    folder = resolve_model(args.model)
    blocks = AutoModelForCausalLM.from_pretrained(folder).config.num_hidden_layers
    spans = [f"0:{blocks // 2}", f"{blocks // 2}:{blocks}", f"0:{blocks}"]
    extra = ("--dht-prefix", PREFIX, "--num-threads", str(args.num_threads))
    with LocalSwarm(timeout=args.start_timeout) as swarm:
        swarm.start(folder, [(span, extra) for span in spans])
        soak = Soak(swarm, folder, args)
        try:
            rows, started = [], time.monotonic()
            for done in range(1, args.sessions + 1):
                try:
                    soak.session()
                except Exception as exc:  # counted and shown: one failed request must not end a soak
                    soak.failures.append(f"session {done}: {exc!r}")
                    sizes = [structure_sizes(server) for server in swarm.live()]
                    print(f"  failed: {soak.failures[-1]}; servers' structure sizes now: {sizes}", flush=True)
                if done % PROGRESS_EVERY == 0:
                    print(f"  {done}/{args.sessions} sessions, {time.monotonic() - started:.0f} s", flush=True)
                if done % args.every == 0 or done == args.sessions:
                    rows.append(checkpoint(soak, done))
        finally:
            soak.shutdown()
    return {"spans": spans, "checkpoints": rows}


def table(report: dict) -> str:
    """Memory per server against the first checkpoint (the reference), and the largest structure."""
    rows, spans = report["checkpoints"], report["spans"]
    first = rows[0]["pss_mib"]
    head = " | ".join(f"server {span} PSS MiB (vs first)" for span in spans)
    lines = [f"| sessions | {head} | largest structure | generations exact | failed |", "|---" * (len(spans) + 4) + "|"]
    for row in rows:
        memory = " | ".join(f"{now:.1f} ({now / ref - 1:+.2%})" for now, ref in zip(row["pss_mib"], first, strict=True))
        name, size = max(((k, v) for sizes in row["sizes"] for k, v in sizes.items()), key=lambda item: item[1])
        exact = f"{row['compared'] - row['mismatches']}/{row['compared']}"
        lines.append(f"| {row['sessions']} | {memory} | {name} {size} | {exact} | {row['failures']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start_time_limit(args.time_limit)
    print(f"load average at start: {load_average()}; {args.sessions} sessions, a checkpoint every {args.every}")
    report = run(args)
    print(f"\nload average at end: {load_average()}\n")
    print(table(report))
    last = report["checkpoints"][-1]
    print(f"\nsession kinds: {last['kinds']}; structure sizes at the end: {last['sizes']}")
    return 1 if last["mismatches"] or last["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
