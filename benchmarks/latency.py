"""Latency of one greedy sequence through a local swarm of 1, 2 and 3 servers, against local transformers.

Run from the repository root::

    .venv/bin/python benchmarks/latency.py                  # 1, 2 and 3 servers; about 2.5 minutes when idle
    .venv/bin/python benchmarks/latency.py --servers 2 --repeats 5 --json latency.json
    .venv/bin/python benchmarks/latency.py --server-env OMP_WAIT_POLICY=PASSIVE   # env for the servers only
    .venv/bin/python benchmarks/latency.py --servers 2 --local-blocks 4   # private mode: 4 blocks on the client
    GOMP_SPINCOUNT=20000 .venv/bin/python benchmarks/latency.py   # env for every process: client, local, servers

For each configuration the model's blocks are split evenly over N ``python -m server`` subprocesses on
127.0.0.1 (30 blocks: 0:30 / 0:15,15:30 / 0:10,10:20,20:30) and a client connects to them.

Method (the same code times both sides): a greedy loop calls the model's ``forward`` once per token, with
the prompt at step 0 (prefill) and one token per later step, and times each call with ``perf_counter``
(forward + argmax). The swarm model gets ``RemoteCache(session)`` inside ``model.inference_session``, as
``generate`` does; the local transformers model (float32, sdpa) gets a ``DynamicCache``. Both keep only
the last position's logits. Each swarm run opens its session with ``session.open()`` before step 0
(refresh the client's view of the swarm from the DHT if it is stale, measure pings if needed, choose the
chain, open a stream per server), timed separately as "open", so the prefill is the forward
over the prompt only (``generate`` would open the session lazily inside its first step). A ``generate``
call on both sides is the warm-up and the exactness check: its tokens, and the timed loops' tokens, must
be equal. ``--push`` makes the client ask servers to send each step's output straight to the next server.

In each configuration the swarm and local transformers take turns (swarm, local, swarm, local, ...), so
both see the same background load; the table compares them ("local" = these interleaved runs, with the
configuration's servers up but idle). "local alone" is local transformers timed at the start, before any
server exists, and "idle srv CPU ms/tok" is the CPU the idle servers burned per token during the local runs:
together they show whether idle servers steal CPU. Overhead per hop = (swarm median per-token - local median
per-token) / number of servers. The benchmark process sets ``torch.set_num_threads`` to ``--num-threads``,
which it also passes to every server (``--client-threads`` changes only the client's own threads during
swarm runs, for experiments). "CPU ms/tok srv+cli/local" is user+system CPU per generated token:
of the servers (with their DHT child and p2pd) and of the benchmark process (the client, with its own DHT
child and p2pd, servers excluded) during the swarm runs, and of the benchmark process during the local runs.
Server memory is the RSS of the server's main process, and the RSS summed over it and its children (the
JSON also has the summed PSS, which counts pages shared after fork once).

Other processes on the machine distort every number here: the load average is printed at start and end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import sys
import time

import psutil
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    BenchmarkTimeout,
    even_spans,
    format_span,
    load_average,
    start_time_limit,
    tree_cpu_seconds,
    tree_memory,
)
from client import AutoDistributedModelForCausalLM  # noqa: E402
from client.model import RemoteCache  # noqa: E402
from swarm.models.modelpath import resolve_model  # noqa: E402
from swarm.tools.localswarm import LocalSwarm  # noqa: E402

PROMPT_TEXT = (
    "In a quiet village at the edge of a great forest, an old clockmaker kept a shop full of ticking "
    "machines. Every morning the children stopped by his window to watch the gears turn, and every "
    "evening he told them a story about the people who had brought him their broken clocks. "
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--servers", default="1,2,3", help="server counts to try, comma-separated (default: 1,2,3)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt length in tokens (default: 16)")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per configuration; median (default 3)")
    p.add_argument("--num-threads", type=int, default=2, help="torch threads here and in each server (default: 2)")
    p.add_argument("--client-threads", type=int, default=None, help="torch threads for the client's own work "
                   "(embeddings, head) during swarm runs (default: --num-threads)")  # fmt: skip
    p.add_argument("--model", default=None, help="model name or folder (default: the default model)")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE", help="env for servers only")
    p.add_argument("--push", action="store_true", help="servers push outputs to the next server (client option)")
    p.add_argument("--local-blocks", type=int, default=0, help="private mode: the client runs the first N blocks")
    p.add_argument("--local-last-blocks", type=int, default=0, help="private mode: ...and the last M blocks")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--start-timeout", type=float, default=120.0, help="seconds for a swarm to start serving")
    p.add_argument("--time-limit", type=int, default=290, help="abort (and clean up) after this many seconds")
    args = p.parse_args(argv)
    args.server_counts = [int(part) for part in args.servers.split(",") if part.strip()]
    if args.new_tokens < 2 or args.prompt_tokens < 1 or args.repeats < 1 or not args.server_counts:
        p.error("need --new-tokens >= 2, --prompt-tokens >= 1, --repeats >= 1 and at least one server count")
    try:
        args.server_env_dict = dict(item.split("=", 1) for item in args.server_env)
    except ValueError:
        p.error("--server-env takes KEY=VALUE")
    return args


@dataclasses.dataclass
class Timing:
    """Medians over the repeats of one side (swarm or local) in one configuration, in milliseconds."""

    prefill_ms: float  # step 0: the forward over the prompt (swarm: the session is already open)
    open_ms: float  # swarm: ``session.open()``, choosing the chain and opening its streams; 0 for local
    decode_median_ms: float  # median over the decode steps (steps 1..new_tokens-1)
    decode_mean_ms: float  # mean over the decode steps
    decode_p90_ms: float  # 90th percentile of the decode steps
    decode_max_ms: float  # slowest decode step
    server_cpu_ms_per_token: float  # CPU of the server processes (with children) per generated token; 0 for local
    client_cpu_ms_per_token: float  # CPU of the benchmark process (with its DHT/p2pd, without the servers)
    tokens: list[int]  # greedy tokens of the last repeat


def make_prompt(tokenizer, length: int) -> torch.Tensor:
    ids = tokenizer(PROMPT_TEXT, add_special_tokens=False)["input_ids"]
    while len(ids) < length:
        ids = ids + ids
    return torch.tensor([ids[:length]], dtype=torch.long)


def greedy_steps(model, prompt: torch.Tensor, new_tokens: int, cache) -> tuple[list[int], list[float]]:
    """Greedy decoding by hand; returns the tokens and the seconds of each step (step 0 = prefill)."""
    ids, tokens, seconds = prompt, [], []
    with torch.no_grad():
        for _ in range(new_tokens):
            started = time.perf_counter()
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            token = logits[:, -1, :].argmax(dim=-1)  # [batch]
            seconds.append(time.perf_counter() - started)
            tokens.append(int(token[0]))
            ids = token[:, None]  # [batch, 1]
    return tokens, seconds


def swarm_steps(model, prompt: torch.Tensor, new_tokens: int) -> tuple[list[int], list[float], float]:
    """``greedy_steps`` in a fresh inference session, opened first; also returns the seconds the opening took."""
    with model.inference_session(max_length=prompt.shape[1] + new_tokens) as session:
        started = time.perf_counter()
        session.open(batch_size=prompt.shape[0])  # choose the chain, open its streams
        open_seconds = time.perf_counter() - started
        tokens, seconds = greedy_steps(model, prompt, new_tokens, RemoteCache(session))
    return tokens, seconds, open_seconds


def one_run(run, server_pids: list[int]) -> tuple[dict[str, float], list[int]]:
    """Call ``run()`` (-> tokens, step seconds, open seconds) once; its statistics in seconds, and its tokens."""
    servers_before = tree_cpu_seconds(server_pids)
    client_before = tree_cpu_seconds([os.getpid()], exclude=server_pids)
    tokens, seconds, open_seconds = run()
    decode = seconds[1:]
    stats = {
        "prefill": seconds[0],
        "open": open_seconds,
        "median": statistics.median(decode),
        "mean": statistics.fmean(decode),
        "p90": statistics.quantiles(decode, n=10)[-1] if len(decode) > 1 else decode[0],
        "max": max(decode),
        "server_cpu": (tree_cpu_seconds(server_pids) - servers_before) / len(seconds),
        "client_cpu": (tree_cpu_seconds([os.getpid()], exclude=server_pids) - client_before) / len(seconds),
    }
    return stats, tokens


def summarize(samples: list[dict[str, float]], tokens: list[int]) -> Timing:
    """Median over the repeats of each statistic, in milliseconds."""
    return Timing(*[round(1000 * statistics.median(s[name] for s in samples), 2) for name in samples[0]], tokens)


def greedy_generate(model, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    output = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False)
    return output[0, prompt.shape[1] :].tolist()


def local_run(local, prompt: torch.Tensor, new_tokens: int):
    tokens, seconds = greedy_steps(local, prompt, new_tokens, DynamicCache(config=local.config))
    return tokens, seconds, 0.0


class Phases:
    """Wall-clock seconds of the phases of one configuration, printed on one line."""

    def __init__(self):
        self.last, self.seconds = time.monotonic(), {}

    def mark(self, name: str) -> None:
        now = time.monotonic()
        self.seconds[name] = round(now - self.last, 1)
        self.last = now

    def __str__(self) -> str:
        return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.seconds.items())


def interleaved(model, local, prompt: torch.Tensor, args, pids: list[int]) -> tuple[Timing, Timing]:
    """Alternate swarm and local runs, so that both see the same background load; (swarm, local)."""
    swarm_samples, local_samples = [], []
    swarm_tokens, local_tokens = [], []
    for _ in range(args.repeats):
        torch.set_num_threads(args.client_threads or args.num_threads)
        stats, swarm_tokens = one_run(lambda: swarm_steps(model, prompt, args.new_tokens), pids)
        swarm_samples.append(stats)
        torch.set_num_threads(args.num_threads)
        stats, local_tokens = one_run(lambda: local_run(local, prompt, args.new_tokens), pids)
        local_samples.append(stats)
    return summarize(swarm_samples, swarm_tokens), summarize(local_samples, local_tokens)


def measure_config(count: int, local, prompt: torch.Tensor, reference: dict, args) -> dict:
    """Start ``count`` servers; time the swarm and local transformers in turns; check tokens; read memory."""
    spans = even_spans(local.config.num_hidden_layers, count)
    print(f"\n== {count} server(s): {', '.join(map(format_span, spans))}", flush=True)
    phases = Phases()
    env = {**os.environ, **args.server_env_dict} if args.server_env_dict else None
    with LocalSwarm(timeout=args.start_timeout, env=env) as swarm:
        extra = ("--num-threads", str(args.num_threads)) if args.num_threads else ()
        swarm.start(args.model, [(format_span(span), extra) for span in spans])
        phases.mark("start servers")
        pids = [server.proc.pid for server in swarm.servers]
        options = {"push": True} if args.push else {}
        options.update(local_blocks=args.local_blocks, local_last_blocks=args.local_last_blocks)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            args.model, initial_peers=swarm.initial_peers, **options
        )
        phases.mark("connect")
        try:
            generated = greedy_generate(model, prompt, args.new_tokens)  # warm-up and exactness check
            phases.mark("warm-up generate")
            swarm_timing, local_timing = interleaved(model, local, prompt, args, pids)
            phases.mark("timed runs")
        finally:
            model.shutdown()
        memory = [{"span": server.blocks, **tree_memory(server.proc.pid).as_mib()} for server in swarm.servers]
    phases.mark("stop")
    result = {
        "servers": count,
        "spans": [format_span(span) for span in spans],
        "swarm": dataclasses.asdict(swarm_timing),
        "local": dataclasses.asdict(local_timing),
        "generate_tokens_match": generated == reference["generate_tokens"],
        "loop_tokens_match": swarm_timing.tokens == reference["loop_tokens"] == local_timing.tokens,
        "memory": memory,
        "phase_seconds": phases.seconds,
    }
    print(f"   {phases}", flush=True)
    for name, timing in (("swarm", swarm_timing), ("local", local_timing)):
        print(
            f"   {name} decode ms: median {timing.decode_median_ms:.1f}, mean {timing.decode_mean_ms:.1f}, "
            f"p90 {timing.decode_p90_ms:.1f}, max {timing.decode_max_ms:.1f}; CPU ms/token: "
            f"servers {timing.server_cpu_ms_per_token:.1f}, client {timing.client_cpu_ms_per_token:.1f}",
            flush=True,
        )
    print(
        f"   generate tokens equal local: {result['generate_tokens_match']}; "
        f"timed-loop tokens equal local: {result['loop_tokens_match']}",
        flush=True,
    )
    return result


def _ratio(swarm: float, local: float) -> str:
    return f"{swarm:.1f}/{local:.1f}/{swarm / local:.2f}" if local > 0 else f"{swarm:.1f}/{local:.1f}/-"


def table(results: list[dict], alone: Timing) -> str:
    header = (
        f"{'config':<24} {'prefill ms swarm/local/x':>24} {'open ms':>7} {'per-token median ms swarm/local/x':>33} "
        f"{'mean swarm/local':>16} {'overhead/hop ms':>15} {'local alone ms':>14} {'idle srv CPU ms/tok':>19} "
        f"{'CPU ms/tok srv+cli/local':>24}  server mem MiB main/total"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        s, local = r["swarm"], r["local"]
        overhead = (s["decode_median_ms"] - local["decode_median_ms"]) / r["servers"]
        mean = f"{s['decode_mean_ms']:.1f}/{local['decode_mean_ms']:.1f}"
        cpu = f"{s['server_cpu_ms_per_token']:.0f}+{s['client_cpu_ms_per_token']:.0f}"
        cpu += f"/{local['client_cpu_ms_per_token']:.0f}"
        memory = " ".join(f"{m['main_rss_mib']:.0f}/{m['total_rss_mib']:.0f}" for m in r["memory"])
        lines.append(
            f"{r['servers']} srv {','.join(r['spans']):<18} {_ratio(s['prefill_ms'], local['prefill_ms']):>24} "
            f"{s['open_ms']:>7.1f} {_ratio(s['decode_median_ms'], local['decode_median_ms']):>33} {mean:>16} "
            f"{overhead:>15.2f} {alone.decode_median_ms:>14.1f} {local['server_cpu_ms_per_token']:>19.1f} "
            f"{cpu:>24}  {memory}"
        )
    return "\n".join(lines)


def measure_local(local, prompt: torch.Tensor, args) -> tuple[Timing, dict]:
    """Local transformers alone: warm-up ``generate`` (its tokens are the reference), then the timed loop."""
    generate_tokens = greedy_generate(local, prompt, args.new_tokens)
    samples = [one_run(lambda: local_run(local, prompt, args.new_tokens), []) for _ in range(args.repeats)]
    timing = summarize([stats for stats, _ in samples], samples[-1][1])
    print(
        f"local: prefill {timing.prefill_ms:.1f} ms, per-token median {timing.decode_median_ms:.1f} ms, "
        f"mean {timing.decode_mean_ms:.1f}, p90 {timing.decode_p90_ms:.1f}, max {timing.decode_max_ms:.1f}; "
        f"CPU ms/token {timing.client_cpu_ms_per_token:.1f}",
        flush=True,
    )
    return timing, {"generate_tokens": generate_tokens, "loop_tokens": timing.tokens}


def report(args, tokenizer, local_alone: Timing | None, reference: dict, results: list[dict], seconds: float) -> bool:
    """Print the table (and write the JSON); True if every configuration reproduced the local tokens."""
    if reference:
        print(f"\nlocal generated text: {tokenizer.decode(reference['generate_tokens'])!r}")
    print(f"load average at end: {load_average()}; total {seconds:.0f} s\n")
    if local_alone is not None and results:
        print(table(results, local_alone))
    exact = bool(results) and all(r["generate_tokens_match"] and r["loop_tokens_match"] for r in results)
    print(f"\nswarm tokens equal local tokens in every configuration ({len(results)} measured): {exact}")
    if args.json:
        local = dataclasses.asdict(local_alone) if local_alone is not None else None
        payload = {"args": vars(args), "load_average_end": psutil.getloadavg(), "local": local, "results": results}
        with open(args.json, "w") as file:
            json.dump(payload, file, indent=2)
    return exact


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    start_time_limit(args.time_limit)
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.num_threads)
    print(f"load average at start: {load_average()}; cpus: {os.cpu_count()}")
    folder = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    local = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    prompt = make_prompt(tokenizer, args.prompt_tokens)
    print(f"model {folder.name}: {local.config.num_hidden_layers} blocks; prompt {prompt.shape[1]} tokens, "
          f"{args.new_tokens} new tokens, batch 1, greedy; {args.num_threads} torch threads "
          f"(client: {args.client_threads or args.num_threads}); "
          f"server env {args.server_env_dict or '{}'}; push {args.push}; "
          f"private mode: {args.local_blocks} first + {args.local_last_blocks} last blocks on the client",
          flush=True)  # fmt: skip
    local_alone, reference, results, aborted = None, {}, [], False
    try:
        local_alone, reference = measure_local(local, prompt, args)
        for count in args.server_counts:
            results.append(measure_config(count, local, prompt, reference, args))
    except BenchmarkTimeout as exc:
        print(f"\n!! {exc}; reporting the {len(results)} configuration(s) measured so far", flush=True)
        aborted = True
    finally:
        signal.alarm(0)
    exact = report(args, tokenizer, local_alone, reference, results, time.monotonic() - started)
    return 2 if aborted else 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
