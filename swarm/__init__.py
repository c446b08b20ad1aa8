"""Everything below ``server`` and ``client``, in packages by concern.

- ``net``: the network: the DHT node and server records, calls to servers, tensors on the wire, swarm
  membership, identities and receipts
- ``models``: what a model is made of: family adapters, weights, ``--model`` resolution, LoRA adapters
- ``core``: the compute core: work items, batching decisions, the block stack, attention, LoRA, backward and
  the KV cache, shared by servers and by the client's referee
- ``routing``: pure decisions from server records: chains of servers, and block selection for servers
- ``tools``: the status report, the monitor page and local swarms of real processes (tests, demo, benchmarks)
- ``spans``: BlockRange and ``--blocks`` parsing, DHT key names
- ``errors``: typed errors and their wire mapping
- ``__main__``: ``python -m swarm bootstrap | status | monitor | keygen``

Imports go one way inside, as ``pyproject.toml``'s import-linter contracts check: ``tools`` above ``routing``
and ``core``, above ``models``, above ``net``; ``spans`` and ``errors`` below all. Nothing here imports
``server`` or ``client``.

Importing ``swarm`` registers the ``hivemind`` package without running its ``__init__``, unless something
imported hivemind already: that ``__init__`` imports all of hivemind (averaging, mixture of experts,
optimizers, and through them scipy), 29 MiB of memory in every server and client, while we use only
``hivemind.p2p``, ``hivemind.dht``, ``hivemind.utils`` and ``hivemind.proto``, which import what they need
themselves (``benchmarks/memory.py`` measures it). Code here names hivemind's submodules, never
``hivemind.X`` from the package.
"""

import importlib.util
import sys

__version__ = "0.1.0"


def _register_hivemind_without_its_init() -> None:
    if "hivemind" in sys.modules:
        return
    spec = importlib.util.find_spec("hivemind")
    if spec is not None and spec.submodule_search_locations is not None:
        sys.modules["hivemind"] = importlib.util.module_from_spec(spec)  # a package whose __init__ never ran


_register_hivemind_without_its_init()
