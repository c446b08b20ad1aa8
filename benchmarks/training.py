"""Fine-tuning through a local swarm of 2 servers against the same training with local transformers.

Run from the repository root::

    GOMP_SPINCOUNT=20000 .venv/bin/python benchmarks/training.py             # deep prompt tuning and LoRA
    .venv/bin/python benchmarks/training.py --methods lora --steps 6 --json training.json

The default model's 30 blocks are split over two ``python -m server`` subprocesses on 127.0.0.1 (0:15,
15:30). The data set is ``benchmarks/data/stories.txt`` (short stories written for this repository),
cut into sequences of ``--tokens`` tokens and batches of ``--batch`` sequences.

For each method (``deep_ptune``: ``--pre-seq-len`` trainable prompt tokens and one prompt per block;
``lora``: rank ``--lora-rank`` adapters on q_proj and v_proj), the swarm model and local transformers start
from the same trainable weights (copied) and take the same Adam steps on the same batches, in turns (swarm
step, local step, ...), so both see the same background load. The local side is local transformers
(float32, sdpa) with the same prompts or LoRA added by hooks, on the same number of torch threads
(``--num-threads``) that each server uses. A step is forward, loss, backward and the optimizer step, timed
with ``perf_counter``; "CPU s" is the user + system CPU time the step used: the benchmark process (client
or local model) plus, for the swarm, the servers with their children. Both sides' losses are printed at
every step and agree (the swarm computes the same function); the batches take turns, so the mean loss of
each pass over the data (epoch) is what falls. The ratios are of the medians, the first step (warm-up)
left out.

The servers recompute activations for the backward pass (they keep nothing between requests), so a swarm step
costs one more forward pass of the blocks than a local step. Servers run with ``--chunk-token-blocks``
(default here: all of a span's blocks in one slice, since no inference traffic competes; the servers' own
default slices long work to keep decode steps of other users responsive, at the price of recomputing more).
Other processes on the machine distort every number: the load average is printed at start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import load_average, tree_cpu_seconds  # noqa: E402
from client import AutoDistributedModelForCausalLM  # noqa: E402
from swarm.models.modelpath import resolve_model  # noqa: E402
from swarm.tools.localswarm import LocalSwarm  # noqa: E402
from tests.swarm.references import deep_prompt_hooks, lora_hooks  # noqa: E402

DATA = Path(__file__).parent / "data" / "stories.txt"
SPANS = ("0:15", "15:30")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--methods", default="deep_ptune,lora", help="deep_ptune and/or lora, comma-separated")
    p.add_argument("--steps", type=int, default=6, help="training steps per method and side (default: 6)")
    p.add_argument("--batch", type=int, default=8, help="sequences per batch (default: 8)")
    p.add_argument("--tokens", type=int, default=128, help="tokens per sequence (default: 128)")
    p.add_argument("--num-threads", type=int, default=2, help="torch threads here and in each server (default: 2)")
    p.add_argument("--pre-seq-len", type=int, default=16, help="prompt tokens for deep_ptune (default: 16)")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (default: 8)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: 0.01 prompts, 0.002 LoRA)")
    p.add_argument("--chunk-token-blocks", type=int, default=1 << 20, help="servers' slice size, tokens x blocks")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds for the swarm to start serving")
    args = p.parse_args(argv)
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not set(args.method_list) <= {"deep_ptune", "lora"} or args.steps < 2:
        p.error("--methods takes deep_ptune and/or lora; --steps must be at least 2")
    return args


def batches(tokenizer, batch: int, tokens: int) -> list[torch.Tensor]:
    ids = tokenizer(DATA.read_text(), return_tensors="pt")["input_ids"][0]
    rows = ids[: len(ids) // tokens * tokens].view(-1, tokens)
    return [rows[start : start + batch] for start in range(0, len(rows) - batch + 1, batch)]


class Trainer:
    """The swarm model and local transformers with the same trainable weights, each with its own optimizer."""

    def __init__(self, method: str, swarm: LocalSwarm, local, args):
        self.method, self.local, self.args = method, local, args
        options = dict(tuning_mode="deep_ptune", pre_seq_len=args.pre_seq_len) if method == "deep_ptune" else {}
        self.remote = AutoDistributedModelForCausalLM.from_pretrained(
            None, initial_peers=swarm.initial_peers, **options
        )
        if method == "lora":
            lora = self.remote.add_lora(rank=args.lora_rank, alpha=2 * args.lora_rank)
            with torch.no_grad():  # b = 0 at first would give the same first step everywhere: start from a small b
                for block in lora.blocks:
                    for weight in block.b.values():
                        weight.normal_(0, 1e-3, generator=torch.Generator().manual_seed(0))
            self.adapter, params = lora.adapter(self.remote.model.layers.span)
        else:
            tuning = self.remote.model.prompt_tuning
            with torch.no_grad():
                tuning.deep.normal_(0, 1e-3, generator=torch.Generator().manual_seed(0))
            params = [tuning.prefix, tuning.deep]
        self.params = params
        self.local_params = [p.detach().clone().requires_grad_() for p in params]
        lr = args.lr or (0.01 if method == "deep_ptune" else 0.002)
        self.remote_opt = torch.optim.Adam(self.params, lr=lr)
        self.local_opt = torch.optim.Adam(self.local_params, lr=lr)

    def remote_step(self, ids: torch.Tensor) -> float:
        self.remote_opt.zero_grad()
        loss = self.remote(ids, labels=ids).loss
        loss.backward()
        self.remote_opt.step()
        return loss.item()

    def local_step(self, ids: torch.Tensor) -> float:
        self.local_opt.zero_grad()
        if self.method == "lora":
            pairs = self.local_params
            weights = {key: (pairs[2 * i], pairs[2 * i + 1]) for i, key in enumerate(self.adapter.weights)}
            with lora_hooks(self.local, weights, self.adapter.scaling):
                loss = self.local(ids, labels=ids).loss
        else:
            prefix, deep = self.local_params
            embeds = self.local.model.embed_tokens(ids)
            inputs = torch.cat([prefix.unsqueeze(0).expand(ids.shape[0], -1, -1), embeds], dim=1)
            with deep_prompt_hooks(self.local, deep):
                logits = self.local(inputs_embeds=inputs).logits[:, prefix.shape[0] :].contiguous()
            loss = self.local.loss_function(logits=logits, labels=ids, vocab_size=self.local.config.vocab_size)
        loss.backward()
        self.local_opt.step()
        return loss.item()


def timed(step, ids: torch.Tensor, exclude: list[int]) -> tuple[float, float, float]:
    """(loss, wall seconds, CPU seconds of this process and its children, but not ``exclude`` and theirs)."""
    cpu = tree_cpu_seconds([os.getpid()], exclude)
    started = time.perf_counter()
    loss = step(ids)
    return loss, time.perf_counter() - started, tree_cpu_seconds([os.getpid()], exclude) - cpu


def train(method: str, swarm: LocalSwarm, local, data: list[torch.Tensor], args) -> dict:
    trainer = Trainer(method, swarm, local, args)
    servers = [server.proc.pid for server in swarm.servers]
    rows = []
    try:
        print(f"\n{method}: step | swarm loss  local loss | swarm s  local s  ratio | swarm CPU s  local CPU s")
        for step in range(args.steps):
            ids = data[step % len(data)]
            remote_loss, remote_s, remote_cpu = timed(trainer.remote_step, ids, [])  # the servers are our children
            local_loss, local_s, local_cpu = timed(trainer.local_step, ids, servers)
            rows.append(dict(step=step, swarm_loss=remote_loss, local_loss=local_loss, swarm_s=remote_s,
                             local_s=local_s, swarm_cpu_s=remote_cpu, local_cpu_s=local_cpu))  # fmt: skip
            print(f"  {step:4d} | {remote_loss:10.4f} {local_loss:10.4f} | {remote_s:7.2f} {local_s:7.2f} "
                  f"{remote_s / local_s:5.2f}x | {remote_cpu:11.1f} {local_cpu:11.1f}", flush=True)  # fmt: skip
    finally:
        trainer.remote.shutdown()
    median = {key: statistics.median(row[key] for row in rows[1:]) for key in rows[0] if key.endswith("_s")}
    epochs = [rows[start : start + len(data)] for start in range(0, len(rows) - len(data) + 1, len(data))]
    return dict(
        method=method,
        steps=rows,
        swarm_median_s=median["swarm_s"],
        local_median_s=median["local_s"],
        ratio=median["swarm_s"] / median["local_s"],
        cpu_ratio=median["swarm_cpu_s"] / median["local_cpu_s"],
        epoch_losses=[statistics.mean(row["swarm_loss"] for row in epoch) for epoch in epochs],
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    folder = resolve_model(None)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    data = batches(tokenizer, args.batch, args.tokens)
    local = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().requires_grad_(False)
    print(f"load average at start: {load_average()}; {len(data)} batches of {args.batch} x {args.tokens} tokens; "
          f"{args.num_threads} torch threads here and in each server; servers {SPANS}", flush=True)  # fmt: skip
    server_args = ("--num-threads", str(args.num_threads), "--chunk-token-blocks", str(args.chunk_token_blocks))
    results = []
    with LocalSwarm(timeout=args.start_timeout) as swarm:
        swarm.start(None, [(span, server_args) for span in SPANS])
        for method in args.method_list:
            results.append(train(method, swarm, local, data, args))
    print("\nmethod      | swarm step | local step | swarm / local | CPU swarm / local  (medians, first step left out)")
    for result in results:
        print(f"{result['method']:11s} | {result['swarm_median_s']:8.2f} s | {result['local_median_s']:8.2f} s | "
              f"{result['ratio']:12.2f}x | {result['cpu_ratio']:16.2f}x")  # fmt: skip
    print("target: a swarm step at most 1.3x the local step")
    for result in results:
        gap = max(abs(row["swarm_loss"] - row["local_loss"]) for row in result["steps"])
        epochs = ", ".join(f"{loss:.4f}" for loss in result["epoch_losses"])
        print(f"{result['method']}: mean swarm loss per epoch {epochs}; largest swarm/local loss gap {gap:.1e}")
    print(f"load average at end: {load_average()}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), results=results), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
