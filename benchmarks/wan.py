"""WAN behaviour on loopback: decode latency against the physical floor, compression under a bandwidth cap
and the failover stall, with every server behind a ``benchmarks.netem.LinkProxy``.

Run from the repository root::

    PYTHONPATH=$PWD .venv/bin/python benchmarks/wan.py --quick    # fewer tokens; a few minutes when idle
    PYTHONPATH=$PWD .venv/bin/python benchmarks/wan.py --num-threads 2 --delays 25,50,100

Topology: a bootstrap node (no delay) and three ``python -m server`` processes holding 0:10, 10:20 and
20:30 of the default model. Each server listens on a free port X and announces (``--announce-host
127.0.0.1 --announce-port P``) the port P of its own ``LinkProxy(X, delay, mbit)``. Servers dial each
other by announced address, so every connection to a server, from the client or from another server
(push), crosses that server's proxy: one one-way delay in each direction. The client joins through the
bootstrap node only. The benchmark checks both: the servers' DHT records must list only proxy ports, and
no child process (client daemon, servers, their daemons) may hold a TCP connection to a real server port
("direct connections", expected 0).

Delays: one delay for every server per run, 25 ms then 50 ms (``--delays``), on the same servers (the
proxies' delay changes between runs; open connections keep going). A single delay keeps the floor
independent of who dialled whom, since a connection between two servers crosses only the dialled one's
proxy. No bandwidth cap in these runs.

Floor per decode token = one-way delays on the critical path + local compute, where local compute is the
median per-token decode of local transformers (float32, same thread count), timed just before and just
after each swarm run; the faster of the two counts, so the floor stays a lower bound under varying load:

- relay (push=False): client -> s1 -> client -> s2 -> client -> s3 -> client = 2 x delay per server (6);
- push (push=True): the client sends the step to s1 and headers to s2 and s3 at once, then
  client -> s1 -> s2 -> s3 -> client = (servers + 1) one-way delays (4); each server's answer to the
  client is off the critical path.

Compression: the proxies cap each direction at ``--mbit`` (100 Mbit/s) with a 25 ms delay; a 512-token
prompt is prefilled and tokens decoded (relay) with compression none, float16 and int8. Bytes = the sum of
the proxies' forwarded bytes over the run (both directions, DHT chatter included). Relay transfers are
sequential, so the prefill floor also counts bytes / bandwidth. Tokens are compared with compression none.

Failover: a replica of 10:20 joins (own proxy, delay 25 ms, no cap); during a relay ``generate`` the server
the session uses for 10:20 is SIGKILLed after token ``--kill-at``. As in ``benchmarks/failover.py``,
stall = (kill -> next token) - median gap; the largest gap minus the median is printed too, and the tokens
are compared with a run without failure.

Far servers: liveness pings (client/hop.py) wait in proportion to the measured round trip, so long
``--delays`` measure a slow link, not a dead server (``tests/swarm/test_far_servers.py``).

Other processes on the machine distort every number here: the load average is printed at start and end.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import BenchmarkTimeout, load_average, start_time_limit  # noqa: E402
from benchmarks.failover import Clock  # noqa: E402
from benchmarks.latency import greedy_steps, local_run, make_prompt  # noqa: E402
from benchmarks.netem import Link, check_records, direct_connections, set_links, start_links, wire_bytes  # noqa: E402
from client import AutoDistributedModelForCausalLM  # noqa: E402
from client.model import RemoteCache  # noqa: E402
from swarm.models.modelpath import resolve_model  # noqa: E402
from swarm.tools.localswarm import LocalSwarm  # noqa: E402

SPANS = ["0:10", "10:20", "20:30"]
REPLICA = "10:20"  # the span that gets a second server for the failover run
COMPRESSIONS = ["none", "float16", "int8"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="fewer tokens and a shorter long prompt")
    p.add_argument("--delays", default="25,50", help="one-way delays in ms, one run each (default: 25,50)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per decode run (default: 24, quick 10)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt length for the latency runs (default: 16)")
    p.add_argument("--long-prompt", type=int, default=None, help="prompt for compression (default: 512, quick 256)")
    p.add_argument("--mbit", type=float, default=100.0, help="bandwidth cap for compression runs (default: 100)")
    p.add_argument("--kill-at", type=int, default=None, help="failover: kill after this token (default: new/2)")
    p.add_argument(
        "--num-threads",
        type=int,
        default=1,
        help="torch threads here and in each server (default: 1; three servers and the client share the cores)",
    )
    p.add_argument("--model", default=None, help="model name or folder (default: the default model)")
    p.add_argument("--start-timeout", type=float, default=180.0, help="seconds for servers to start serving")
    p.add_argument("--time-limit", type=int, default=900, help="abort (and clean up) after this many seconds")
    args = p.parse_args(argv)
    args.new_tokens = args.new_tokens or (10 if args.quick else 24)
    args.long_prompt = args.long_prompt or (256 if args.quick else 512)
    args.kill_at = args.kill_at or args.new_tokens // 2
    args.delay_list = [float(part) / 1000 for part in args.delays.split(",") if part.strip()]
    if args.new_tokens < 4 or not 1 <= args.kill_at < args.new_tokens - 1 or not args.delay_list:
        p.error("need --new-tokens >= 4, 1 <= --kill-at < new tokens - 1 and at least one delay")
    return args


def connect(model: str | None, swarm: LocalSwarm, **options):
    """A client that joins through the bootstrap node only (never a server's real address)."""
    return AutoDistributedModelForCausalLM.from_pretrained(model, initial_peers=swarm.bootstrap.maddrs, **options)


class Probed:
    """Calls the model and records ``probe()`` (bytes on the wire so far) after each call."""

    def __init__(self, model, probe):
        self.model, self.probe, self.marks = model, probe, [probe()]

    def __call__(self, **kwargs):
        output = self.model(**kwargs)
        self.marks.append(self.probe())
        return output


def swarm_run(model, prompt: torch.Tensor, new_tokens: int, links: list[Link]) -> dict:
    """One greedy run in a fresh, already opened session: tokens, step seconds and bytes per step."""
    with model.inference_session(max_length=prompt.shape[1] + new_tokens) as session:
        session.open(batch_size=prompt.shape[0])
        probed = Probed(model, lambda: wire_bytes(links))
        tokens, seconds = greedy_steps(probed, prompt, new_tokens, RemoteCache(session))
    steps = [after - before for before, after in zip(probed.marks, probed.marks[1:], strict=False)]
    return {"tokens": tokens, "seconds": seconds, "bytes": steps}


def greedy(tokens: int) -> dict:
    """``generate`` options for exactly ``tokens`` greedy tokens."""
    return {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False}


def warm(model, prompt: torch.Tensor) -> None:
    """A short ``generate`` (opens connections, fills the client's view of the swarm)."""
    model.generate(prompt, attention_mask=torch.ones_like(prompt), **greedy(2))


def compare(run: dict, local: list[list[float]]) -> dict:
    """A swarm run's prefill and median decode (ms, KiB on the wire) beside the faster of local transformers'
    runs just before and just after it (ms): the floor stays a lower bound when the machine's load varies."""
    seconds, steps = run["seconds"], run["bytes"]
    return {
        "prefill_ms": 1000 * seconds[0],
        "decode_ms": 1000 * statistics.median(seconds[1:]),
        "prefill_kib": steps[0] / 1024,
        "decode_kib": statistics.median(steps[1:]) / 1024,
        "local_prefill_ms": 1000 * min(times[0] for times in local),
        "local_ms": 1000 * min(statistics.median(times[1:]) for times in local),
    }


def measure_delay(models: dict, local, prompt: torch.Tensor, links: list[Link], delay: float, args) -> list[dict]:
    """Relay and push at one delay, each in turn with local transformers; one row per mode."""
    set_links(links, delay)
    rows, (_, before, _) = [], local_run(local, prompt, args.new_tokens)
    for push, model in models.items():
        warm(model, prompt)
        run = swarm_run(model, prompt, args.new_tokens, links)
        local_tokens, after, _ = local_run(local, prompt, args.new_tokens)
        hops = len(SPANS) + 1 if push else 2 * len(SPANS)
        row = {"delay_ms": 1000 * delay, "mode": "push" if push else "relay", "hops": hops}
        row.update(compare(run, [before, after]), same=run["tokens"] == local_tokens)
        before = after
        row["floor_ms"] = hops * row["delay_ms"] + row["local_ms"]
        print(f"   {row['delay_ms']:.0f} ms {row['mode']}: decode {row['decode_ms']:.1f} ms, floor "
              f"{row['floor_ms']:.1f} ms, tokens equal local: {row['same']}", flush=True)  # fmt: skip
        rows.append(row)
    return rows


def measure_compression(folder, swarm, local, prompt: torch.Tensor, links: list[Link], args) -> list[dict]:
    """Prefill of a long prompt and decode under the bandwidth cap, for each compression (relay)."""
    delay_ms, hops = 25.0, 2 * len(SPANS)
    set_links(links, delay_ms / 1000, args.mbit)
    rows, (_, before, _) = [], local_run(local, prompt, args.new_tokens)
    for compression in COMPRESSIONS:
        model = connect(folder, swarm, compression=compression)
        try:
            warm(model, prompt[:, :8])
            run = swarm_run(model, prompt, args.new_tokens, links)
        finally:
            model.shutdown()
        _, after, _ = local_run(local, prompt, args.new_tokens)
        row = {"compression": compression, **compare(run, [before, after]), "tokens": run["tokens"]}
        before = after
        first = rows[0] if rows else row
        row.update(same=run["tokens"] == first["tokens"], none_kib=first["prefill_kib"])
        serialise_ms = row["prefill_kib"] * 1024 * 8 / (args.mbit * 1e3)  # relay: transfers one after another
        row["prefill_floor_ms"] = hops * delay_ms + serialise_ms + row["local_prefill_ms"]
        row["floor_ms"] = hops * delay_ms + row["local_ms"]
        print(f"   {compression}: prefill {row['prefill_ms']:.0f} ms ({row['prefill_kib']:.0f} KiB), decode "
              f"{row['decode_ms']:.1f} ms; tokens equal 'none': {row['same']}", flush=True)  # fmt: skip
        rows.append(row)
    set_links(links, delay_ms / 1000)
    return rows


def wait_for_servers(model, count: int, deadline: float) -> None:
    """Poll the client's view of the swarm until it lists ``count`` servers."""
    while len(model.client.loop.run(model.client.routes.servers(refresh=True))) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the client did not see {count} servers in time")
        time.sleep(0.5)


def failover_run(swarm: LocalSwarm, model, inputs: dict, args) -> dict:
    """Generate, SIGKILL the server used for ``REPLICA`` after token ``kill_at``; gaps, stall and tokens."""
    victim = {}
    with model.inference_session(max_length=inputs["input_ids"].shape[1] + args.new_tokens) as session:
        session.open(batch_size=1)
        hop = next(i for i, h in enumerate(session.route) if f"{h.span.start}:{h.span.end}" == REPLICA)

        def kill(index: int) -> None:
            if index == args.kill_at:
                server = swarm.by_peer(session.route[hop].peer_id)
                os.kill(server.proc.pid, signal.SIGKILL)
                victim["server"], victim["time"] = server, time.perf_counter()

        clock = Clock(kill)
        output = model.generate(**inputs, **greedy(args.new_tokens), streamer=clock)
    if "time" not in victim:
        raise RuntimeError(f"generation ended before token {args.kill_at}; nothing was killed")
    gaps = [b - a for a, b in zip(clock.times[1:], clock.times[2:], strict=False)]  # decode steps only
    median = statistics.median(gaps)
    kill_to_next = clock.times[args.kill_at + 1] - victim["time"]
    victim["server"].proc.wait(timeout=60)
    victim["server"].kill_group()
    return {
        "median_ms": 1000 * median,
        "kill_to_next_ms": 1000 * kill_to_next,
        "stall_ms": 1000 * (kill_to_next - median),
        "max_gap_ms": 1000 * (max(gaps) - median),
        "output": output,
    }


def measure_failover(folder, swarm, links: list[Link], tokenizer, args) -> dict:
    start_links(links, swarm, [REPLICA], 0.025, args)
    set_links(links, 0.025)
    inputs = tokenizer("Volunteer computing lets many people share their machines to", return_tensors="pt")
    model = connect(folder, swarm)
    try:
        wait_for_servers(model, len(SPANS) + 1, time.monotonic() + 60)
        reference = model.generate(**inputs, **greedy(args.new_tokens))
        result = failover_run(swarm, model, inputs, args)
    finally:
        model.shutdown()
    result["same"] = torch.equal(result.pop("output"), reference)
    print(f"   stall {result['stall_ms']:.0f} ms; tokens equal no-failure run: {result['same']}", flush=True)
    return result


def _x(value: float, floor: float) -> str:
    return f"{value / floor:.2f}" if floor > 0 else "-"


def _f(key: str, digits: int = 1):
    return lambda row: f"{row[key]:.{digits}f}"


LATENCY_COLUMNS = [
    ("delay ms", _f("delay_ms", 0)),
    ("mode", lambda r: r["mode"]),
    ("one-way hops", lambda r: str(r["hops"])),
    ("decode median ms", _f("decode_ms")),
    ("floor ms = delays + compute", lambda r: f"{r['floor_ms']:.1f} = {r['floor_ms'] - r['local_ms']:.0f} + "
     f"{r['local_ms']:.1f}"),
    ("x floor", lambda r: _x(r["decode_ms"], r["floor_ms"])),
    ("KiB/token", _f("decode_kib")),
    ("prefill ms", _f("prefill_ms")),
    ("tokens = local", lambda r: str(r["same"])),
]  # fmt: skip
COMPRESSION_COLUMNS = [
    ("compression", lambda r: r["compression"]),
    ("prefill ms", _f("prefill_ms", 0)),
    ("floor ms", _f("prefill_floor_ms", 0)),
    ("x floor", lambda r: _x(r["prefill_ms"], r["prefill_floor_ms"])),
    ("prefill KiB", _f("prefill_kib", 0)),
    ("x none", lambda r: _x(r["prefill_kib"], r["none_kib"])),
    ("decode ms", _f("decode_ms")),
    ("floor ms", _f("floor_ms")),
    ("x floor", lambda r: _x(r["decode_ms"], r["floor_ms"])),
    ("KiB/token", _f("decode_kib")),
    ("tokens = none", lambda r: str(r["same"])),
]
FAILOVER_COLUMNS = [
    ("killed span", lambda r: REPLICA),
    ("per-token ms", _f("median_ms")),
    ("kill->next token ms", _f("kill_to_next_ms")),
    ("stall ms", _f("stall_ms")),
    ("max gap - median ms", _f("max_gap_ms")),
    ("tokens = no failure", lambda r: str(r["same"])),
]


def table(title: str, columns: list, rows: list[dict]) -> str:
    """A right-aligned text table under ``title``; ``columns`` are (header, row -> cell text)."""
    cells = [[cell(row) for _, cell in columns] for row in rows]
    widths = [max(len(name), *(len(line[i]) for line in cells)) for i, (name, _) in enumerate(columns)]
    header = " ".join(f"{name:>{width}}" for (name, _), width in zip(columns, widths, strict=True))
    body = [" ".join(f"{cell:>{width}}" for cell, width in zip(line, widths, strict=True)) for line in cells]
    return "\n".join([title, header, "-" * len(header), *body])


def run_all(folder, local, tokenizer, args, results: dict) -> None:
    """Start the servers behind proxies and run the three scenarios, filling ``results`` as they finish."""
    prompt = make_prompt(tokenizer, args.prompt_tokens)
    long_prompt = make_prompt(tokenizer, args.long_prompt)
    links: list[Link] = []
    with LocalSwarm(timeout=args.start_timeout, bootstrap=True) as swarm:
        try:
            start_links(links, swarm, SPANS, args.delay_list[0], args)
            models = {push: connect(folder, swarm, push=push) for push in (False, True)}
            try:
                print(f"servers up: {check_records(models[False], links)}", flush=True)
                for delay in args.delay_list:
                    results["latency"] += measure_delay(models, local, prompt, links, delay, args)
                results["direct"] = direct_connections(links, swarm)
            finally:
                for model in models.values():
                    model.shutdown()
            print("compression:", flush=True)
            results["compression"] = measure_compression(folder, swarm, local, long_prompt, links, args)
            print("failover:", flush=True)
            results["failover"] = measure_failover(folder, swarm, links, tokenizer, args)
        finally:
            results["direct_end"] = direct_connections(links, swarm)
            results["bytes"] = wire_bytes(links)
            for link in links:
                link.proxy.close()


def report(results: dict, args, seconds: float) -> None:
    print(f"\nload average at end: {load_average()}; total {seconds:.0f} s; {args.num_threads} torch thread(s)")
    print(f"bytes through the proxies: {results.get('bytes', 0) / 1e6:.1f} MB")
    for when in ("direct", "direct_end"):
        found = results.get(when)
        label = "after the latency runs" if when == "direct" else "at the end"
        print(f"TCP connections to real server ports {label} (bypassing the proxies): {len(found or [])} {found or ''}")
    print()
    if results["latency"]:
        title = f"Decode latency, {args.prompt_tokens}-token prompt, median of {args.new_tokens - 1} decode steps"
        print(table(title, LATENCY_COLUMNS, results["latency"]) + "\n")
    if results["compression"]:
        title = f"{args.long_prompt}-token prompt, {args.mbit:.0f} Mbit/s per direction, 25 ms one-way, relay"
        print(table(title, COMPRESSION_COLUMNS, results["compression"]) + "\n")
    if results["failover"]:
        title = f"SIGKILL after token {args.kill_at}, 2 replicas of {REPLICA}, 25 ms one-way, relay"
        print(table(title, FAILOVER_COLUMNS, [results["failover"]]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    start_time_limit(args.time_limit)
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.num_threads)
    print(f"load average at start: {load_average()}; cpus: {os.cpu_count()}", flush=True)
    folder = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    local = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    print(
        f"model {folder.name}: spans {', '.join(SPANS)}; delays {args.delays} ms; {args.new_tokens} new tokens; "
        f"{args.num_threads} torch thread(s)",
        flush=True,
    )
    results, aborted = {"latency": [], "compression": [], "failover": None}, False
    try:
        run_all(str(folder), local, tokenizer, args, results)
    except BenchmarkTimeout as exc:
        print(f"\n!! {exc}; reporting what was measured so far", flush=True)
        aborted = True
    finally:
        signal.alarm(0)
    report(results, args, time.monotonic() - started)
    exact = all(row["same"] for row in results["latency"]) and (results["failover"] or {}).get("same", False)
    return 2 if aborted else 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
