"""Who serves what: the layer below ``server`` and ``client``.

- ``spans``: BlockRange and ``--blocks`` parsing, DHT key names
- ``records``: ServerInfo (what a server announces) <-> DHT bytes
- ``dht``: SwarmDHT, a typed wrapper over hivemind's DHT (announce, fetch records)
- ``routing``: pure functions from records to a chain of servers
- ``families``: model-family adapters (how to build a block, where weights live)
- ``weights``: read selected tensors from safetensors files
- ``modelpath``: resolve ``--model`` to a local folder (the default model is converted once from GGUF)
- ``tensors``: torch <-> ``pb.Tensor``
- ``errors``: typed errors and their wire mapping
- ``__main__``: ``python -m swarm bootstrap | status``

Nothing here imports ``server`` or ``client``.
"""

__version__ = "0.1.0"
