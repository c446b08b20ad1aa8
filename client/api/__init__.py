"""An OpenAI-compatible HTTP API and a chat page over the swarm: ``python -m client.api``.

A client application: it imports ``client`` (never ``server``).

- ``config``: APIConfig (one dataclass, built by ``__main__`` from the CLI)
- ``app``: APIServer lifecycle (join the swarm, listen, shut down) and the limits it enforces
- ``routes``: aiohttp routes (``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``, the page at ``/``);
  errors become OpenAI's error body in one middleware
- ``protocol``: request validation and translation (body -> token ids, limits, sampling settings)
- ``errors``: errors in OpenAI's format (``APIError``), swarm errors mapped to HTTP statuses in one place
- ``responses``: response bodies and server-sent events as OpenAI sends them
- ``engine``: the generation engine (one session per request; requests stepped in lanes of declared, numbered
  rounds), computing the model's own layers through the model's ``embed`` and ``next_token_logits``
- ``lanes``: the engine's lanes of requests stepped together, and how they are kept even (``surplus``)
- ``keys``: API keys (``--api-keys``), their limits (401, 429 with Retry-After) and usage, and the fair share
  of a round between keys (pure decisions)
- ``decoding``: per-request sampling, detokenization, stop strings and eos (pure)
- ``static/``: the chat page (HTML, CSS, a little JavaScript; no build step)

Concurrency model: everything runs on the client's one event loop (``client.loop``, a background
thread): libp2p, the aiohttp server and the engine. The engine is one task per lane that steps the
lane's requests in declared lockstep rounds (``asyncio.gather`` of ``InferenceSession.step_async``), so servers batch
their decode steps; the engine's torch work (each round's logits, sampling and embeddings as one batch, a
prompt's embeddings) runs on one worker thread, so the loop keeps serving HTTP and libp2p meanwhile.
Per-request state (session, generator, text) lives in its ``Generation`` and is touched by the loop,
except the generator, which only the worker uses. The main thread only starts the server and waits for SIGINT/SIGTERM.
"""
