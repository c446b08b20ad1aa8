"""What ``python -m swarm status`` shows, as pure functions of the server records and the model depth.

``build_report`` turns records into a JSON-ready dict (servers, coverage per block, gaps, the route a
client would take); ``format_report`` renders that dict as the human-readable text. No I/O here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from swarm.errors import MissingBlocksError, format_blocks
from swarm.net.records import ServerInfo
from swarm.routing.chains import chain_latency, coverage, fastest_chain, usable
from swarm.spans import BlockRange

_COLUMNS = (  # (header, key in the server dict)
    ("PEER ID", "peer_id"),
    ("NAME", "public_name"),
    ("STATE", "state"),
    ("BLOCKS", "span"),
    ("STEPS/S/BLOCK", "throughput"),
    ("FWD TOK/S/BLOCK", "forward_throughput"),
    ("DTYPE", "dtype"),
    ("CACHE FREE", "cache_tokens_left"),
    ("VERSION", "version"),
    ("POINTS", "points"),
)


def server_row(info: ServerInfo) -> dict[str, Any]:
    """One server as a JSON-ready dict (state by name, span both as ``"start:end"`` and as numbers)."""
    return {
        "peer_id": info.peer_id,
        "public_name": info.public_name,
        "state": info.state.name,
        "span": str(info.span),
        "start": info.span.start,
        "end": info.span.end,
        "throughput": info.throughput,
        "forward_throughput": info.forward_throughput,
        "next_pings": dict(info.next_pings),
        "dtype": info.dtype,
        "cache_tokens_left": info.cache_tokens_left,
        "version": info.version,
        "model": info.model,
        "maddrs": list(info.maddrs),
        "hidden_size": info.hidden_size,
        "max_request_tokens": info.max_request_tokens,
        "points": info.points,
        "fair_share": info.fair_share,
        "usage": [{"peer_id": u.peer_id, "served": u.served, "queued": u.queued} for u in info.usage],
    }


def build_report(servers: Iterable[ServerInfo], num_blocks: int) -> dict[str, Any]:
    """The swarm's state for a model of ``num_blocks`` blocks, as a JSON-ready dict.

    Keys: ``servers`` (rows sorted by span, then peer id), ``coverage`` (online servers per block),
    ``gaps`` (blocks no online server hosts), ``route`` (the inference chain a client would take over
    online servers, lowest expected latency with client relay, as ``{peer_id, start, end}`` hops) or None
    when there are gaps, ``push_route`` (the same with server-to-server push, using the servers' measured
    pings), and ``route_ms`` / ``push_route_ms`` (their expected latency per token; the client's own
    round trips are unknown here and count as the default 50 ms each way they are used).
    """
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be positive, got {num_blocks}")
    ordered = sorted(servers, key=lambda s: (s.span.start, s.span.end, s.peer_id))
    counts = coverage(ordered, num_blocks)
    gaps = [block for block, count in enumerate(counts) if count == 0]
    online, span = usable(ordered), BlockRange(0, num_blocks)
    routes: dict[str, Any] = {}
    for name, push in (("route", False), ("push_route", True)):
        try:
            chain = fastest_chain(online, span, {}, push=push)
            routes[name] = [{"peer_id": hop.peer_id, "start": hop.span.start, "end": hop.span.end} for hop in chain]
            routes[f"{name}_ms"] = 1e3 * chain_latency(chain, online, {}, push=push)
        except MissingBlocksError:
            routes[name], routes[f"{name}_ms"] = None, None
    return {"servers": [server_row(info) for info in ordered], "coverage": counts, "gaps": gaps, **routes}


def format_report(report: dict[str, Any]) -> str:
    """Render a ``build_report`` dict as text: a server table, coverage, gaps and route."""
    lines = format_table(report["servers"]) if report["servers"] else ["No servers found."]
    lines.append("")
    lines.append(f"Coverage (online servers per block): {format_coverage(report['coverage'])}")
    gaps = report["gaps"]
    lines.append(f"Gaps: blocks {format_blocks(gaps)}" if gaps else "Gaps: none")
    lines.append(f"Route: {format_route(report['route'], gaps)}{_ms(report.get('route_ms'))}")
    lines.append(f"Route with push: {format_route(report.get('push_route'), gaps)}{_ms(report.get('push_route_ms'))}")
    return "\n".join(lines)


def format_table(rows: list[dict[str, Any]]) -> list[str]:
    """Left-aligned columns, one line per server, with a header line."""
    cells = [[header for header, _ in _COLUMNS]]
    for row in rows:
        cells.append([_cell(key, row[key]) for _, key in _COLUMNS])
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in cells]


def format_coverage(counts: list[int]) -> str:
    """[1, 1, 2, 0] -> '0:2 x1, 2:3 x2, 3:4 x0' (runs of blocks with the same number of servers)."""
    runs: list[str] = []
    start = 0
    for block in range(1, len(counts) + 1):
        if block == len(counts) or counts[block] != counts[start]:
            runs.append(f"{start}:{block} x{counts[start]}")
            start = block
    return ", ".join(runs)


def format_route(route: list[dict[str, Any]] | None, gaps: list[int]) -> str:
    """'peerA [0:3] -> peerB [3:4]', or why there is no route."""
    if route is None:
        return f"no complete route: blocks {format_blocks(gaps)} missing"
    return " -> ".join(f"{hop['peer_id']} [{hop['start']}:{hop['end']}]" for hop in route)


def exit_code(report: dict[str, Any]) -> int:
    """0 when every block is served, 1 when there are gaps."""
    return 1 if report["gaps"] else 0


def _cell(key: str, value: Any) -> str:
    if key in ("throughput", "forward_throughput"):
        return f"{value:.0f}"
    if key == "points":
        return f"{value:.1f}"
    if key == "public_name" and not value:
        return "-"
    return str(value)


def _ms(value: float | None) -> str:
    return f" (~{value:.1f} ms/token)" if value is not None else ""
