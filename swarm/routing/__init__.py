"""Pure routing decisions from server records (no network: I/O gathers their inputs).

- ``chains``: chains of servers that cover a span: fewest hops, lowest latency (relay or push), spread load
- ``search``: the exact lowest-latency search behind ``chains.fastest_chain``, vectorised with numpy
- ``selection``: block selection for ``--num-blocks`` servers and when to move
"""
