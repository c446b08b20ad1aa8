"""The compute core: how a span of blocks is computed, shared by servers and by the client's referee.

- ``work``: typed work items (``InferenceStep``, ``ForwardPass``) with their three hooks (``prepare``,
  ``run_slice``, ``result``), ``run_slice`` and ``run_to_end`` that apply them, declared rounds (``Round``)
- ``backward``: ``BackwardPass``, gradients through the blocks in bounded slices (checkpoints, walk back)
- ``batching``: the pure decisions of what runs next (``next_batch``) and how long a decode batch waits for
  more steps (``hold_seconds``: declared rounds, ``ActiveSessions`` for undeclared ones)
- ``blocks``: ``BlockStack`` (a span's blocks and their batched computation), ``load_block_stack`` (only the
  span's weights)
- ``attention``: attention for a batch of requests, each with its own KV cache and masks (``Plan``, ``Segment``)
- ``lora``: per-request LoRA on the blocks' linear layers
- ``cache``: KV budget, preallocated session caches (keys, values, padding mask)

Imports only torch, transformers, ``swarm.models``, ``swarm.spans`` and ``swarm.errors``; never the network,
the wire schema, the server or the client.

Concurrency model: nothing here starts threads or touches an event loop. A block stack and the caches
it writes belong to one thread at a time: a server's compute thread (``server.scheduler``), or the
caller of the client's referee. ``CacheBudget`` alone is thread-safe (handlers reserve, the compute
thread never touches it).
"""
