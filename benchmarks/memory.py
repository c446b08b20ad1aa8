"""Memory of one server beside its weights and KV cache, per process, and what each import costs.

Run from the repository root::

    .venv/bin/python benchmarks/memory.py                      # the server table, then the import costs
    .venv/bin/python benchmarks/memory.py --server-env GOGC=50   # env for the servers only (experiments)
    .venv/bin/python benchmarks/memory.py --imports-only

Server table: two ``python -m server`` processes on 127.0.0.1 (blocks 0:15 and 15:30 of the model), and a
client in this process that opens a session (max_length 512) and generates 16 greedy tokens. The server of
0:15 is measured twice: with the session still open (its KV cache allocated), and idle after the session
closed (the server has given the cache back to its budget). Each of its processes (the Python server and its
libp2p daemon ``p2pd``) gets a row: the proportional set size (PSS: pages shared with other processes, such as
the libraries every Python process here maps, count by their share), and in it the weights (the parameters of
the span, in the serving dtype, counted where they lie: pages of the safetensors files by their PSS, copies at
their size), the KV cache (the tokens the server reserved, at the cache's bytes per token) and the rest. The
issue's target is the rest summed over the processes: at most ``OVERHEAD_TARGET_MIB``.

Import costs: a fresh Python process per line imports the modules of that line and of the lines above it, in
the order the server imports them, and reports its PSS, USS and RSS and the modules loaded; the difference
from the line above is what that line adds. The "(not imported)" lines add, on top of the server's imports,
what the server no longer imports (hivemind's ``__init__``, transformers' modeling code), to show what that
saves. "packages" lists heavy packages that ``server.__main__`` loads.

PSS depends on what else runs: pages of a library other processes also map are split between them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import psutil
import torch
from safetensors import safe_open
from transformers import AutoConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import MIB, load_average  # noqa: E402
from client import AutoDistributedModelForCausalLM  # noqa: E402
from server.config import ServerConfig  # noqa: E402
from swarm.core.cache import KVGeometry  # noqa: E402
from swarm.models.families import get_family  # noqa: E402
from swarm.models.modelpath import resolve_model  # noqa: E402
from swarm.models.weights import tensor_index  # noqa: E402
from swarm.net.rpc import ServerFailure, call_info  # noqa: E402
from swarm.tools.localswarm import LocalSwarm  # noqa: E402

OVERHEAD_TARGET_MIB = 300  # issue 19: PSS beside weights and cache, summed over a server's processes
SPANS = ("0:15", "15:30")  # the first one is measured
PROMPT = [[1, 422, 3458, 282, 4649, 314]]
MAX_LENGTH, NEW_TOKENS = 512, 16
IMPORT_CHAIN = (  # what the server imports, roughly in its order
    ("python",),
    ("torch",),
    ("server.lean", "swarm", "hivemind.p2p", "hivemind.dht.node"),  # server.lean first: hivemind without its __init__
    ("transformers", "transformers.models.auto.configuration_auto"),
    ("safetensors",),
    ("proto", "swarm.net.dht", "swarm.net.records", "swarm.net.rpc"),
    ("swarm.models.families", "swarm.models.decoder", "swarm.core.blocks", "swarm.core.cache"),
    ("server.server", "server.__main__"),
)
NOT_IMPORTED = (  # each added to the whole chain, for comparison: what serving does without (label, first, last)
    ("hivemind's __init__ (imported before server.lean)", ("hivemind",), ()),
    ("transformers' LlamaConfig", (), ("transformers.models.llama.configuration_llama",)),
    ("transformers' Llama modeling code", (), ("transformers.models.llama.modeling_llama",)),
)
WATCHED = (  # packages serving does not need; "packages" says which ones the server loads
    "scipy", "sympy", "sklearn", "pandas", "accelerate", "torch._dynamo", "torch.distributed.tensor",
    "torch.export", "torch._inductor", "transformers.generation", "transformers.modeling_utils",
    "tokenizers", "jinja2", "pydantic", "hivemind.averaging", "hivemind.moe", "hivemind.optim",
)  # fmt: skip


@dataclass(frozen=True)
class Row:
    """One process of a server, in bytes."""

    process: str  # "python" (the server) or "p2pd" (its libp2p daemon)
    pid: int
    pss: int
    uss: int
    rss: int
    weights: int  # the span's parameters as this process holds them, within its PSS
    cache: int  # KV cache reserved by open sessions, within its PSS

    @property
    def rest(self) -> int:
        return self.pss - self.weights - self.cache


def span_weight_bytes(folder, config, start: int, end: int, dtype: torch.dtype) -> int:
    """Bytes of the parameters of blocks [start, end) in ``dtype``, from the safetensors headers."""
    family, index = get_family(config.model_type), tensor_index(folder)
    prefixes = tuple(family.block_prefix(block) for block in range(start, end))
    total = 0
    for name, file in index.items():
        if name.startswith(prefixes):
            with safe_open(file, framework="pt") as reader:
                total += torch.Size(reader.get_slice(name).get_shape()).numel()
    return total * torch.empty(0, dtype=dtype).element_size()


def server_rows(pid: int, weights: int, cache: int, files: tuple[str, ...]) -> list[Row]:
    """A row per process of the server ``pid`` (itself first, then its descendants). Weights read through mmap
    stay pages of their file (PSS shared with other readers of it); a copy of them is anonymous memory."""
    root = psutil.Process(pid)
    rows = []
    for process in [root, *root.children(recursive=True)]:
        try:
            info = process.memory_full_info()
            mapped = [m for m in process.memory_maps(grouped=True) if m.path in files]
            name = process.name()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        held = 0
        if process.pid == pid:
            files_pss, files_rss = sum(m.pss for m in mapped), sum(m.rss for m in mapped)
            held = files_pss + max(0, weights - files_rss)
        rows.append(Row(name, process.pid, info.pss, info.uss, info.rss, held, cache if process.pid == pid else 0))
    return rows


async def _info(p2p, peer_id: str, deadline: float = 30.0):
    """The server's record, asked again until ``deadline`` if a call is lost on a busy machine."""
    started = time.monotonic()
    while True:
        try:
            return await call_info(p2p, peer_id, 5)
        except ServerFailure:
            if time.monotonic() - started > deadline:
                raise


