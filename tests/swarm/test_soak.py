"""A long-running server keeps nothing that grows with the work it serves: the soak benchmark's quick
setting (sessions of every kind: generation, verified generation, forward and backward passes, API
requests) through a swarm of a tiny model, with each server's long-lived structures read at every checkpoint."""

from __future__ import annotations

import shutil

import pytest

from benchmarks import soak
from benchmarks.common import BUSY_KEYS
from tests.api.conftest import add_char_tokenizer

PEERS = 6  # 3 servers and 3 clients (two models and the API): no structure keyed by peer holds more
RECENT = 32  # active_sessions: sessions that stepped within the last half second or so (forgotten by age)


@pytest.mark.timeout(900)
def test_long_lived_structures_stay_bounded_over_many_sessions(tiny_models, tmp_path):
    folder = tmp_path / "tiny-soak"
    shutil.copytree(tiny_models["llama"], folder)
    add_char_tokenizer(folder, vocab_size=256)
    report = soak.run(soak.parse_args(["--model", str(folder), "--quick"]))
    rows = report["checkpoints"]
    assert len(rows) >= 3 and rows[-1]["sessions"] == 300
    assert all(count > 0 for count in rows[-1]["kinds"].values()), rows[-1]["kinds"]
    assert rows[-1]["compared"] > 0 and rows[-1]["mismatches"] == 0  # every sampled generation was exact
    assert rows[-1]["failures"] == 0
    for row in rows:
        for sizes in row["sizes"]:
            assert sizes, "a server reported no structure sizes"
            assert all(sizes[key] == 0 for key in BUSY_KEYS), f"after {row['sessions']} sessions: {sizes}"
            by_peer = {key: size for key, size in sizes.items() if key != "active_sessions"}
            assert max(by_peer.values()) <= PEERS, f"a structure grew with the work, at {row['sessions']}: {sizes}"
            assert sizes["active_sessions"] <= RECENT, f"after {row['sessions']} sessions: {sizes}"
