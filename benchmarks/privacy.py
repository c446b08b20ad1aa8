"""What a curious server recovers of a user's prompt from the hidden states it receives, by depth in the model.

Run from the repository root (2 torch threads; on 2 CPU cores about 16 minutes the first time, 7-8 of them
sampling the corpus answers, which are then cached; about 9 minutes after that; --quick about 2 minutes)::

    .venv/bin/python benchmarks/privacy.py                       # depths 0,1,2,3,4,6,8,10,12,15,20,25,29,30
    .venv/bin/python benchmarks/privacy.py --quick               # depths 0,2,8,29 and a small corpus
    .venv/bin/python benchmarks/privacy.py --depths 0,4,12 --json privacy.json

How to read the depth: the first server of a chain receives the residual stream at the input of the first
block it serves. Today the client computes only the embeddings, so that server sees depth 0, the token
embeddings themselves. In the client's private mode ``ClientConfig.local_blocks=N`` the client also runs
blocks 0..N-1, and the first server sees depth N (``hidden_states[N]`` of transformers: the output of block
N-1). Depth 30 (all blocks local) sends nothing and is reported as n/a; 29 is the deepest a server can see.

Method. The default model (SmolLM2-135M-Instruct, float32, plain local transformers) turns texts into hidden
states at each depth. Held-out prompts: a seeded share (``--held-out``) of the lines of
``benchmarks/data/prompts.txt`` (user prompts written for this repository, with names, amounts and health
details), each line one sequence of raw text (no chat template). The attacker's training corpus never holds
a held-out line: the other prompt lines, ``benchmarks/data/stories.txt`` cut into paragraphs, answers that
the model itself samples to the training prompts (seeded; cached under ``<stamen cache>/privacy``, a few
minutes to make the first time) and sequences of uniformly random token ids (cheap, and they cover the
vocabulary). Per depth, the share of held-out prompt tokens recovered exactly (top-1) by:

1. nearest embedding: each position's hidden vector against the 49152 rows of the input embedding matrix,
   by cosine and by L2 distance; the better of the two is reported. No training: what anyone sees at a glance.
2. linear inversion: ridge regression from the hidden vectors of positions t-1, t, t+1 (``--context``; each
   vector scaled to unit RMS, features standardized) to the embedding of token t, decoded as the nearest
   embedding row by cosine over the full vocabulary.
3. MLP inversion (the "inversion" column, the strongest simple attack here): the ridge map plus a residual
   MLP (``--hidden`` units, GELU), trained with cross-entropy where the logits of a token are a learned scale
   times the cosine between the output and that token's embedding row. Training candidates are the distinct
   tokens of each batch (a sampled softmax); decoding is over the full vocabulary, so tokens never seen in
   training can still be recovered (the "unseen" columns count them). AdamW with a one-cycle schedule, fixed
   epochs; training loss and top-5 are printed.

Both learned attacks grow with the training corpus: these numbers are a lower bound on what an attacker with
more text and time recovers. Seeds: ``--seed`` drives the split, the sampled answers, the random sequences
and each depth's training (``torch.manual_seed(seed + depth)``), so a run is reproducible on one machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import load_average, start_time_limit  # noqa: E402
from swarm.models.modelpath import default_cache_dir, resolve_model  # noqa: E402

DATA = Path(__file__).parent / "data"
# settings that --quick changes; None in argparse means "take the default of the mode"
FULL = {"depths": "0,1,2,3,4,6,8,10,12,15,20,25,29,30", "answers": 1, "random_seqs": 200, "epochs": 6}
QUICK = {"depths": "0,2,8,29", "answers": 0, "random_seqs": 50, "epochs": 4}


def say(*parts) -> None:
    print(*parts, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="few depths and a small corpus (about 2 minutes)")
    p.add_argument("--depths", help=f"comma-separated (default: {FULL['depths']}; quick: {QUICK['depths']})")
    p.add_argument("--answers", type=int, help="sampled model answers per training prompt (default 1; quick 0)")
    p.add_argument("--answer-tokens", type=int, default=128, help="max new tokens per sampled answer")
    p.add_argument("--random-seqs", type=int, help="random token sequences in the corpus (default 200; quick 50)")
    p.add_argument("--random-len", type=int, default=64, help="tokens per random sequence")
    p.add_argument("--held-out", type=float, default=0.4, help="share of prompt lines held out for scoring")
    p.add_argument("--context", type=int, default=1, help="neighbours on each side the attacker reads (1: t-1..t+1)")
    p.add_argument("--hidden", type=int, default=1024, help="hidden units of the MLP inverter")
    p.add_argument("--epochs", type=int, help="MLP training epochs (default 6; quick 4)")
    p.add_argument("--batch", type=int, default=1024, help="MLP training batch, in tokens")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--ridge", type=float, default=1.0, help="ridge penalty per 1000 training tokens")
    p.add_argument("--max-len", type=int, default=128, help="longest sequence; longer texts are cut")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--time-limit", type=int, default=1800, help="abort after this many seconds")
    p.add_argument("--model", default=None, help="model folder or hub name (default: the default model)")
    p.add_argument("--json", help="write the settings and results to this file")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.depths = sorted({int(depth) for depth in str(args.depths).split(",")})
    return args


# ---------------------------------------------------------------- corpus


def split_prompts(seed: int, held_out: float) -> tuple[list[str], list[str]]:
    """(training lines, held-out lines) of prompts.txt: a seeded split by line."""
    lines = [line.strip() for line in (DATA / "prompts.txt").read_text().splitlines() if line.strip()]
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    cut = round(len(lines) * held_out)
    return [lines[i] for i in sorted(order[cut:])], [lines[i] for i in sorted(order[:cut])]


def stories() -> list[str]:
    return [part.strip() for part in (DATA / "stories.txt").read_text().split("\n\n") if part.strip()]


def token_sequences(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    """Each text's token ids (no special tokens added), cut into pieces of at most ``max_len``."""
    pieces = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        pieces += [ids[start : start + max_len] for start in range(0, len(ids), max_len)]
    return pieces


