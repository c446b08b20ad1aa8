"""Take the README's screenshot of the monitor: a local 3-server swarm of the default model (with a
bootstrap node), ``python -m swarm monitor`` on it, and a headless chromium.

Run with ``.venv/bin/python scripts/monitor_screenshot.py [--out docs/monitor.png]`` (needs chromium and
chromium-driver, see ``scripts/test.sh``); it stops everything it started when done.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.swarm.browser

from swarm.models.modelpath import resolve_model  # noqa: E402
from swarm.tools.localswarm import LocalSwarm, spawn_monitor  # noqa: E402
from tests.swarm.browser import headless_chromium  # noqa: E402

SERVERS = [("0:12", "alpha"), ("10:22", "beta"), ("20:30", "gamma")]


def wait_for_pings(url: str, timeout: float) -> None:
    """Until the servers with a successor have announced their measured pings (the first refresh)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{url}/api/v1/state", timeout=10) as response:
            servers = json.load(response)["servers"]
        if all(row["next_pings"] for row in servers if row["end"] < 30):
            return
        time.sleep(1.0)
    print("warning: the servers have not announced their pings yet", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/monitor.png")
    parser.add_argument("--width", type=int, default=1200)
    args = parser.parse_args()
    resolve_model(None)
    with LocalSwarm(timeout=300, bootstrap=True) as swarm:
        swarm.start(None, [(blocks, ("--public-name", name)) for blocks, name in SERVERS])
        monitor = spawn_monitor(swarm.bootstrap.maddrs, "--refresh", "1")
        try:
            monitor.wait_ready(time.monotonic() + 120)
            wait_for_pings(monitor.url, timeout=60)
            browser = headless_chromium(args.width, 900)
            try:
                browser.get(monitor.url)
                deadline = time.monotonic() + 30
                while len(browser.find_elements("css selector", "tr.server")) < len(SERVERS):
                    if time.monotonic() > deadline:
                        raise TimeoutError("the page did not show the servers")
                    time.sleep(0.2)
                height = browser.execute_script("return document.documentElement.scrollHeight")
                browser.set_window_size(args.width, height + 20)
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                browser.save_screenshot(args.out)
            finally:
                browser.quit()
        finally:
            monitor.kill_group()
    print(f"Wrote {args.out} ({Path(args.out).stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
