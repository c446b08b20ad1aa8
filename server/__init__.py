"""Hosts a span of blocks: ``python -m server --blocks 10:20``.

- ``config``: ServerConfig (one dataclass, built by ``__main__`` from the CLI)
- ``server``: Server lifecycle (load, join, serve, announce, graceful shutdown)
- ``serving``: everything that serves one span (blocks, scheduler, sessions, limits)
- ``scheduler``: a priority queue of work and the one thread that runs it in slices (the computation itself,
  work items and the pure batching decisions live in ``swarm.core``)
- ``sessions``: open inference sessions
- ``mailbox``: push mode's receiving side: inputs of headers' steps (pushed or relayed), early pushes
- ``validation``: checks on every remote input (float inputs converted to the server's dtype on arrival)
- ``handler``: RPC handlers of inference streams, Info and Receipt (validate + delegate; errors mapped once)
- ``passes``: RPC handlers of stateless passes (Forward, Backward), with their per-peer limit
- ``extras``: checks on what fine-tuning and beam search add to requests (prompts, LoRA, gradients, reorders)
- ``gate``: private swarms: every RPC must prove its sender holds the swarm key
- ``ledger``: points: the receipts clients signed, this server's points, the standing of whoever asks
- ``streams``: streaming RPCs with bounded input (message size, streams per peer)
- ``push``: hands a step's output to the next server of a chain (received by ``mailbox``)
- ``announcer``: periodic DHT refresh; pings to the next servers
- ``throughput``: measured speed, cached per machine
- ``lean``: imported first by ``__main__``: hivemind's package without its ``__init__`` (memory)

Concurrency model:
- One asyncio loop (uvloop) in the main thread serves libp2p streams, the announcer, the pinger and the
  rebalancer. Handlers validate requests and ``await`` their work; they never run torch code.
- All torch work of a span goes through its ``Scheduler``: one queue of typed work items and one worker
  thread. Decode steps come first, then prefill steps, then forward passes, then backward passes. Decode
  steps of many sessions that are ready together run as one batch (continuous batching: sessions join
  and leave between slices); a round a client declared runs as one batch as soon as its steps are in;
  long work runs in bounded slices of blocks, so it delays decode steps by at most one slice. Results
  return to the loop with ``call_soon_threadsafe``.
- Only the worker thread touches modules and KV caches; a session has at most one step in flight.
- Blocking DHT calls run in the default executor (the DHT node runs on its own loop thread in this process).

Imports only ``proto`` and ``swarm``.
"""