def sampled_answers(model, tokenizer, prompts: list[str], args: argparse.Namespace) -> list[str]:
    """``args.answers`` answers of the model to each training prompt (chat template, sampled), cached."""
    if args.answers <= 0:
        return []
    key = json.dumps([str(args.model_path), prompts, args.answers, args.answer_tokens, args.seed, 0.9, 0.95])
    cache = default_cache_dir() / "privacy" / f"answers-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if cache.is_file():
        say(f"sampled answers: read from {cache}")
        return json.loads(cache.read_text())
    tokenizer.padding_side = "left"  # generation continues every prompt from its last position
    answers, started = [], time.monotonic()
    for round_ in range(args.answers):
        for start in range(0, len(prompts), 64):
            chats = [[{"role": "user", "content": prompt}] for prompt in prompts[start : start + 64]]
            texts = [tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) for chat in chats]
            batch = tokenizer(texts, return_tensors="pt", padding=True)
            torch.manual_seed(args.seed * 1_000_000 + round_ * 1000 + start)
            with torch.no_grad():
                out = model.generate(
                    **batch, max_new_tokens=args.answer_tokens, do_sample=True, temperature=0.9, top_p=0.95
                )
            answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            say(f"sampled answers: {len(answers)} / {args.answers * len(prompts)} ({time.monotonic() - started:.0f} s)")
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(answers))
    return answers


def random_sequences(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, length), generator=generator).tolist()


# ---------------------------------------------------------------- hidden states


@dataclass
class States:
    """Hidden states of a set of sequences, positions of all sequences concatenated."""

    features: dict[int, torch.Tensor]  # depth -> [tokens, hidden] float32: the input of block `depth`
    tokens: torch.Tensor  # [tokens] the token id at each position
    lengths: torch.Tensor  # [sequences] positions per sequence, in order


