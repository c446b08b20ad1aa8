"""Verification: what each ``verify`` setting costs, and how fast each kind of cheater is caught.

Run from the repository root::

    .venv/bin/python benchmarks/verify.py            # the default model; about 10 minutes when idle
    .venv/bin/python benchmarks/verify.py --quick    # fewer tokens, settings and runs

Costs: three honest ``python -m server`` processes each hold every block of the model (float32), logging at
debug level (one line per slice of compute, with its milliseconds). For each setting (verify=0 first, the
reference; settings interleaved, ``--repeats`` times) a client steered to the first server generates greedily
``--new-tokens`` tokens, timed per step ("ms/token": median decode step, the prefill excluded). "extra server
busy time" is the compute time of the other servers (the verifiers and referees) over the serving server's,
from their slice lines; "extra server CPU" is the CPU of all server processes (with their DHT and p2pd
children, so idle work too) per token relative to verify=0's; "extra token-blocks" is the work the shadows
and referees did (tokens x blocks) over the work of the chain.

Detection: a cheater (``tests.swarm.cheater``: noise of a relative size from a position on, a skipped
block, bfloat16 compute while announcing float32, another model) joins the honest servers and the client
is steered to it (its measured round trip looks shortest). Each run varies the prompt's length, so the
step at which the cheat starts falls at a different place of the check window; the delay is the number of
steps from the first cheated step to the step at which the cheater is flagged.

Other processes on the machine distort the timings: the load average is printed at start and end.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import load_average, tree_cpu_seconds  # noqa: E402
from client import AutoDistributedModelForCausalLM  # noqa: E402
from client.model import RemoteCache  # noqa: E402
from client.verdicts import DEFAULT_VERIFY  # noqa: E402
from swarm.models.modelpath import resolve_model  # noqa: E402
from swarm.tools.localswarm import LocalSwarm  # noqa: E402

PREFIX = "verify-bench"
CHEATS = {  # name -> the cheater's arguments ({start}: the position the cheat starts at)
    "noise 0.5%": ("noise", "0.005", "{start}"),
    "noise 2%": ("noise", "0.02", "{start}"),
    "noise 10%": ("noise", "0.1", "{start}"),
    "skip 1 block": ("skip", "{middle}"),
    "bf16 as f32": ("lowprec",),
    "other model": (),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", default=None, help="model name or folder (default: the default model)")
    p.add_argument("--settings", default="0,0.0625,0.0833,0.125,1", help="verify values to cost, comma-separated")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens per costed generation (default: 64)")
    p.add_argument("--runs", type=int, default=8, help="detection runs per cheat (default: 8; 0: costs only)")
    p.add_argument(
        "--repeats", type=int, default=3, help="costed generations per setting, interleaved (default 3; 0: none)"
    )
    p.add_argument("--cheats", default=",".join(CHEATS), help="cheats whose detection to measure, comma-separated")
    p.add_argument("--num-threads", type=int, default=1, help="torch threads here and in each server (default: 1)")
    p.add_argument("--quick", action="store_true", help="fewer tokens, settings and detection runs")
    p.add_argument("--start-timeout", type=float, default=180.0, help="seconds for servers to start serving")
    args = p.parse_args(argv)
    if args.quick:
        args.settings, args.new_tokens, args.runs, args.repeats = "0,0.0833,1", 32, 3, 1
    args.verify_values = [float(v) for v in args.settings.split(",") if v.strip()]
    if args.verify_values[0] != 0:
        args.verify_values.insert(0, 0.0)
    return args


def server_args(args, *extra: str) -> tuple[str, ...]:
    return ("--dht-prefix", PREFIX, "--num-threads", str(args.num_threads), *extra)


def connect(swarm: LocalSwarm, folder: Path, verify: float):
    return AutoDistributedModelForCausalLM.from_pretrained(
        str(folder), initial_peers=swarm.initial_peers, dht_prefix=PREFIX, update_period=0.5, verify=verify
    )


def steer(model, swarm: LocalSwarm, peer_id: str) -> None:
    """Make ``peer_id`` the client's first choice (every other server looks far away)."""
    routes = model.client.routes
    deadline = time.monotonic() + 60
    while {s.peer_id for s in swarm.live()} - {s.peer_id for s in model.client.loop.run(routes.servers(refresh=True))}:
        if time.monotonic() > deadline:
            raise TimeoutError("servers not announced in time")
        time.sleep(0.1)
    live = {server.peer_id for server in swarm.live()}
    for server in routes.view():  # stopped servers' records (until they expire) look farthest
        far = 1.0 if server.peer_id in live else 9.0
        routes.record_ping(server.peer_id, 1e-4 if server.peer_id == peer_id else far)


