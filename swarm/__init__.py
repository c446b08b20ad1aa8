"""Who serves what: the layer below ``server`` and ``client``.

- ``spans``: BlockRange and ``--blocks`` parsing, DHT key names
- ``records``: ServerInfo (what a server announces) <-> DHT bytes
- ``dht``: SwarmDHT, hivemind's DHT node run in-process on its own loop thread (announce, fetch records),
  and ``p2p_options`` (NAT traversal off on loopback)
- ``routing``: pure functions from records to chains: fewest hops, lowest latency (relay or push), spread load
- ``chainsearch``: the exact lowest-latency search behind ``routing.fastest_chain``, vectorised with numpy
- ``selection``: pure block selection for ``--num-blocks`` servers and when to move
- ``rpc``: calls to one server (inference stream, forward, info, ping), for clients and servers
- ``localswarm``: real server processes on 127.0.0.1 for tests, the demo and benchmarks
- ``status``: the report behind ``python -m swarm status`` (and the monitor's JSON)
- ``monitor``: ``python -m swarm monitor``, a live web page of the swarm (aiohttp, plain HTML/JS)
- ``models``: model code shared by servers and clients (family adapters, weights, ``--model`` resolution)
- ``tensors``: torch <-> ``pb.Tensor``
- ``errors``: typed errors and their wire mapping
- ``__main__``: ``python -m swarm bootstrap | status | monitor | keygen``

Nothing here imports ``server`` or ``client``.
"""

__version__ = "0.1.0"