def hidden_states(model, sequences: list[list[int]], depths: list[int], label: str, batch: int = 16) -> States:
    """Run ``model.model`` over ``sequences`` (right-padded batches of similar lengths) and keep ``depths``."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    features = {depth: [] for depth in depths}
    tokens, lengths, started = [], [], time.monotonic()
    for start in range(0, len(order), batch):
        group = [sequences[i] for i in order[start : start + batch]]
        width = max(len(seq) for seq in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)  # [batch, width]
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for row, seq in enumerate(group):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        with torch.no_grad():
            out = model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        keep = mask.bool()  # right padding: the causal positions before the padding are exact
        for depth in depths:
            features[depth].append(out.hidden_states[depth][keep])  # [real positions, hidden], row-major
        tokens.append(ids[keep])
        lengths += [len(seq) for seq in group]
        if (start // batch) % 20 == 19 or start + batch >= len(order):
            done = sum(lengths)
            say(f"hidden states ({label}): {done} tokens ({done / (time.monotonic() - started):.0f} tokens/s)")
    return States(
        {depth: torch.cat(parts) for depth, parts in features.items()}, torch.cat(tokens), torch.tensor(lengths)
    )


def attacker_view(states: States, depth: int, width: int) -> torch.Tensor:
    """[tokens, (2 * width + 1) * hidden]: each position's vector with its neighbours' in the same sequence
    (zeros past either end), every vector scaled to unit RMS first."""
    x = states.features[depth]
    x = x * (x.shape[1] ** 0.5) / x.norm(dim=1, keepdim=True).clamp_min(1e-6)
    sequence = torch.repeat_interleave(torch.arange(len(states.lengths)), states.lengths)  # [tokens]
    columns = []
    for offset in range(-width, width + 1):
        source = (torch.arange(len(x)) + offset).clamp(0, len(x) - 1)
        inside = (sequence[source] == sequence) & (source - torch.arange(len(x)) == offset)
        columns.append(x[source] * inside[:, None])
    return torch.cat(columns, dim=1)


# ---------------------------------------------------------------- attacks


def top_k_rows(queries: torch.Tensor, rows: torch.Tensor, k: int, metric: str = "cos") -> torch.Tensor:
    """[queries, k] indices of the ``rows`` nearest each query, by cosine or by L2 distance, in chunks."""
    if metric == "cos":
        queries, rows = F.normalize(queries, dim=1), F.normalize(rows, dim=1)
    found = []
    for start in range(0, len(queries), 256):
        chunk = queries[start : start + 256]
        scores = chunk @ rows.T if metric == "cos" else -torch.cdist(chunk, rows)
        found.append(scores.topk(k, dim=1).indices)
    return torch.cat(found)


def share(hits: torch.Tensor) -> float | None:
    """Percentage of true entries, one decimal; None when there are none to count."""
    return round(100.0 * hits.float().mean().item(), 1) if hits.numel() else None


def nearest_embedding(held: States, depth: int, embeddings: torch.Tensor) -> dict:
    scores = {
        metric: share(top_k_rows(held.features[depth], embeddings, 1, metric)[:, 0] == held.tokens)
        for metric in ("cos", "l2")
    }
    best = max(scores, key=scores.get)
    return {"nearest_pct": scores[best], "nearest_metric": best, "nearest_by_metric": scores}


class Inverter(torch.nn.Module):
    """Attacker's view -> a vector in embedding space: a linear map (ridge start) plus a residual MLP."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, hidden: int):
        super().__init__()
        self.linear = torch.nn.Linear(weight.shape[0], weight.shape[1])
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(weight.shape[0], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, weight.shape[1])
        )
        with torch.no_grad():
            self.linear.weight.copy_(weight.T)
            self.linear.bias.copy_(bias)
            self.mlp[2].weight.zero_()  # starts as the ridge map
            self.mlp[2].bias.zero_()
        self.scale = torch.nn.Parameter(torch.tensor(20.0))  # logits = scale * cosine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.mlp(x)


