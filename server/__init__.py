"""Hosts a span of blocks: ``python -m server --blocks 10:20``.

- ``config``: ServerConfig (one dataclass, built by ``__main__`` from the CLI)
- ``server``: Server lifecycle (load, join, serve, announce, graceful shutdown)
- ``blocks``: BlockStack, loading only the span's weights, and its forward pass
- ``cache``: KV budget, preallocated session caches
- ``sessions``: open inference sessions
- ``validation``: checks on every remote input
- ``handler``: RPC handlers (validate + delegate; errors mapped once)
- ``streams``: streaming RPCs with bounded input (message size, streams per peer)
- ``backend``: runs torch work on one worker thread
- ``announcer``: periodic DHT refresh

Concurrency: an asyncio loop (uvloop) in the main thread serves libp2p streams; compute runs on the
backend's single worker thread; blocking DHT calls run in the default executor.
Imports only ``proto`` and ``swarm``.
"""
