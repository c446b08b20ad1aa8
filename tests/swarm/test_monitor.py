"""``python -m swarm monitor`` against a real 3-server swarm, read by a headless chromium: the page
shows the coverage picture, the servers, gaps and routes, and follows the swarm as it changes; its JSON
is exactly that of ``python -m swarm status --json``."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from swarm.tools.localswarm import LocalSwarm, spawn_monitor
from tests.swarm.browser import headless_chromium

pytestmark = pytest.mark.timeout(300)

NAMES = {"0:3": "<b>alpha</b>", "2:5": "beta", "4:6": "gamma"}  # alpha's name must show as text, not HTML


@pytest.fixture(scope="module")
def monitored(tiny_models):
    folder = tiny_models["llama"]
    with LocalSwarm(bootstrap=True) as swarm:
        swarm.start(folder, [(blocks, ("--public-name", name)) for blocks, name in NAMES.items()])
        monitor = spawn_monitor(swarm.bootstrap.maddrs, "--model", str(folder), "--refresh", "0.5")
        try:
            monitor.wait_ready(time.monotonic() + 60)
            yield swarm, folder, monitor
        finally:
            monitor.kill_group()


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def status_json(swarm, folder) -> dict:
    command = [sys.executable, "-m", "swarm", "status", "--json", "--initial-peers", *swarm.bootstrap.maddrs]
    result = subprocess.run(command + ["--model", str(folder)], capture_output=True, text=True, timeout=60)
    return json.loads(result.stdout)


def stable(report: dict) -> dict:
    """A report without what changes from one announcement to the next (measured pings, free cache)."""
    volatile = ("next_pings", "cache_tokens_left")
    servers = [{k: v for k, v in row.items() if k not in volatile} for row in report["servers"]]
    return {**report, "servers": servers, "push_route": None, "push_route_ms": None}


def test_state_api_is_the_status_json(monitored):
    swarm, folder, monitor = monitored
    models = get_json(f"{monitor.url}/api/v1/models")["models"]
    assert [(m["prefix"], m["num_blocks"]) for m in models] == [("tiny-llama", 6)]
    # two DHT clients may read a record at different refreshes, so compare what stays the same
    deadline = time.monotonic() + 30
    while stable(state := get_json(f"{monitor.url}/api/v1/state")) != stable(expected := status_json(swarm, folder)):
        assert time.monotonic() < deadline, f"monitor: {state}\nstatus: {expected}"
    assert state.keys() == expected.keys()
    assert [row.keys() for row in state["servers"]] == [row.keys() for row in expected["servers"]]
    assert len(state["servers"]) == 3 and state["gaps"] == []
    assert stable(get_json(f"{monitor.url}/api/v1/state?model=tiny-llama")) == stable(state)
    with pytest.raises(urllib.error.HTTPError) as missing:
        get_json(f"{monitor.url}/api/v1/state?model=no-such-model")
    assert missing.value.code == 404


def test_page_draws_the_swarm_and_follows_it_live(monitored):
    swarm, _, monitor = monitored
    browser = headless_chromium()
    try:
        browser.get(monitor.url)
        wait = WebDriverWait(browser, 30, poll_frequency=0.2)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "tr.server")) == 3)
        rows = browser.find_elements(By.CSS_SELECTOR, "tr.server")
        cells = [[td.text for td in row.find_elements(By.TAG_NAME, "td")] for row in rows]
        assert sorted(row[0] for row in cells) == sorted(NAMES.values())  # the HTML name is plain text
        assert not browser.find_elements(By.CSS_SELECTOR, "td b")
        assert {row[2] for row in cells} == {"ONLINE"} and sorted(row[3] for row in cells) == sorted(NAMES)
        assert {row[-1] for row in cells} == {"-"}  # points: none yet
        coverage = browser.find_elements(By.CSS_SELECTOR, "svg.coverage rect.cell")
        assert [cell.get_attribute("data-count") for cell in coverage] == ["1", "1", "2", "1", "2", "1"]
        assert len(browser.find_elements(By.CSS_SELECTOR, "svg.coverage rect.bar")) == 3
        assert browser.find_elements(By.CSS_SELECTOR, "rect.hop[data-kind=relay]")
        assert browser.find_element(By.CSS_SELECTOR, ".gaps").text == "Gaps: none"

        gamma = next(server for server in swarm.servers if server.blocks == "4:6")
        gamma.signal(signal.SIGTERM)  # it announces itself offline: block 5 loses its only server
        wait.until(lambda b: b.find_element(By.CSS_SELECTOR, ".gaps").text == "Gaps: blocks 5")
        states = {
            row.find_elements(By.TAG_NAME, "td")[0].text: row.find_elements(By.TAG_NAME, "td")[2].text
            for row in browser.find_elements(By.CSS_SELECTOR, "tr.server")
        }
        assert states["gamma"] == "OFFLINE" and states["beta"] == "ONLINE"
        assert browser.find_elements(By.CSS_SELECTOR, "svg.coverage rect.cell")[5].get_attribute("data-count") == "0"
        assert not browser.find_elements(By.CSS_SELECTOR, "rect.hop")  # no complete route any more
        assert not [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    finally:
        browser.quit()
