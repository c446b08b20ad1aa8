"""Tools on top of the swarm's records and processes.

- ``status``: the report behind ``python -m swarm status`` (and the monitor's JSON)
- ``monitor``: ``python -m swarm monitor``, a live web page of the swarm (aiohttp, plain HTML/JS)
- ``localswarm``: real server processes on 127.0.0.1 for tests, the demo and benchmarks (the one launcher of
  local swarms)
- ``zygote``: a process that imported the server's code once and forks the tests' servers from it
"""