def measure(model_name: str | None = None, env: dict | None = None, timeout: float = 300.0) -> dict:
    """Start the servers, generate once, and measure the first server: {"open": rows, "idle": rows, ...}."""
    folder = resolve_model(model_name)
    config = AutoConfig.from_pretrained(folder)
    start, end = (int(part) for part in SPANS[0].split(":"))
    dtype = torch.float32  # the servers' default on CPU
    weights = span_weight_bytes(folder, config, start, end, dtype)
    per_token = KVGeometry.from_config(config, dtype).bytes_per_token(end - start)
    files = tuple(sorted({str(path) for path in tensor_index(folder).values()}))
    budget = ServerConfig().cache_tokens
    with LocalSwarm(timeout=timeout, env=env, fork=False) as swarm:  # interpreters: their memory is measured
        measured, _ = swarm.start(model_name, [(span, ()) for span in SPANS])
        model = AutoDistributedModelForCausalLM.from_pretrained(model_name, initial_peers=swarm.initial_peers)
        client = model.client
        try:
            with model.inference_session(max_length=MAX_LENGTH):
                model.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS, do_sample=False)
                reserved = budget - client.loop.run(_info(client.p2p, measured.peer_id)).cache_tokens_left
                opened = server_rows(measured.proc.pid, weights, reserved * per_token, files)
            deadline = time.monotonic() + 30
            while client.loop.run(_info(client.p2p, measured.peer_id)).cache_tokens_left < budget:
                if time.monotonic() > deadline:
                    raise TimeoutError("the server kept the session's cache 30 s after it closed")
                time.sleep(0.2)
            idle = server_rows(measured.proc.pid, weights, 0, files)
        finally:
            model.shutdown()
    return {"open": opened, "idle": idle, "reserved_tokens": reserved, "weights": weights}


def overhead(rows: list[Row]) -> float:
    """MiB beside weights and cache, summed over the server's processes."""
    return sum(row.rest for row in rows) / MIB


