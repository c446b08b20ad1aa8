"""A server's footprint: all its processes (the server and its libp2p daemon) hold at most 300 MiB (issue 19)
beside the weights of its span and the KV cache it allocated, measured by ``benchmarks/memory.py`` (blocks 0:15
of the default model, after one generation: with the session open, and idle after it closed)."""

from __future__ import annotations

import pytest

from benchmarks.memory import MAX_LENGTH, OVERHEAD_TARGET_MIB, measure, overhead

pytestmark = pytest.mark.timeout(400)


def test_a_server_holds_little_beside_its_weights_and_cache():
    measured = measure(timeout=300)
    assert measured["reserved_tokens"] >= MAX_LENGTH, "the open session holds no cache: nothing was measured"
    for phase in ("open", "idle"):
        rows = measured[phase]
        names = sorted(row.process for row in rows)
        assert names == ["p2pd", "python"], f"helper processes beside the server and its daemon: {names}"
        table = "; ".join(f"{row.process}: {row.pss >> 20} MiB PSS, {row.rest >> 20} MiB beside" for row in rows)
        assert overhead(rows) <= OVERHEAD_TARGET_MIB, f"{phase}: {overhead(rows):.0f} MiB beside ({table})"