def greedy(model, ids: torch.Tensor, new_tokens: int) -> list[float]:
    """Greedy decoding by hand in one session; the seconds of each decode step (the prefill excluded)."""
    seconds = []
    with model.inference_session(max_length=ids.shape[1] + new_tokens) as session, torch.no_grad():
        cache = RemoteCache(session)
        for step in range(new_tokens):
            started = time.perf_counter()
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            ids = logits[:, -1, :].argmax(dim=-1)[:, None]
            if step:
                seconds.append(time.perf_counter() - started)
    return seconds


def cost(swarm: LocalSwarm, folder: Path, verify: float, prompt: torch.Tensor, blocks: int, args) -> dict:
    servers = swarm.live()
    serving = servers[0]
    model = connect(swarm, folder, verify)
    stats = model.client.verification
    try:
        steer(model, swarm, serving.peer_id)
        greedy(model, prompt, 4)  # warm-up: streams, pings
        wait_checks(stats, 4 if verify else 0)
        shadow_before, checks_before = stats.shadow_units, stats.checks
        marks = {server.peer_id: len(server.output) for server in servers}
        cpu_before = tree_cpu_seconds([server.proc.pid for server in servers])
        seconds = greedy(model, prompt, args.new_tokens)
        wait_checks(stats, checks_before + (args.new_tokens if verify else 0))  # the last window checks at close
        cpu = tree_cpu_seconds([server.proc.pid for server in servers]) - cpu_before
        busy = {server.peer_id: busy_ms(server.output[marks[server.peer_id] :]) for server in servers}
        served = (prompt.shape[1] + args.new_tokens - 1) * blocks  # token-blocks of the chain
        return {
            "verify": verify,
            "ms_per_token": 1000 * statistics.median(seconds),
            "serving_busy_ms": busy[serving.peer_id],
            "verifier_busy_ms": sum(busy.values()) - busy[serving.peer_id],
            "server_cpu_ms_per_token": 1000 * cpu / args.new_tokens,
            "extra_units": (stats.shadow_units - shadow_before) / served,
            "checks": stats.checks - checks_before,
            "largest": {pair: round(value, 6) for pair, value in stats.largest.items()},
        }
    finally:
        model.shutdown()


def busy_ms(lines: list[str]) -> float:
    """Milliseconds of compute in a server's debug log lines (one "slice: ..., N ms" line per slice run)."""
    return sum(float(line.rsplit(", ", 1)[1].split()[0]) for line in lines if "slice: " in line and "ms" in line)


def wait_checks(stats, checks: int, timeout: float = 60.0) -> None:
    """Until the background checks have compared ``checks`` steps in all."""
    deadline = time.monotonic() + timeout
    while stats.checks < checks and time.monotonic() < deadline:
        time.sleep(0.05)


