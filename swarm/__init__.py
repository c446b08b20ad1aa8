"""Everything below ``server`` and ``client``, in packages by concern.

- ``net``: the network: the DHT node and server records, calls to servers, tensors on the wire, swarm
  membership, identities and receipts
- ``models``: what a model is made of: family adapters, weights, ``--model`` resolution, LoRA adapters
- ``core``: the compute core: work items, batching decisions, the block stack, attention, LoRA, backward and
  the KV cache, shared by servers and by the client's referee
- ``routing``: pure decisions from server records: chains of servers, and block selection for servers
- ``tools``: the status report, the monitor page and local swarms of real processes (tests, demo, benchmarks),
  whose servers the tests fork from a process that imported the server's code once (``zygote``)
- ``spans``: BlockRange and ``--blocks`` parsing, DHT key names
- ``errors``: typed errors and their wire mapping
- ``__main__``: ``python -m swarm bootstrap | status | monitor | keygen``

Imports go one way inside, as ``pyproject.toml``'s import-linter contracts check: ``tools`` above ``routing``
and ``core``, above ``models``, above ``net``; ``spans`` and ``errors`` below all. Nothing here imports
``server`` or ``client``.

"""

__version__ = "0.1.0"
