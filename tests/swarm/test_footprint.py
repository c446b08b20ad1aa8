"""A server's footprint: all its processes (the server and its libp2p daemon) hold little beside the
weights of its span and the KV cache it allocated, measured while a session is open."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig

from client import AutoDistributedModelForCausalLM
from swarm.core.cache import KVGeometry
from swarm.models.families import get_family
from swarm.models.modelpath import resolve_model
from swarm.models.weights import tensor_index
from swarm.net.rpc import ServerFailure, call_info
from swarm.tools.localswarm import LocalSwarm
from tests.swarm.procs import MIB, tree, tree_memory

pytestmark = pytest.mark.timeout(400)

# Beside weights and cache, in PSS. What is left: imports of the server process (torch ~145 MiB,
# transformers' modeling stack with torch._dynamo/sympy/scipy ~125 MiB, hivemind ~10 MiB), ~20 MiB of
# runtime, and the libp2p daemon (~60 MiB, a UPX-packed Go binary). See the README's footprint notes.
OVERHEAD_LIMIT_MIB = 440


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


async def _info(p2p, peer_id: str, deadline: float = 30.0):
    """The server's record; a call lost on a busy machine (once seen: no answer within 10 s in a CI run) is
    asked again until the deadline."""
    started = time.monotonic()
    while True:
        try:
            return await call_info(p2p, peer_id, 5)
        except ServerFailure:
            if time.monotonic() - started > deadline:
                raise


def test_a_server_holds_little_beside_its_weights_and_cache():
    folder = resolve_model(None)
    config = AutoConfig.from_pretrained(folder)
    weights = span_weight_bytes(folder, config, 0, 15, torch.float32)
    with LocalSwarm(timeout=300) as swarm:
        measured, _ = swarm.start(None, [("0:15", ()), ("15:30", ())])
        model = AutoDistributedModelForCausalLM.from_pretrained(None, initial_peers=swarm.initial_peers)
        try:
            with model.inference_session(max_length=512):
                model.generate(torch.tensor([[1, 422, 3458, 282, 4649, 314]]), max_new_tokens=16, do_sample=False)
                client = model.client
                record = client.loop.run(_info(client.p2p, measured.peer_id))
                files = tuple(sorted({str(path) for path in tensor_index(folder).values()}))
                memory = tree_memory(measured.proc.pid, files)
                names = sorted(process.name() for process in tree(measured.proc.pid))
        finally:
            model.shutdown()
    cache_tokens = 16384 - record.cache_tokens_left  # the server's default --cache-tokens
    cache = cache_tokens * KVGeometry.from_config(config, torch.float32).bytes_per_token(15)
    assert cache_tokens >= 512, "the open session holds no cache: nothing was measured"
    assert names == ["p2pd", "python"], f"helper processes beside the server and its daemon: {names}"
    # weights read through mmap stay pages of their file (shared with any other reader of it); any copy of
    # them (e.g. converted to another dtype) is anonymous memory instead
    outside_files = max(0, weights - memory.files_rss)
    overhead = (memory.pss - memory.files_pss - outside_files - cache) / MIB
    assert overhead <= OVERHEAD_LIMIT_MIB, (
        f"{memory} for {weights / MIB:.0f} MiB of weights and {cache / MIB:.0f} MiB of cache: "
        f"{overhead:.0f} MiB beside them"
    )
