"""Many users at once through the HTTP API, against local transformers generating the same prompts as one batch.

Starts 2 servers of the default model (blocks 0:15 and 15:30) and ``python -m client.api`` on 127.0.0.1;
for 1, 4, 8 and 16 concurrent users (streaming chat completions at temperature 0, over aiohttp), measures
the aggregate tokens/s and each user's latency per token, then local transformers generating the same
prompt ids as one left-padded batch (same model, same torch threads, in the same run, in turns with the
API so both see the same background load). Prints a table with the ratios side by side. Performance is
measured here, never asserted. Targets: 8 users >= 0.9x the local batch of 8 in aggregate tokens/s (the API
steps requests in two lanes of declared rounds, so both servers compute at once); one user's per-token
latency within 1.10x of local.

    GOMP_SPINCOUNT=20000 .venv/bin/python benchmarks/concurrency.py [--users 1,4,8,16] [--new-tokens 64]
"""

from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "20000")  # before torch loads libgomp, as the servers and the API do

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import aiohttp  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import load_average, start_time_limit  # noqa: E402
from swarm.models.modelpath import resolve_model  # noqa: E402
from swarm.tools.localswarm import LocalSwarm  # noqa: E402

TOPICS = [
    "the history of the bicycle",
    "how bees make honey",
    "a lighthouse keeper's week",
    "the water cycle",
    "why the sky is blue",
    "a journey across the desert",
    "how bread is baked",
    "the life of a river",
    "the first day at a new school",
    "how volcanoes form",
    "a robot learning to paint",
    "the moon landing",
    "a city garden through the seasons",
    "how a violin is made",
    "the migration of birds",
    "a night market",
]


@dataclass
class Run:
    """One side's measurement for a number of users, in seconds and tokens."""

    tokens: list[int]  # generated tokens per user
    first: list[float]  # per user: seconds from the start to the first token
    per_token: list[float]  # per user: seconds per token after the first
    wall: float  # seconds from the first request to the last token
    texts: list[str]

    @property
    def tokens_per_second(self) -> float:
        return sum(self.tokens) / self.wall


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--users", default="1,4,8,16", help="concurrent users to try, comma-separated")
    p.add_argument("--new-tokens", type=int, default=64, help="max_tokens of each request (default: 64)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each side per user count; best kept (default 2)")
    p.add_argument("--num-threads", type=int, default=2, help="torch threads here, in each server and in the API")
    p.add_argument("--model", default=None, help="model name or folder (default: the default model)")
    p.add_argument("--verify", default=None, help="the API's --verify (default: its own default)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--time-limit", type=int, default=900, help="abort (and clean up) after this many seconds")
    args = p.parse_args(argv)
    args.user_counts = [int(part) for part in args.users.split(",") if part.strip()]
    if not args.user_counts or max(args.user_counts) > len(TOPICS) or min(args.user_counts) < 1:
        p.error(f"--users must be between 1 and {len(TOPICS)}")
    if args.new_tokens < 2 or args.repeats < 1:
        p.error("need --new-tokens >= 2 and --repeats >= 1")
    return args


def question(index: int) -> list[dict]:
    return [{"role": "user", "content": f"Write a long, detailed story about {TOPICS[index]}."}]


