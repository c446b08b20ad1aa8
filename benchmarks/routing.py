"""Routing benchmark: how long ``fastest_chain`` takes on large simulated swarms (pure, no network).

Each swarm has ``--servers`` servers over ``--blocks`` blocks: random spans of 1 to blocks/2 blocks,
log-normal throughputs and client round trips, and per server measured pings to up to 20 servers
starting where its span ends (as servers measure their successors), a few servers short of cache.
Times the route for client relay and for push, over ``--swarms`` random swarms, and prints the
median, 90th percentile and worst time per mode, plus the cost of ``chain_latency`` for scale.

Run: ``.venv/bin/python benchmarks/routing.py [--servers 1000] [--blocks 100] [--swarms 20]``
(times are wall-clock on a shared machine: repeat and compare medians).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import statistics
import time

from swarm.net.records import ServerInfo, ServerState
from swarm.routing.chains import chain_latency, fastest_chain
from swarm.spans import BlockRange


def simulated_swarm(rng: random.Random, count: int, num_blocks: int) -> tuple[list[ServerInfo], dict[str, float]]:
    servers, pings = [], {}
    for i in range(count):
        length = rng.randint(1, max(1, num_blocks // 2))
        start = rng.randrange(num_blocks - length + 1)
        peer = f"s{i:05d}"
        pings[peer] = rng.lognormvariate(math.log(0.03), 0.8)
        throughput = rng.lognormvariate(math.log(20), 1.0)
        cache = rng.choice([0, 10**4, 10**4, 10**4])
        span = BlockRange(start, start + length)
        servers.append(ServerInfo(peer, ServerState.ONLINE, span, throughput=throughput, cache_tokens_left=cache))
    starting: dict[int, list[str]] = {}
    for server in servers:
        starting.setdefault(server.span.start, []).append(server.peer_id)
    for i, server in enumerate(servers):
        after = starting.get(server.span.end, [])
        measured = {p: rng.lognormvariate(math.log(0.02), 0.8) for p in rng.sample(after, min(20, len(after)))}
        servers[i] = dataclasses.replace(server, next_pings=measured)
    return servers, pings


def time_routes(servers, pings, span, push: bool, repeats: int) -> tuple[float, float, list]:
    """Best of ``repeats`` runs (the least disturbed by other load): wall-clock and CPU seconds of this
    thread, and the chain."""
    wall, cpu, chain = math.inf, math.inf, None
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.thread_time()
        chain = fastest_chain(servers, span, pings, min_cache_tokens=100, push=push)
        cpu = min(cpu, time.thread_time() - started_cpu)
        wall = min(wall, time.perf_counter() - started)
    return wall, cpu, chain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=int, default=1000)
    parser.add_argument("--blocks", type=int, default=100)
    parser.add_argument("--swarms", type=int, default=20, help="random swarms to route through")
    parser.add_argument("--repeats", type=int, default=3, help="runs per swarm and mode (the best counts)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    span = BlockRange(0, args.blocks)
    times: dict[str, list[float]] = {"relay": [], "push": []}
    cpu_times: dict[str, list[float]] = {"relay": [], "push": []}
    hops: dict[str, list[int]] = {"relay": [], "push": []}
    latency_eval = []
    for index in range(args.swarms):
        servers, pings = simulated_swarm(random.Random(args.seed + index), args.servers, args.blocks)
        for mode in times:
            seconds, cpu, chain = time_routes(servers, pings, span, mode == "push", args.repeats)
            times[mode].append(seconds)
            cpu_times[mode].append(cpu)
            hops[mode].append(len(chain))
        started = time.perf_counter()
        chain_latency(chain, servers, pings, push=True)
        latency_eval.append(time.perf_counter() - started)

    size = f"{args.servers} servers x {args.blocks} blocks"
    print(f"fastest_chain on {args.swarms} swarms of {size} (best of {args.repeats} runs each)")
    for mode in times:
        for clock, values in (("wall", times[mode]), ("cpu", cpu_times[mode])):
            ms = sorted(1e3 * v for v in values)
            p90 = ms[min(len(ms) - 1, math.ceil(0.9 * len(ms)) - 1)]
            print(
                f"  {mode:5} {clock:4}: median {statistics.median(ms):6.2f} ms, p90 {p90:6.2f} ms, "
                f"worst {ms[-1]:6.2f} ms  ({statistics.mean(hops[mode]):.1f} hops on average)"
            )
    print(f"  (load average while running: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    print(f"  chain_latency on one chain: median {1e3 * statistics.median(latency_eval):.2f} ms")


if __name__ == "__main__":
    main()
