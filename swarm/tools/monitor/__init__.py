"""``python -m swarm monitor``: a live web page of a swarm (any swarm, private ones too).

- ``app``: the aiohttp server: polls the DHT for each watched model (``swarm.tools.status.build_report``,
  the same JSON as ``python -m swarm status --json``) and serves it at ``/api/v1/state?model=<prefix>``,
  the list of models at ``/api/v1/models``, and the page at ``/``
- ``static/``: the page: ``index.html``, ``monitor.css``, ``monitor.js`` (plain HTML/CSS/JS, no build
  step): coverage picture (SVG), servers table, gaps and routes, refreshed by polling the JSON

Reads only DHT records; imports nothing from ``server`` or ``client``.
"""