def detect(swarm: LocalSwarm, folder: Path, served: Path, cheat: tuple[str, ...], args, rng) -> list[int | None]:
    """Delays (steps from the first cheated step to the flag; None: not caught) over ``args.runs`` runs."""
    num_blocks = AutoModelForCausalLM.from_pretrained(folder).config.num_hidden_layers
    start = 48  # noise cheats start at this position; the prompt's length varies below it
    entry = (
        ("tests.swarm.cheater", *(a.format(start=start, middle=num_blocks // 2) for a in cheat), "--")
        if cheat
        else ("server",)
    )
    (cheater,) = swarm.start(served, [(f"0:{num_blocks}", server_args(args))], entry=entry)
    delays = []
    try:
        for _ in range(args.runs):
            length = rng.randint(8, start - 4)
            first_cheated = start if cheat and cheat[0] == "noise" else 0
            model = connect(swarm, folder, DEFAULT_VERIFY)
            try:
                steer(model, swarm, cheater.peer_id)
                seed = torch.Generator().manual_seed(rng.randrange(1 << 30))
                ids = torch.randint(3, 1000, (1, length), generator=seed)
                greedy(model, ids, start - length + 40)
                found = model.client.verification.detections
                delays.append(None if not found else steps_between(found[0].position, first_cheated, length))
            finally:
                model.shutdown()
    finally:
        swarm.servers.remove(cheater)
        cheater.kill_group()
    return delays


def calibrate(swarm: LocalSwarm, folder: Path, span: str, args) -> dict:
    """Honest differences: a bfloat16 server serves, float32 servers check every step (verify=1)."""
    (bf16,) = swarm.start(folder, [(span, server_args(args, "--dtype", "bfloat16"))])
    model = connect(swarm, folder, 1.0)
    try:
        steer(model, swarm, bf16.peer_id)
        for seed in range(args.runs):
            ids = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(1000 + seed))
            greedy(model, ids, args.new_tokens)
        stats = model.client.verification
        return {"checks": stats.checks, "largest": dict(stats.largest), "flagged": len(model.flagged_servers)}
    finally:
        model.shutdown()
        swarm.servers.remove(bf16)
        bf16.kill_group()


def steps_between(position: int, first_cheated: int, prompt: int) -> int:
    """Steps from the step holding position ``first_cheated`` to the step after which the session had
    processed ``position`` tokens (the prompt is one step)."""
    step_of = lambda pos: 0 if pos < prompt else pos - prompt + 1  # noqa: E731
    return max(1, step_of(position - 1) - step_of(first_cheated) + 1)


def other_model(folder: Path, root: Path) -> Path:
    """The same architecture with its blocks in another order: another model that fits the same servers."""
    model = AutoModelForCausalLM.from_pretrained(folder)
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList([layers[-1], *layers[:-1]])
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = index
    model.save_pretrained(root / "other")
    return root / "other"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    folder = resolve_model(args.model)
    config = AutoModelForCausalLM.from_pretrained(folder).config
    print(f"load average at start: {load_average()}; model {folder.name}")
    span = f"0:{config.num_hidden_layers}"
    rng = random.Random(0)
    prompt = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with LocalSwarm(timeout=args.start_timeout) as swarm, tempfile.TemporaryDirectory() as tmp:
        swarm.start(folder, [(span, server_args(args, "--log-level", "DEBUG"))] * 3)  # debug: busy time per slice
        runs = {verify: [] for verify in args.verify_values}
        for _ in range(args.repeats):  # settings interleaved, so that all see the same background load
            for verify in args.verify_values:
                runs[verify].append(cost(swarm, folder, verify, prompt, config.num_hidden_layers, args))
                print(f"  verify={verify:g}: {runs[verify][-1]}", flush=True)
        costs = [merge_runs(rows) for rows in runs.values() if rows]
        if not args.runs:
            print(cost_table(costs))
            return 0
        if args.repeats:
            honest = calibrate(swarm, folder, span, args)
            print(f"  honest bfloat16 server checked by float32 ones: {honest}", flush=True)
        detections = {}
        for name, cheat in CHEATS.items():
            if name not in args.cheats.split(",") or args.quick and name not in ("noise 2%", "skip 1 block"):
                continue
            served = other_model(folder, Path(tmp)) if name == "other model" else folder
            detections[name] = detect(swarm, folder, served, cheat, args, rng)
            print(f"  {name}: delays {detections[name]}", flush=True)
    print(f"\nload average at end: {load_average()}\n")
    if costs:
        print(cost_table(costs) + "\n")
    print(detection_table(detections))
    return 0


def merge_runs(rows: list[dict]) -> dict:
    """Medians over the repeats of one setting (the busy times summed, so their ratio weighs every run)."""
    medians = ("ms_per_token", "server_cpu_ms_per_token", "extra_units")
    merged = {key: statistics.median(row[key] for row in rows) for key in medians}
    merged.update({key: sum(row[key] for row in rows) for key in ("serving_busy_ms", "verifier_busy_ms", "checks")})
    return {**merged, "verify": rows[0]["verify"]}


def cost_table(costs: list[dict]) -> str:
    base = costs[0]
    lines = [
        "| verify | ms/token | x verify=0 | extra server busy time | extra server CPU | extra token-blocks | checks |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in costs:
        extra_cpu = row["server_cpu_ms_per_token"] / base["server_cpu_ms_per_token"] - 1
        extra_busy = row["verifier_busy_ms"] / max(row["serving_busy_ms"], 1e-9)
        lines.append(
            f"| {row['verify']:g} | {row['ms_per_token']:.1f} | {row['ms_per_token'] / base['ms_per_token']:.2f} | "
            f"{extra_busy:.0%} | {extra_cpu:+.0%} | {row['extra_units']:.0%} | {row['checks']} |"
        )
    return "\n".join(lines)


def detection_table(detections: dict[str, list]) -> str:
    lines = [
        f"| cheat (verify={DEFAULT_VERIFY:.3g}) | caught | delay median (steps) | delay max |",
        "|---|---|---|---|",
    ]
    for name, delays in detections.items():
        caught = [d for d in delays if d is not None]
        median = f"{statistics.median(caught):g}" if caught else "-"
        lines.append(f"| {name} | {len(caught)}/{len(delays)} | {median} | {max(caught) if caught else '-'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
