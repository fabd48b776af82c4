"""The web chat page (tinyllm/web/index.html) in headless Chromium against a real `tinyllm serve` of the
bundled chat model: it loads without touching other hosts, streams an answer token by token that matches
the Python runtime's greedy answer, and Stop keeps the partial answer without upsetting the server.

Needs Debian's chromium and chromium-driver (/usr/bin) and selenium; skipped without them. Selenium is
never allowed to look for (or download) a driver: the Service names /usr/bin/chromedriver."""
import json
import os
import struct
import time
import urllib.error
import urllib.request

import pytest

from conftest import ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
MODEL = ROOT / "models" / "chat15M.bin"
SCREENSHOT = ROOT / "build" / "screenshots" / "web_chat.png"

if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian: apt install chromium chromium-driver)",
                allow_module_level=True)
pytest.importorskip("selenium", reason="needs selenium (pip install selenium)")
pytest.importorskip("fastapi", reason="`tinyllm serve` needs fastapi and uvicorn (pip install 'tinyllm[serve]')")
pytest.importorskip("uvicorn", reason="`tinyllm serve` needs fastapi and uvicorn (pip install 'tinyllm[serve]')")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = [pytest.mark.noasan, pytest.mark.slow]

# questions for the streamed-answer test: the first whose greedy answer is long enough to arrive in
# several batches (the server sends up to 16 tokens per batch) is used, so retraining cannot make it moot
QUESTIONS = ["给我讲一个关于小猫的故事。", "怎样才能保持健康？", "天空为什么是蓝色的？", "你好，请介绍一下你自己。"]
MIN_ANSWER_TOKENS = 48
MAX_TOKENS = 96  # long enough to arrive in several network chunks (the server sends batches of tokens)


# ---- fixtures -------------------------------------------------------------------------------------

def _get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.headers.get("content-type", ""), json.load(r)


@pytest.fixture(scope="module")
def server(chat_server):
    """Base URL of `tinyllm serve models/chat15M.bin` (conftest's chat_server), ready."""
    return chat_server.url


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's binary and driver; nothing is downloaded), browser console logged."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,800",
                "--disable-background-networking", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


# ---- helpers --------------------------------------------------------------------------------------

def open_page(driver, base: str):
    """Load the page fresh and wait until it shows the model's name (its first request answered)."""
    driver.get(base + "/")
    WebDriverWait(driver, 15).until(lambda d: d.find_element(By.ID, "model-name").text == "chat15M")


def set_value(driver, element_id: str, value):
    """Set an input's value as a user would: the page hears the input and change events."""
    driver.execute_script("""
        const el = document.getElementById(arguments[0]);
        el.value = arguments[1];
        el.dispatchEvent(new Event('input', {bubbles: true}));
        el.dispatchEvent(new Event('change', {bubbles: true}));""", element_id, str(value))


def record_lengths(driver):
    """From now on, note [text length, streaming?, Send disabled?, Stop disabled?] of the last assistant
    message every millisecond or so. The sampling runs in the page, since a 15M model writes tokens
    faster than WebDriver round trips could sample; it runs as timer tasks, so it sees the text only
    as whole network chunks left it: an answer sent in one piece would show a single length."""
    driver.execute_script("""
        const log = document.getElementById('log');
        window.__lengths = [];
        clearInterval(window.__sampler);
        window.__sampler = setInterval(() => {
            const replies = log.querySelectorAll('.msg.assistant');
            const last = replies[replies.length - 1];
            if (last) window.__lengths.push([last.querySelector('.content').textContent.length,
                                             last.classList.contains('streaming'),
                                             document.getElementById('send').disabled,
                                             document.getElementById('stop').disabled]);
        }, 1);""")


def type_and_send(driver, text: str):
    prompt = driver.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys(text)
    driver.find_element(By.ID, "send").click()


def last_reply(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#log .msg.assistant")[-1]


def reply_text(driver, element) -> str:
    # textContent: the text exactly as streamed (WebDriver's .text normalizes whitespace)
    return driver.execute_script("return arguments[0].querySelector('.content').textContent", element)


def wait_until_idle(driver, timeout: float = 30):
    """Wait until no reply is streaming; returns the last assistant message."""
    WebDriverWait(driver, timeout, poll_frequency=0.05).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#log .msg.assistant")
        and not d.find_elements(By.CSS_SELECTOR, "#log .msg.streaming"))
    return last_reply(driver)


def classes(element) -> set[str]:
    return set(element.get_attribute("class").split())


def errors_shown(driver) -> list[str]:
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#log .msg.error")]


# ---- tests ----------------------------------------------------------------------------------------