def print_rows(title: str, rows: list[Row]) -> None:
    print(f"\n{title}")
    print(f"{'process':<8} {'pid':>8} {'weights':>8} {'cache':>7} {'rest':>7} {'PSS':>7} {'USS':>7} {'RSS':>7}  (MiB)")
    total = Row("all", 0, *(sum(getattr(r, f) for r in rows) for f in ("pss", "uss", "rss", "weights", "cache")))
    for r in [*rows, total]:
        print(
            f"{r.process:<8} {r.pid or '':>8} {r.weights / MIB:8.1f} {r.cache / MIB:7.1f} {r.rest / MIB:7.1f} "
            f"{r.pss / MIB:7.1f} {r.uss / MIB:7.1f} {r.rss / MIB:7.1f}"
        )  # fmt: skip


PROBE = """
import importlib, json, sys, psutil
for name in sys.argv[2:]:
    importlib.import_module(name)
info = psutil.Process().memory_full_info()
watched = json.loads(sys.argv[1])
print(json.dumps({"pss": info.pss, "uss": info.uss, "rss": info.rss, "modules": len(sys.modules),
                  "loaded": [name for name in watched if name in sys.modules]}))
"""


def probe(names: list[str], env: dict | None) -> dict:
    """A fresh process's memory after importing ``names``, and which WATCHED packages it loaded."""
    command = [sys.executable, "-c", PROBE, json.dumps(WATCHED), *names]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def import_costs(env: dict | None = None) -> list[dict]:
    """For each line of IMPORT_CHAIN: a fresh process's memory after importing it and every line above it;
    then, each on top of the whole chain, what NOT_IMPORTED would add."""
    rows, names = [], []
    for line in IMPORT_CHAIN:
        names += [name for name in line if name != "python"]
        rows.append({"line": " ".join(line), **probe(names, env)})
    for label, first, last in NOT_IMPORTED:
        rows.append({"line": f"(not imported) + {label}", "comparison": True, **probe([*first, *names, *last], env)})
    return rows


def print_imports(rows: list[dict]) -> None:
    print(f"\n{'import (cumulative, fresh process)':<60} {'PSS':>7} {'+PSS':>6} {'USS':>7} {'RSS':>7} {'modules':>8}")
    previous = None
    for row in rows:
        added = "" if previous is None else f"{(row['pss'] - previous['pss']) / MIB:+6.1f}"
        print(
            f"{row['line'][:60]:<60} {row['pss'] / MIB:7.1f} {added:>6} {row['uss'] / MIB:7.1f} "
            f"{row['rss'] / MIB:7.1f} {row['modules']:8d}"
        )
        previous = previous if row.get("comparison") else row
    server = [row for row in rows if not row.get("comparison")][-1]
    print(f"packages serving does not need, loaded by the server: {', '.join(server['loaded']) or 'none'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", default=None, help="model name or folder (default: the default model)")
    p.add_argument("--server-env", nargs="*", default=[], help="KEY=VALUE pairs added to the servers' environment")
    p.add_argument("--imports-only", action="store_true", help="only the import costs")
    p.add_argument("--no-imports", action="store_true", help="only the server table")
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = dict(os.environ, **dict(pair.split("=", 1) for pair in args.server_env)) if args.server_env else None
    print(f"load average at start: {load_average()}; cpus: {os.cpu_count()}; server env {args.server_env or '{}'}")
    results: dict = {}
    if not args.imports_only:
        measured = measure(args.model, env)
        tokens = measured["reserved_tokens"]
        print(f"server of blocks {SPANS[0]} (beside it: {SPANS[1:]}), {measured['weights'] / MIB:.1f} MiB of weights")
        print_rows(f"session open ({tokens} cache tokens reserved)", measured["open"])
        print_rows("idle after the session closed", measured["idle"])
        for phase in ("open", "idle"):
            beside = overhead(measured[phase])
            print(f"beside weights and cache, {phase}: {beside:.1f} MiB "
                  f"(target {OVERHEAD_TARGET_MIB} MiB: {beside / OVERHEAD_TARGET_MIB:.2f}x)")  # fmt: skip
        results = {phase: [vars(row) for row in measured[phase]] for phase in ("open", "idle")}
    if not args.no_imports:
        results["imports"] = import_costs(env=env)
        print_imports(results["imports"])
    print(f"\nload average at end: {load_average()}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