async def user(http: aiohttp.ClientSession, url: str, model: str, index: int, new_tokens: int, start: float):
    """One streaming chat completion; (tokens, seconds to the first token, seconds of the last one, text)."""
    body = {
        "model": model,
        "messages": question(index),
        "max_tokens": new_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    first, last, text, tokens = None, None, [], 0
    async with http.post(f"{url}/v1/chat/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"user {index}: HTTP {response.status}: {await response.text()}")
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("error"):
                raise RuntimeError(f"user {index}: the stream ended with an error: {chunk['error']}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter() - start
                first = last if first is None else first
                text.append(chunk["choices"][0]["delta"]["content"])
    return tokens, first, last, "".join(text)


async def api_run(url: str, model: str, users: int, new_tokens: int) -> Run:
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=64)) as http:
        start = time.perf_counter()
        results = await asyncio.gather(*(user(http, url, model, i, new_tokens, start) for i in range(users)))
    tokens = [r[0] for r in results]
    per_token = [(last - first) / max(n - 1, 1) for n, first, last, _ in results]
    return Run(tokens, [r[1] for r in results], per_token, max(r[2] for r in results), [r[3] for r in results])


class Clock(BaseStreamer):
    """Times of the tokens ``generate`` hands over (the first put is the prompt)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def local_run(local, tokenizer, prompts: list[list[int]], new_tokens: int) -> Run:
    """The prompts as one left-padded batch through local transformers, greedy."""
    width = max(len(ids) for ids in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # [users, width]
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # [users, width]
    clock = Clock()
    start = time.perf_counter()
    with torch.no_grad():
        output = local.generate(
            ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad, streamer=clock
        )
    new = output[:, width:]  # [users, new tokens]
    eos = set(
        local.generation_config.eos_token_id
        if isinstance(local.generation_config.eos_token_id, list)
        else [local.generation_config.eos_token_id]
    )
    tokens, texts = [], []
    for row in new.tolist():
        kept = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))  # up to and with eos
        tokens.append(kept)
        texts.append(tokenizer.decode(row[:kept], skip_special_tokens=True))
    steps = clock.times[1:]  # one per generated position
    first = steps[0] - start
    per_token = [(steps[n - 1] - steps[0]) / max(n - 1, 1) for n in tokens]
    return Run(tokens, [first] * len(prompts), per_token, steps[max(tokens) - 1] - start, texts)


def best(runs: list[Run]) -> Run:
    return max(runs, key=lambda run: run.tokens_per_second)


def measure(users: int, url: str, model: str, local, tokenizer, prompts, args) -> dict:
    """The API and the local batch in turns, ``repeats`` times each; the best run of each side."""
    api_runs, local_runs = [], []
    for _ in range(args.repeats):
        api_runs.append(asyncio.run(api_run(url, model, users, args.new_tokens)))
        local_runs.append(local_run(local, tokenizer, prompts[:users], args.new_tokens))
    api, mine = best(api_runs), best(local_runs)
    row = {
        "users": users,
        "api_tokens_per_s": api.tokens_per_second,
        "local_tokens_per_s": mine.tokens_per_second,
        "api_ms_per_token": 1000 * statistics.median(api.per_token),
        "local_ms_per_token": 1000 * statistics.median(mine.per_token),
        "api_first_token_ms": 1000 * statistics.median(api.first),
        "local_first_token_ms": 1000 * statistics.median(mine.first),
        "api_tokens": sum(api.tokens),
        "local_tokens": sum(mine.tokens),
        "texts_equal": sum(a == b for a, b in zip(api.texts, mine.texts, strict=True)),
    }
    print(
        f"   {users:>2} users: API {row['api_tokens_per_s']:.1f} tok/s, {row['api_ms_per_token']:.1f} ms/token; "
        f"local batch {row['local_tokens_per_s']:.1f} tok/s, {row['local_ms_per_token']:.1f} ms/token; texts "
        f"equal {row['texts_equal']}/{users}",
        flush=True,
    )
    return row


def table(rows: list[dict]) -> str:
    header = (
        f"{'users':>5} | {'aggregate tok/s API / local / x':>31} | {'per-token ms API / local / x':>28} | "
        f"{'first token ms API / local':>26} | {'tokens API / local':>18} | texts equal local"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        rate = f"{r['api_tokens_per_s']:.1f} / {r['local_tokens_per_s']:.1f} / "
        rate += f"{r['api_tokens_per_s'] / r['local_tokens_per_s']:.2f}x"
        latency = f"{r['api_ms_per_token']:.1f} / {r['local_ms_per_token']:.1f} / "
        latency += f"{r['api_ms_per_token'] / r['local_ms_per_token']:.2f}x"
        first = f"{r['api_first_token_ms']:.0f} / {r['local_first_token_ms']:.0f}"
        lines.append(
            f"{r['users']:>5} | {rate:>31} | {latency:>28} | {first:>26} | "
            f"{r['api_tokens']:>8} / {r['local_tokens']:<7} | {r['texts_equal']}/{r['users']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # leave through the swarm's cleanup
    start_time_limit(args.time_limit)
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.num_threads)
    started = time.monotonic()
    print(f"load average at start: {load_average()}; cpus: {os.cpu_count()}")
    folder = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    local = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    prompts = [
        tokenizer.apply_chat_template(question(i), tokenize=False, add_generation_prompt=True)
        for i in range(len(TOPICS))
    ]
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompts]
    threads = ("--num-threads", str(args.num_threads))
    rows = []
    try:
        with LocalSwarm(timeout=300) as swarm:
            swarm.start(args.model, [("0:15", threads), ("15:30", threads)])
            verify = ("--verify", args.verify) if args.verify is not None else ()
            api = swarm.start_api(
                args.model, *threads, *verify, "--max-concurrent-requests", str(max(args.user_counts))
            )
            model = json.loads(aiohttp_get(f"{api.url}/v1/models"))["data"][0]["id"]
            print(
                f"model {model}; {args.new_tokens} new tokens per user; {args.num_threads} torch threads; "
                f"swarm and API up after {time.monotonic() - started:.0f} s",
                flush=True,
            )
            asyncio.run(api_run(api.url, model, 1, 4))  # warm-up
            for users in args.user_counts:
                try:
                    rows.append(measure(users, api.url, model, local, tokenizer, prompts, args))
                except RuntimeError:
                    for process in (api, *swarm.servers):  # what went wrong, from the processes' own logs
                        lines = [line for line in process.output if "Waiting for servers" not in line][-15:]
                        print(f"-- last lines of {' '.join(process.args[2:5])}:", *lines, sep="\n  ")
                    raise
    except TimeoutError as exc:
        print(f"!! {exc}; reporting what was measured", flush=True)
    finally:
        signal.alarm(0)
    print(f"\nload average at end: {load_average()}; total {time.monotonic() - started:.0f} s\n")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"args": vars(args), "rows": rows}, file, indent=2)
    return 0 if len(rows) == len(args.user_counts) else 2


def aiohttp_get(url: str) -> str:
    async def get() -> str:
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            return await response.text()

    return asyncio.run(get())


if __name__ == "__main__":
    sys.exit(main())