def test_page_loads_offline_clean(server, browser):
    with urllib.request.urlopen(server + "/", timeout=5) as r:
        assert r.status == 200 and r.headers["content-type"].startswith("text/html")

    browser.get_log("browser")  # drop whatever an earlier page logged
    open_page(browser, server)
    for selector in ("textarea#prompt", "button#send", "button#stop", "input#temperature", "input#top-p",
                     "input#max-tokens", "textarea#system", "button#new-chat", "div#log", "span#model-name"):
        assert browser.find_elements(By.CSS_SELECTOR, selector), f"no {selector} on the page"
    assert browser.find_element(By.ID, "send").is_enabled()
    assert not browser.find_element(By.ID, "stop").is_enabled()  # nothing to stop yet

    # Every request the page made (the page itself, then its fetches) went to the server it came from:
    # no CDN, web font or image from elsewhere, so it works offline.
    urls = browser.execute_script(
        "return performance.getEntriesByType('navigation').concat(performance.getEntriesByType('resource'))"
        ".map(e => e.name)")
    assert any(u.endswith("/v1/models") for u in urls), urls  # the entries are there to be checked
    assert [u for u in urls if not u.startswith(server + "/")] == []

    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == [], severe


def test_streamed_greedy_answer_matches_runtime(server, browser):
    from tinyllm import Runtime
    rt = Runtime(str(MODEL))
    answers = {q: rt.chat([{"role": "user", "content": q}], max_new_tokens=MAX_TOKENS, temperature=0.0)
               for q in QUESTIONS}
    long_enough = [q for q in QUESTIONS if len(rt.encode(answers[q], bos=False)) >= MIN_ANSWER_TOKENS]
    assert long_enough, f"no greedy answer of {MIN_ANSWER_TOKENS}+ tokens to watch streaming: {answers}"
    question = long_enough[0]
    expected = answers[question]

    open_page(browser, server)
    set_value(browser, "temperature", 0)
    set_value(browser, "max-tokens", MAX_TOKENS)
    assert browser.find_element(By.ID, "temperature-value").text.startswith("0")  # the slider shows its value
    record_lengths(browser)
    type_and_send(browser, question)

    reply = wait_until_idle(browser)
    lengths = browser.execute_script("clearInterval(window.__sampler); return window.__lengths")
    assert errors_shown(browser) == []
    assert browser.find_element(By.ID, "send").is_enabled() and not browser.find_element(By.ID, "stop").is_enabled()
    streamed = {n for n, streaming, _, _ in lengths if streaming and n > 0}
    assert len(streamed) >= 2, f"the answer did not arrive piece by piece: {lengths}"
    # while it streamed, Send was off and Stop on
    assert all(send_off and not stop_off for _, streaming, send_off, stop_off in lengths if streaming), lengths

    users = browser.find_elements(By.CSS_SELECTOR, "#log .msg.user")
    assert [u.text for u in users] == [question]
    assert "stopped" not in classes(reply)
    assert reply_text(browser, reply) == expected

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT))
    png = SCREENSHOT.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
    assert width >= 800 and height >= 500


def test_stop_keeps_partial_answer(server, browser):
    open_page(browser, server)
    set_value(browser, "temperature", 1)
    set_value(browser, "max-tokens", 200)

    # Stop is pressed by the page's first rendering of text: a 15M model may finish a short answer
    # before a WebDriver click could land. An answer that ends within its first rendering cannot be
    # stopped at all, so such an attempt is repeated.
    for _attempt in range(6):
        browser.execute_script("""
            const log = document.getElementById('log');
            if (window.__stopper) window.__stopper.disconnect();
            window.__stopper = new MutationObserver(() => {
                const streaming = log.querySelector('.msg.assistant.streaming .content');
                if (streaming && streaming.textContent) {
                    window.__stopper.disconnect();
                    document.getElementById('stop').click();
                }
            });
            window.__stopper.observe(log, {subtree: true, childList: true, characterData: true});""")
        type_and_send(browser, "请给我讲一个很长的故事。")
        reply = wait_until_idle(browser, timeout=10)
        if "stopped" in classes(reply):
            break
        browser.find_element(By.ID, "new-chat").click()  # keep the conversation short for the next try
    else:
        pytest.fail("every answer was complete before Stop could be pressed")

    assert errors_shown(browser) == []
    assert reply_text(browser, reply), "the partial answer is gone"
    assert "stopped" in reply.text  # the note that says so
    assert browser.find_element(By.ID, "send").is_enabled() and not browser.find_element(By.ID, "stop").is_enabled()

    # The server noticed the client went away and is fine.
    status, _, health = _get_json(server + "/health")
    assert status == 200 and health["status"] == "ok"
    if "active" in health:  # generations running: the aborted one must end (its KV cache freed)
        deadline = time.monotonic() + 5
        while health["active"] and time.monotonic() < deadline:
            time.sleep(0.1)
            health = _get_json(server + "/health")[2]
        assert health["active"] == 0, health

    # The next message gets an answer. Shift+Enter is a new line, Enter sends.
    set_value(browser, "temperature", 0)
    set_value(browser, "max-tokens", 16)
    n_replies = len(browser.find_elements(By.CSS_SELECTOR, "#log .msg.assistant"))
    prompt = browser.find_element(By.ID, "prompt")
    prompt.send_keys("谢谢。", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "再见！")
    assert prompt.get_attribute("value") == "谢谢。\n再见！"
    prompt.send_keys(Keys.ENTER)
    WebDriverWait(browser, 10).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#log .msg.assistant")) == n_replies + 1)
    reply = wait_until_idle(browser)
    assert errors_shown(browser) == []
    assert browser.execute_script(
        "const u = document.querySelectorAll('#log .msg.user'); return u[u.length - 1].textContent") == "谢谢。\n再见！"
    assert prompt.get_attribute("value") == ""
    assert reply_text(browser, reply).strip()
    assert not classes(reply) & {"stopped", "streaming"}


