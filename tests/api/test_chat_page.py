"""The chat page in a real headless browser (Debian's chromium, driven by selenium through the system
chromedriver, so nothing is downloaded): a person asks, the answer streams in and equals local greedy
decoding, the servers that answered are shown, and the conversation carries over to the next question."""

from __future__ import annotations

import os
import shutil

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

pytestmark = pytest.mark.timeout(300)

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def browser():
    os.environ["SE_AVOID_STATS"] = "true"  # selenium sends no usage statistics
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,760",
                     "--no-first-run", "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--disable-default-apps"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def ask(browser, question: str) -> tuple[str, list[tuple[str, str]]]:
    """Type ``question`` and wait for the whole answer; returns its text and the servers shown."""
    finished = ".message.assistant[data-state=done], .message.assistant[data-state=error]"
    before = len(browser.find_elements(By.CSS_SELECTOR, finished))
    prompt = browser.find_element(By.ID, "prompt")
    prompt.send_keys(question)
    prompt.send_keys(Keys.ENTER)
    WebDriverWait(browser, 120).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, finished)) > before)
    answer = browser.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]
    assert answer.get_attribute("data-state") == "done", answer.text
    servers = [
        (item.get_attribute("data-peer-id"), item.find_element(By.TAG_NAME, "strong").text)
        for item in answer.find_elements(By.CSS_SELECTOR, ".route li")
    ]
    return answer.find_element(By.CLASS_NAME, "content").get_attribute("textContent"), servers


def test_the_chat_page_answers_with_the_local_greedy_text_and_shows_the_servers(api, reference, browser, tmp_path):
    browser.get(f"{api.url}/")
    WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "send").is_enabled())
    assert browser.find_element(By.ID, "model").text == "tiny-chat"
    browser.find_element(By.CSS_SELECTOR, ".settings summary").click()
    tokens = browser.find_element(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys(str(MAX_TOKENS))

    first = "What does a swarm do?"
    answer, servers = ask(browser, first)
    history = [{"role": "user", "content": first}]
    expected, _ = reference.greedy(reference.chat_ids(history), MAX_TOKENS)
    assert answer == expected
    assert servers == [(peer, name) for peer, name, _ in api.route]

    second = "And then?"  # the page sends the whole conversation
    answer, _ = ask(browser, second)
    history += [{"role": "assistant", "content": expected}, {"role": "user", "content": second}]
    assert answer == reference.greedy(reference.chat_ids(history), MAX_TOKENS)[0]
    browser.save_screenshot(str(tmp_path / "chat.png"))
