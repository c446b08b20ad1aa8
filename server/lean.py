"""Imported first by ``python -m server``: registers the ``hivemind`` package without running its ``__init__``.

That ``__init__`` imports all of hivemind (averaging, mixture of experts, optimizers, and through them scipy),
about 30 MiB in every server, while we use only ``hivemind.p2p``, ``.dht``, ``.utils`` and ``.proto``, which
import what they need themselves (``benchmarks/memory.py`` measures it). Only the server process does this, and
only if nothing imported hivemind yet: library code does not, since a program that imports the client may use
hivemind's package itself.
"""

from __future__ import annotations

import importlib.util
import sys


def hivemind_without_its_init() -> None:
    if "hivemind" in sys.modules:
        return
    spec = importlib.util.find_spec("hivemind")
    if spec is not None and spec.submodule_search_locations is not None:
        sys.modules["hivemind"] = importlib.util.module_from_spec(spec)  # a package whose __init__ never ran


hivemind_without_its_init()