def test_refused_request_shows_the_servers_message(server, browser):
    open_page(browser, server)
    set_value(browser, "max-tokens", 100_000)  # more than the model's context: the server refuses it
    req = urllib.request.Request(server + "/v1/chat/completions", method="POST",
                                 headers={"Content-Type": "application/json"},
                                 data=json.dumps({"messages": [{"role": "user", "content": "你好"}], "stream": True,
                                                  "max_tokens": 100_000}).encode())
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=5)
    assert 400 <= refused.value.code < 500
    message = json.load(refused.value)["error"]["message"]

    type_and_send(browser, "你好")
    WebDriverWait(browser, 10).until(lambda d: errors_shown(d))
    assert errors_shown(browser) == [f"Error: {message}"]
    assert browser.find_elements(By.CSS_SELECTOR, "#log .msg.assistant") == []  # no empty bubble left
    # the unanswered question is not part of the conversation any more; its text is back for editing
    assert "unsent" in classes(browser.find_element(By.CSS_SELECTOR, "#log .msg.user"))
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "你好"
    assert browser.find_element(By.ID, "send").is_enabled()

    # New chat clears the log; the next request works
    browser.find_element(By.ID, "new-chat").click()
    assert browser.find_elements(By.CSS_SELECTOR, "#log > *") == []
    set_value(browser, "max-tokens", 8)
    browser.find_element(By.ID, "send").click()
    reply = wait_until_idle(browser)
    assert errors_shown(browser) == [] and reply_text(browser, reply)


def test_sliders_start_at_the_servers_sampling_defaults(server, browser):
    from tinyllm.sampling import DEFAULTS
    open_page(browser, server)
    assert float(browser.find_element(By.ID, "temperature").get_attribute("value")) == DEFAULTS["temperature"]
    assert float(browser.find_element(By.ID, "top-p").get_attribute("value")) == DEFAULTS["top_p"]


def test_page_speaks_chinese_to_a_chinese_browser_and_switches_to_english(server):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--lang=zh-CN",
                "--disable-background-networking", "--no-first-run"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"intl.accept_languages": "zh-CN,zh"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        open_page(driver, server)
        assert driver.execute_script("return navigator.language").startswith("zh")
        assert driver.find_element(By.ID, "send").text == "发送"
        assert driver.find_element(By.ID, "new-chat").text == "新对话"
        assert "Enter" in driver.find_element(By.ID, "prompt").get_attribute("placeholder")
        assert "输入" in driver.find_element(By.ID, "prompt").get_attribute("placeholder")
        driver.find_element(By.ID, "lang").click()
        assert driver.find_element(By.ID, "send").text == "Send"
        assert driver.find_element(By.ID, "new-chat").text == "New chat"
        assert driver.find_element(By.ID, "model-name").text == "chat15M"
        driver.find_element(By.ID, "lang").click()
        assert driver.find_element(By.ID, "send").text == "发送"
    finally:
        driver.quit()


def test_page_speaks_english_to_an_english_browser(server, browser):
    open_page(browser, server)
    assert browser.execute_script("return navigator.language").startswith("en")
    assert browser.find_element(By.ID, "send").text == "Send"
    assert browser.find_element(By.ID, "lang").text == "中文"