def fit_ridge(x: torch.Tensor, target: torch.Tensor, penalty: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [features, out], bias [out]) minimizing |x W + b - target|^2 + penalty * n / 1000 * |W|^2."""
    xb = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    gram = xb.T @ xb + penalty * len(x) / 1000 * torch.eye(xb.shape[1])
    solution = torch.linalg.solve(gram, xb.T @ target)
    return solution[:-1], solution[-1]


def train_inverter(model: Inverter, x: torch.Tensor, tokens: torch.Tensor, unit_rows: torch.Tensor, args) -> float:
    """Cross-entropy over the distinct tokens of each batch (the cosine logits); returns the last epoch's loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    steps = args.epochs * -(-len(x) // args.batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    losses, started = [], time.monotonic()
    for _ in range(args.epochs):
        order, total = torch.randperm(len(x)), 0.0
        for start in range(0, len(x), args.batch):
            batch = order[start : start + args.batch]
            candidates, target = torch.unique(tokens[batch], return_inverse=True)
            logits = model.scale * F.normalize(model(x[batch]), dim=1) @ unit_rows[candidates].T
            loss = F.cross_entropy(logits, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
        losses.append(total / len(x))
    say(f"  MLP losses by epoch: {' '.join(f'{loss:.3f}' for loss in losses)} ({time.monotonic() - started:.0f} s)")
    return losses[-1]


def attack_depth(train: States, held: States, depth: int, embeddings: torch.Tensor, args) -> dict:
    """The three attacks on the held-out prompts at one depth."""
    started = time.monotonic()
    result = {"depth": depth, **nearest_embedding(held, depth, embeddings)}
    x_train, x_held = attacker_view(train, depth, args.context), attacker_view(held, depth, args.context)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-3
    x_train, x_held = (x_train - mean) / std, (x_held - mean) / std
    unit_rows = F.normalize(embeddings, dim=1)
    weight, bias = fit_ridge(x_train, unit_rows[train.tokens] * embeddings.shape[1] ** 0.5, args.ridge)
    linear = top_k_rows(x_held @ weight + bias, embeddings, 1)[:, 0]
    result["linear_pct"] = share(linear == held.tokens)
    say(f"depth {depth}: nearest {result['nearest_pct']}% ({result['nearest_metric']}), linear {result['linear_pct']}%")
    torch.manual_seed(args.seed + depth)
    inverter = Inverter(weight, bias, args.hidden)
    result["mlp_train_loss"] = round(train_inverter(inverter, x_train, train.tokens, unit_rows, args), 4)
    with torch.no_grad():
        top5 = top_k_rows(inverter(x_held), embeddings, 5)
    unseen = ~torch.isin(held.tokens, train.tokens)
    result.update(
        inversion_pct=share(top5[:, 0] == held.tokens),
        inversion_top5_pct=share((top5 == held.tokens[:, None]).any(1)),
        unseen_tokens=int(unseen.sum()),
        inversion_unseen_pct=share(top5[unseen, 0] == held.tokens[unseen]),
        seconds=round(time.monotonic() - started, 1),
    )
    say(f"depth {depth}: inversion {result['inversion_pct']}% (top-5 {result['inversion_top5_pct']}%)")
    return result


# ---------------------------------------------------------------- report


def print_table(results: list[dict], train_tokens: int, held_tokens: int, blocks: int) -> None:
    say(f"\ntraining tokens {train_tokens}, held-out tokens {held_tokens}; exact = top-1 token id equal\n")
    say(
        "| depth | nearest-embedding exact % | linear inversion exact % | MLP inversion exact % | MLP top-5 % "
        "| unseen held-out tokens: n, MLP exact % |"
    )
    say("|---:|---:|---:|---:|---:|---:|")
    for row in results:
        if row.get("not_applicable"):
            say(f"| {row['depth']} | n/a | n/a | n/a | n/a | all {blocks} blocks local: no server sees a state |")
            continue
        say(
            f"| {row['depth']} | {row['nearest_pct']} ({row['nearest_metric']}) | {row['linear_pct']} "
            f"| {row['inversion_pct']} | {row['inversion_top5_pct']} "
            f"| {row['unseen_tokens']}, {row['inversion_unseen_pct']} |"
        )


def build_corpus(model, tokenizer, args) -> tuple[list[list[int]], list[list[int]], dict]:
    """(training sequences, held-out sequences, counts by source)."""
    train_prompts, held_prompts = split_prompts(args.seed, args.held_out)
    answers = sampled_answers(model, tokenizer, train_prompts, args)
    sources = {
        "prompts": token_sequences(tokenizer, train_prompts, args.max_len),
        "stories": token_sequences(tokenizer, stories(), args.max_len),
        "answers": token_sequences(tokenizer, [a for a in answers if a.strip()], args.max_len),
        "random": random_sequences(args.random_seqs, args.random_len, model.config.vocab_size, args.seed),
    }
    counts = {name: sum(len(seq) for seq in seqs) for name, seqs in sources.items()}
    counts["held_out_prompts"] = len(held_prompts)
    say(f"corpus: training tokens by source {counts}")
    return [seq for seqs in sources.values() for seq in seqs], token_sequences(tokenizer, held_prompts, 1 << 30), counts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    start_time_limit(args.time_limit)
    torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    say(f"load average at start: {load_average()}; cpus: {os.cpu_count()}; torch threads: {args.num_threads}")
    say(f"settings: {vars(args)}")
    args.model_path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32).eval()
    blocks = model.config.num_hidden_layers
    if any(not 0 <= depth <= blocks for depth in args.depths):
        raise SystemExit(f"depths must lie in 0..{blocks}")
    seen = [depth for depth in args.depths if depth < blocks]  # hidden_states[blocks] has the final norm
    train_seqs, held_seqs, counts = build_corpus(model, tokenizer, args)
    train = hidden_states(model, train_seqs, seen, "training")
    held = hidden_states(model, held_seqs, seen, "held out")
    embeddings = model.get_input_embeddings().weight.detach().float()
    results = []
    for depth in args.depths:
        if depth == blocks:
            results.append({"depth": depth, "not_applicable": True})
            continue
        results.append(attack_depth(train, held, depth, embeddings, args))
        say(f"  ({time.monotonic() - started:.0f} s so far)")
    print_table(results, len(train.tokens), len(held.tokens), blocks)
    weakest = [row["depth"] for row in results if row.get("inversion_pct", 100) <= 100 / 3]
    say(f"\nsmallest depth where MLP inversion recovers at most a third: {weakest[0] if weakest else 'none'}")
    say(f"load average at end: {load_average()}; total {time.monotonic() - started:.0f} s")
    if args.json:
        settings = {key: value for key, value in vars(args).items() if key != "model_path"}
        report = {"settings": settings, "model": str(args.model_path), "corpus_tokens": counts, "results": results}
        report["total_seconds"] = round(time.monotonic() - started, 1)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
