"""Fair share between peers as pure decisions: who runs next, who fills a full decode batch, and how a
peer's count starts when its work comes back (no network, no model); a server's usage per peer in status."""

from __future__ import annotations

import pytest
import torch

from swarm.core.batching import FairShare, next_batch, weight
from swarm.core.work import Kind, Work
from swarm.net.records import PeerUsage, ServerInfo, ServerState
from swarm.spans import BlockRange
from swarm.tools.status import build_report

pytestmark = pytest.mark.timeout(30)
SPAN = BlockRange(0, 4)


def item(peer: str, seq: int, rows: int = 1, tokens: int = 1, kind: Kind = Kind.DECODE, points: float = 0.0) -> Work:
    hidden = torch.zeros(rows, tokens, 8)
    return Work(SPAN, hidden, torch.zeros(rows, tokens), peer=peer, seq=seq, kind=kind, points=points)


def peers(batch: list[Work]) -> list[str]:
    return [work.peer for work in batch]


def test_a_full_decode_batch_is_shared_between_peers_not_taken_by_the_earliest():
    flood = [item("flooder", seq) for seq in range(16)]
    ready = [*flood, item("normal", 16)]  # the normal user's step came last
    unfair, _ = next_batch(ready, max_batch_tokens=8, chunk_token_blocks=4096)
    assert "normal" not in peers(unfair)  # today: the first 8 steps in, all the flooder's
    fair = FairShare()
    fair.catch_up({"flooder", "normal"})
    batch, blocks = next_batch(ready, 8, 4096, fair.served)
    assert "normal" in peers(batch) and len(batch) == 8 and blocks == len(SPAN)


def test_the_peer_served_least_goes_first_across_kinds():
    fair = FairShare()
    fair.catch_up({"flooder"})
    fair.charge([item("flooder", 0, rows=16)], blocks=4)
    prompt = item("normal", 5, tokens=40, kind=Kind.PREFILL)
    ready = [item("flooder", 1), item("flooder", 2), prompt]
    assert next_batch(ready, 256, 4096)[0][0].kind == Kind.DECODE  # urgency order: decode steps first
    fair.catch_up({"flooder", "normal"})
    assert next_batch(ready, 256, 4096, fair.served)[0] == [prompt]  # fair: the prompt of the one served less


def test_a_lone_peer_gets_everything():
    fair = FairShare()
    ready = [item("only", seq) for seq in range(20)]
    fair.catch_up({"only"})
    batch, _ = next_batch(ready, 16, 4096, fair.served)
    assert batch == ready[:16]  # the same batch as without fair share: an idle swarm serves it at full speed
    assert next_batch(ready, 16, 4096)[0] == batch


def test_idle_time_earns_no_credit():
    fair = FairShare()
    fair.catch_up({"a", "b"})
    fair.charge([item("a", 0, rows=4)], blocks=4)  # a: 16, b: 0
    fair.catch_up({"a"})  # b has nothing queued: forgotten, since it was served no more than a
    assert "b" not in fair.served
    for seq in range(1, 4):
        fair.charge([item("a", seq, rows=4)], blocks=4)  # a alone for a while: 64
    fair.catch_up({"a", "b"})
    assert fair.served["a"] == 64 and fair.served["b"] == 48  # b starts where a's last slice began, not at 0


def test_a_peer_served_more_keeps_its_count_while_away():
    fair = FairShare()
    fair.catch_up({"heavy", "light"})
    fair.charge([item("heavy", 0, rows=8)], blocks=4)
    fair.catch_up({"light"})  # heavy's steps are at the next server now
    assert fair.served["heavy"] == 32  # it comes back behind light
    (head, *_), _ = next_batch(
        [item("heavy", 1), item("light", 2, tokens=20, kind=Kind.PREFILL)], 256, 4096, fair.served
    )
    assert head.peer == "light"


def test_standing_weights_the_share():
    assert weight(0) == 1 and weight(99) == pytest.approx(3) and weight(-5) == 1
    fair = FairShare()
    fair.catch_up({"volunteer", "stranger"})
    ready = [item("volunteer", seq, points=99) for seq in range(12)] + [item("stranger", 12 + s) for s in range(12)]
    batch, _ = next_batch(ready, 8, 4096, fair.served)
    assert peers(batch).count("volunteer") == 6 and peers(batch).count("stranger") == 2  # 3 : 1


def test_fair_fill_skips_steps_that_do_not_fit_and_keeps_going():
    fair = FairShare()
    fair.catch_up({"big", "small"})
    ready = [item("big", 0, rows=4), item("big", 1, rows=4), item("small", 2, rows=1), item("small", 3, rows=1)]
    batch, _ = next_batch(ready, 6, 4096, fair.served)
    assert sum(work.size for work in batch) <= 6 and set(peers(batch)) == {"big", "small"}


def test_remembered_peers_are_bounded():
    fair = FairShare(max_peers=3)
    for index in range(6):
        fair.catch_up({f"p{index}"})
        fair.charge([item(f"p{index}", index, rows=index + 1)], blocks=1)
    fair.catch_up({"p0"})
    assert len(fair) <= 3 and "p0" in fair.served


def test_a_servers_usage_per_peer_reaches_status_through_its_record():
    usage = (PeerUsage("12D3KooWflooder", 123456, 16), PeerUsage("12D3KooWnormal", 789, 0))
    record = ServerInfo("12D3KooWserver", ServerState.ONLINE, SPAN, fair_share=True, usage=usage)
    assert ServerInfo.from_bytes(record.to_bytes()) == record
    row = build_report([record], len(SPAN))["servers"][0]
    assert row["fair_share"] is True
    assert row["usage"] == [
        {"peer_id": "12D3KooWflooder", "served": 123456, "queued": 16},
        {"peer_id": "12D3KooWnormal", "served": 789, "queued": 0},
    ]
