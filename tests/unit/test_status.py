"""Tests for swarm.tools.status: the report and text behind ``python -m swarm status``, on synthetic records."""

from __future__ import annotations

import json

import pytest

from swarm.net.records import ServerInfo, ServerState
from swarm.spans import BlockRange
from swarm.tools.status import build_report, exit_code, format_coverage, format_report, format_route, server_row

pytestmark = pytest.mark.timeout(30)


def srv(peer: str, start: int, end: int, state: ServerState = ServerState.ONLINE, **kwargs) -> ServerInfo:
    defaults = {"throughput": 10.0, "dtype": "float32", "cache_tokens_left": 1000, "version": "0.1.0"}
    return ServerInfo(peer, state, BlockRange(start, end), **{**defaults, **kwargs})


def test_full_coverage_gives_a_route_and_exit_code_zero():
    servers = [srv("b", 2, 4), srv("a", 0, 3, public_name="alice"), srv("c", 0, 4, state=ServerState.OFFLINE)]
    report = build_report(servers, 4)
    assert set(report) == {"servers", "coverage", "gaps", "route", "route_ms", "push_route", "push_route_ms"}
    assert [row["peer_id"] for row in report["servers"]] == ["a", "c", "b"]  # by span, then peer id
    assert report["coverage"] == [1, 1, 2, 1]
    assert report["gaps"] == []
    assert report["route"] == [{"peer_id": "a", "start": 0, "end": 3}, {"peer_id": "b", "start": 3, "end": 4}]
    assert exit_code(report) == 0
    assert json.loads(json.dumps(report)) == report


def test_gaps_leave_no_route_and_exit_code_one():
    servers = [srv("a", 0, 2), srv("b", 3, 4, state=ServerState.JOINING), srv("c", 5, 6)]
    report = build_report(servers, 7)
    assert report["coverage"] == [1, 1, 0, 0, 0, 1, 0]
    assert report["gaps"] == [2, 3, 4, 6]
    assert report["route"] is None
    assert exit_code(report) == 1
    text = format_report(report)
    assert "Gaps: blocks 2:5, 6:7" in text
    assert "Route: no complete route: blocks 2:5, 6:7 missing" in text


def test_an_empty_swarm_is_all_gaps():
    report = build_report([], 4)
    assert report == {
        "servers": [],
        "coverage": [0, 0, 0, 0],
        "gaps": [0, 1, 2, 3],
        "route": None,
        "route_ms": None,
        "push_route": None,
        "push_route_ms": None,
    }
    text = format_report(report)
    assert "No servers found." in text and "Coverage (online servers per block): 0:4 x0" in text


def test_build_report_rejects_a_model_without_blocks():
    with pytest.raises(ValueError):
        build_report([], 0)


def test_server_row_has_every_column():
    row = server_row(srv("peer", 1, 3, public_name="bob", dtype="bfloat16", maddrs=("/ip4/1.2.3.4/tcp/5",)))
    assert row["peer_id"] == "peer" and row["public_name"] == "bob" and row["state"] == "ONLINE"
    assert (row["span"], row["start"], row["end"]) == ("1:3", 1, 3)
    assert row["throughput"] == 10.0 and row["dtype"] == "bfloat16"
    assert row["cache_tokens_left"] == 1000 and row["version"] == "0.1.0"
    assert row["maddrs"] == ["/ip4/1.2.3.4/tcp/5"]


def test_text_table_lines_up_columns():
    report = build_report([srv("short", 0, 2, public_name="alice"), srv("a-much-longer-peer-id", 2, 4)], 4)
    lines = format_report(report).splitlines()
    header, first, second = lines[0], lines[1], lines[2]
    assert header.split() == [
        *("PEER", "ID", "NAME", "STATE", "BLOCKS", "STEPS/S/BLOCK", "FWD", "TOK/S/BLOCK"),
        *("DTYPE", "CACHE", "FREE", "VERSION", "POINTS"),
    ]
    assert first.split() == ["short", "alice", "ONLINE", "0:2", "10", "0", "float32", "1000", "0.1.0", "0.0"]
    assert second.split() == [
        *("a-much-longer-peer-id", "-", "ONLINE", "2:4", "10", "0", "float32", "1000", "0.1.0", "0.0")
    ]
    for column in ("NAME", "STATE", "BLOCKS", "VERSION"):
        start = header.index(column)
        assert first[start - 2 : start] == "  " and second[start - 2 : start] == "  "
    assert "Gaps: none" in lines
    # 4 blocks at 10 steps/s plus two client round trips of the default 50 ms
    assert "Route: short [0:2] -> a-much-longer-peer-id [2:4] (~500.0 ms/token)" in lines


def test_format_coverage_groups_runs():
    assert format_coverage([1, 1, 2, 0]) == "0:2 x1, 2:3 x2, 3:4 x0"
    assert format_coverage([3]) == "0:1 x3"
    assert format_coverage([]) == ""


def test_format_route():
    assert format_route([{"peer_id": "a", "start": 0, "end": 4}], []) == "a [0:4]"
    assert format_route(None, [1, 2]) == "no complete route: blocks 1:3 missing"
