"""Who serves what: the layer below ``server`` and ``client``.

- ``spans``: BlockRange and ``--blocks`` parsing, DHT key names
- ``records``: ServerInfo (what a server announces) <-> DHT bytes
- ``dht``: SwarmDHT, a typed wrapper over hivemind's DHT (announce, fetch records)
- ``routing``: pure functions from records to chains: fewest hops, lowest latency (relay or push), spread load
- ``selection``: pure block selection for ``--num-blocks`` servers and when to move
- ``rpc``: calls to one server (inference stream, forward, info, ping), for clients and servers
- ``localswarm``: real server processes on 127.0.0.1 for tests, the demo and benchmarks
- ``status``: the report behind ``python -m swarm status``
- ``models``: model code shared by servers and clients (family adapters, weights, ``--model`` resolution)
- ``tensors``: torch <-> ``pb.Tensor``
- ``errors``: typed errors and their wire mapping
- ``__main__``: ``python -m swarm bootstrap | status``

Nothing here imports ``server`` or ``client``.
"""

__version__ = "0.1.0"
