"""Headless chromium for page tests, driven by selenium through the system's chromedriver.

The driver and browser are Debian's (``apt-get install chromium chromium-driver``, done by
``scripts/test.sh``); giving their paths explicitly keeps selenium's manager from downloading a driver,
and ``SE_AVOID_STATS`` keeps it from reporting usage. The flags keep chromium off the network.
"""

from __future__ import annotations

import os
import shutil

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",  # tests run as root on CI
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-sync",
    "--metrics-recording-only",
    "--hide-scrollbars",
)


def headless_chromium(width: int = 1280, height: int = 1000):
    """A selenium ``webdriver.Chrome`` on headless chromium; quit it when done."""
    os.environ["SE_AVOID_STATS"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver is None:
        raise RuntimeError("chromium and chromedriver are needed: apt-get install -y chromium chromium-driver")
    options = Options()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)
