"""What llama-server's users expect of `tinyllm serve` besides the OpenAI API, checked against peers:
/metrics read by prometheus_client's own parser, /tokenize and /detokenize against SentencePiece on the
bundled tokenizer, the API key through the openai client, CORS through the headers a browser reads."""
import http.client
import json
import os
import random
import re
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, Server

pytestmark = pytest.mark.noasan
openai = pytest.importorskip("openai", reason="the server tests talk to it with the openai client")
spm = pytest.importorskip("sentencepiece")
MODEL = ROOT / "models" / "chat15M.bin"
KEY = "tl-test-key-7f3a"
ORIGIN = "http://app.example:5173"
TEXTS = ["从前有座山，山里有座庙。", "The cat sat on the mat.", "emoji 🤗 and á", "<|user|>你好<|assistant|>",
         "  two spaces\n\nand lines", ""]


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(ROOT / "models" / "tok5000.model"))


@pytest.fixture(scope="module")
def runtime():
    import tinyllm
    return tinyllm.Runtime(MODEL)


@pytest.fixture(scope="module")
def keyed_server():
    """A server that wants KEY and lets ORIGIN's pages call it; --api-key wins over TINYLLM_API_KEY."""
    env_before = os.environ.get("TINYLLM_API_KEY")
    os.environ["TINYLLM_API_KEY"] = "the-env-key-loses"
    try:
        server = Server(MODEL, "--api-key", KEY, "--cors-origin", ORIGIN)
    finally:
        if env_before is None:
            del os.environ["TINYLLM_API_KEY"]
        else:
            os.environ["TINYLLM_API_KEY"] = env_before
    yield server
    server.stop()


def request(server, method, path, body=None, headers=None):
    """(status, headers as a lower-cased dict, parsed JSON or text) of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    data = body if body is None or isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    got_headers = {k.lower(): v for k, v in resp.getheaders()}
    try:
        return resp.status, got_headers, json.loads(raw)
    except ValueError:
        return resp.status, got_headers, raw.decode("utf-8", "replace")


def assert_openai_error(body, param=None, code=None):
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    if code is not None:
        assert body["error"]["code"] == code, body


# ---- /metrics ----------------------------------------------------------------------------------------

SAMPLE_LINE = re.compile(r'[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\\n]|\\.)*",?)*\})? '
                         r'[-+]?(\d+(\.\d*)?([eE][-+]?\d+)?|NaN|Inf)')


def scrape(server, headers=None) -> dict:
    """{(sample name, frozenset of labels): value}, read with prometheus_client's parser, after a line-by-line
    check of the text format (every line a HELP, a TYPE or a sample; a TYPE before its samples)."""
    parser = pytest.importorskip("prometheus_client.parser", reason="pip install prometheus_client (the dev extra)")
    status, got_headers, text = request(server, "GET", "/metrics", headers=headers)
    assert status == 200
    assert got_headers["content-type"].startswith("text/plain; version=0.0.4")
    typed = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            assert kind in ("counter", "gauge") and name not in typed, line
            typed.add(name)
        elif not line.startswith("# HELP "):
            assert SAMPLE_LINE.fullmatch(line), line
            assert line.split("{")[0].split(" ")[0] in typed, f"no TYPE before {line}"
    samples = {}
    for family in parser.text_string_to_metric_families(text):
        for s in family.samples:
            samples[s.name, frozenset(s.labels.items())] = s.value
    return samples


def requests_count(samples, endpoint, outcome) -> float:
    return samples.get(("tinyllm_requests_total", frozenset({("endpoint", endpoint), ("outcome", outcome)})), 0)


def value(samples, name) -> float:
    return samples[name, frozenset()]


def test_metrics_count_known_requests_and_their_tokens(chat_server, runtime):
    client = openai.OpenAI(base_url=chat_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    before = scrape(chat_server)
    a = client.completions.create(model="chat15M", prompt="从前", max_tokens=7, temperature=0)
    b = client.completions.create(model="chat15M", prompt="小明和小红", max_tokens=5, temperature=0.8, seed=2,
                                  stream=True, stream_options={"include_usage": True})
    b_usage = [c.usage for c in b if c.usage][0]
    c = client.chat.completions.create(model="chat15M", messages=[{"role": "user", "content": "你好"}],
                                       max_tokens=6, temperature=0)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="chat15M", prompt="x", max_tokens=0)
    after = scrape(chat_server)

    def delta(endpoint, outcome):
        return requests_count(after, endpoint, outcome) - requests_count(before, endpoint, outcome)
    assert delta("/v1/completions", "ok") == 2 and delta("/v1/completions", "error") == 1
    assert delta("/v1/chat/completions", "ok") == 1 and delta("/v1/completions", "cancelled") == 0
    assert delta("/metrics", "ok") == 1  # the first scrape, counted when its response had gone out
    usages = [a.usage, b_usage, c.usage]
    assert value(after, "tinyllm_prompt_tokens_total") - value(before, "tinyllm_prompt_tokens_total") == \
        sum(u.prompt_tokens for u in usages)
    assert a.usage.prompt_tokens == len(runtime.encode("从前"))  # usage itself agrees with the tokenizer
    assert value(after, "tinyllm_generated_tokens_total") - value(before, "tinyllm_generated_tokens_total") == \
        sum(u.completion_tokens for u in usages)
    assert value(after, "tinyllm_generated_tokens_per_second") > 0
    health = chat_server.health()
    assert value(after, "tinyllm_slots") == health["slots"] > 0
    assert value(after, "tinyllm_busy_slots") == 0 and value(after, "tinyllm_queue_length") == 0
    assert value(after, "tinyllm_requests_active") == 0


def test_metrics_count_a_stream_cut_short_as_cancelled(chat_server, runtime):
    prompt = "今天天气很好，"
    sampling = {"prompt": prompt, "max_tokens": 240, "temperature": 1.0, "seed": 1, "repetition_penalty": 1.0}
    if request(chat_server, "POST", "/v1/completions", sampling)[2]["choices"][0]["finish_reason"] != "length":
        pytest.skip("this seed's text ends early: the stream could end before the client leaves")
    before = scrape(chat_server)
    body = json.dumps({**sampling, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", chat_server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert b"200 OK" in sock.recv(4096)
    deadline = time.monotonic() + 10
    while requests_count(after := scrape(chat_server), "/v1/completions", "cancelled") == \
            requests_count(before, "/v1/completions", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert requests_count(after, "/v1/completions", "cancelled") == \
        requests_count(before, "/v1/completions", "cancelled") + 1
    assert requests_count(after, "/v1/completions", "ok") == requests_count(before, "/v1/completions", "ok")
    assert value(after, "tinyllm_prompt_tokens_total") - value(before, "tinyllm_prompt_tokens_total") == \
        len(runtime.encode(prompt))


def test_metrics_label_unknown_paths_as_other(chat_server):
    before = scrape(chat_server)
    for i in range(3):
        assert request(chat_server, "GET", f"/no/such/path/{i}")[0] == 404
    after = scrape(chat_server)
    assert requests_count(after, "other", "error") - requests_count(before, "other", "error") == 3
    assert not [k for k in after if any("/no/such" in v for _, v in k[1])]


# ---- /tokenize and /detokenize --------------------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_tokenize_gives_sentencepieces_ids(chat_server, sp, text):
    status, _, got = request(chat_server, "POST", "/tokenize", {"content": text})
    assert status == 200 and got == {"tokens": sp.encode(text)}
    status, _, got = request(chat_server, "POST", "/tokenize", {"content": text, "add_special": True})
    assert status == 200 and got == {"tokens": [sp.bos_id()] + sp.encode(text)}


def test_tokenize_with_pieces_gives_each_tokens_text(chat_server, sp):
    text = "从前有座山 á 🤗 <|user|> The end."
    status, _, got = request(chat_server, "POST", "/tokenize",
                             {"content": text, "with_pieces": True, "add_special": True})
    assert status == 200
    assert [t["id"] for t in got["tokens"]] == [sp.bos_id()] + sp.encode(text)
    for t in got["tokens"]:
        i = t["id"]
        if sp.is_control(i):
            want = ""
        elif sp.is_byte(i):  # <0xC3>: one byte, a string only where it is a character by itself
            byte = int(sp.id_to_piece(i)[3:5], 16)
            want = chr(byte) if byte < 0x80 else [byte]
        else:
            want = sp.id_to_piece(i).replace("\u2581", " ")
        assert t["piece"] == want, (i, sp.id_to_piece(i))
    assert any(isinstance(t["piece"], list) for t in got["tokens"])  # the test did meet byte tokens


def test_tokenize_without_parse_special_keeps_role_markers_as_text(chat_server, sp):
    text = "<|user|>你好"
    user = sp.piece_to_id("<|user|>")
    assert request(chat_server, "POST", "/tokenize", {"content": text})[2]["tokens"][0] == user
    status, _, got = request(chat_server, "POST", "/tokenize", {"content": text, "parse_special": False})
    assert status == 200 and user not in got["tokens"] and sp.decode(got["tokens"]) == text


def test_detokenize_gives_sentencepieces_text(chat_server, sp):
    for text in TEXTS:
        ids = sp.encode(text)
        status, _, got = request(chat_server, "POST", "/detokenize", {"tokens": ids})
        assert status == 200 and got == {"content": sp.decode(ids)} and got["content"] == text
    rng = random.Random(0)
    whole_pieces = [i for i in range(sp.get_piece_size()) if not sp.is_byte(i)]
    for _ in range(20):  # ids no text gives, control tokens and <unk> among them
        ids = [rng.choice(whole_pieces) for _ in range(rng.randrange(1, 40))]
        assert request(chat_server, "POST", "/detokenize", {"tokens": ids})[2] == {"content": sp.decode(ids)}


@pytest.mark.parametrize("path, body, param", [
    ("/detokenize", {"tokens": "1 2 3"}, "tokens"),
    ("/detokenize", {"tokens": [1, "2"]}, "tokens.1"),
    ("/detokenize", {"tokens": [1.5]}, "tokens.0"),
    ("/detokenize", {"tokens": [True]}, "tokens.0"),
    ("/detokenize", {"tokens": [[1]]}, "tokens.0"),
    ("/detokenize", {"tokens": [702, -1]}, "tokens"),
    ("/detokenize", {"tokens": [5000]}, "tokens"),
    ("/detokenize", {"tokens": [2**40]}, "tokens"),
    ("/detokenize", {}, "tokens"),
    ("/detokenize", [1, 2], None),
    ("/tokenize", {"content": 5}, "content"),
    ("/tokenize", {"content": ["a"]}, "content"),
    ("/tokenize", {}, "content"),
    ("/tokenize", {"content": "a", "add_special": "yes"}, "add_special"),
])
def test_bad_tokenize_requests_are_400_with_openais_error_body(chat_server, path, body, param):
    status, _, got = request(chat_server, "POST", path, body)
    assert status == 400, got
    assert_openai_error(got, param=param)


def test_detokenize_names_the_bad_id(chat_server):
    status, _, got = request(chat_server, "POST", "/detokenize", {"tokens": [702, 998, 5000]})
    assert status == 400 and "tokens[2]" in got["error"]["message"] and "4999" in got["error"]["message"]


def test_tokenize_refuses_a_lone_surrogate(chat_server):
    status, _, got = request(chat_server, "POST", "/tokenize", b'{"content": "a\\udc80"}')
    assert status == 400 and "not valid Unicode" in got["error"]["message"]
    assert_openai_error(got, param="content")


def test_detokenize_refuses_a_huge_list(chat_server):
    from tinyllm.server import MAX_DETOKENIZE
    status, _, got = request(chat_server, "POST", "/detokenize", {"tokens": [0] * (MAX_DETOKENIZE + 1)})
    assert status == 400 and str(MAX_DETOKENIZE) in got["error"]["message"]
    assert_openai_error(got, param="tokens")
    status, _, got = request(chat_server, "POST", "/detokenize", {"tokens": [1] * MAX_DETOKENIZE})  # BOS: no text
    assert status == 200 and got == {"content": ""}


# ---- the API key ---------------------------------------------------------------------------------------

def test_the_right_key_works_with_the_openai_client(keyed_server, runtime):
    client = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    got = client.completions.create(model="chat15M", prompt="从前", max_tokens=12, temperature=0)
    assert got.choices[0].text == runtime.generate("从前", max_new_tokens=12, temperature=0)
    assert [m.id for m in client.models.list().data] == ["chat15M"]


@pytest.mark.parametrize("wrong", ["wrong", KEY + "x", KEY[:-1], "the-env-key-loses"])
def test_a_wrong_key_is_an_authentication_error(keyed_server, wrong):
    client = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=wrong, max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as e:
        client.chat.completions.create(model="chat15M", messages=[{"role": "user", "content": "你好"}], max_tokens=4)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/v1/models", None), ("POST", "/v1/completions", {"prompt": "x"}), ("GET", "/metrics", None),
    ("POST", "/tokenize", {"content": "x"}), ("POST", "/detokenize", {"tokens": [702]}),
    ("GET", "/v1/nothing-here", None),
])
def test_every_api_path_needs_the_key(keyed_server, method, path, body):
    for headers in ({}, {"Authorization": "Basic " + KEY}, {"Authorization": "Bearer"},
                    {"Authorization": "Bearer wrong"}):
        status, got_headers, got = request(keyed_server, method, path, body, headers)
        assert status == 401, (headers, got)
        assert_openai_error(got, code="invalid_api_key")
        assert got_headers["www-authenticate"] == "Bearer"
    status, _, _ = request(keyed_server, method, path, body, {"Authorization": "Bearer " + KEY})
    assert status == (404 if path == "/v1/nothing-here" else 200)


def test_health_and_the_page_stay_public(keyed_server):
    assert request(keyed_server, "GET", "/health")[0] == 200
    status, headers, page = request(keyed_server, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and "apiFetch" in page


def test_refused_requests_count_as_errors(keyed_server):
    auth = {"Authorization": "Bearer " + KEY}
    before = scrape(keyed_server, auth)
    request(keyed_server, "POST", "/v1/completions", {"prompt": "x"}, {"Authorization": "Bearer wrong"})
    after = scrape(keyed_server, auth)
    assert requests_count(after, "/v1/completions", "error") == requests_count(before, "/v1/completions", "error") + 1


def run_serve(*args, env=None):
    return subprocess.run([sys.executable, "-m", "tinyllm.cli", "serve", str(MODEL), *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args, env, words", [
    (["--api-key", ""], {}, "--api-key"),
    (["--api-key", "has space"], {}, "--api-key"),
    ([], {"TINYLLM_API_KEY": "bad\tkey"}, "TINYLLM_API_KEY"),  # the variable is read when no flag is given
    (["--cors-origin", "http://app.example/"], {}, "--cors-origin"),
    (["--cors-origin", "app.example"], {}, "--cors-origin"),
])
def test_bad_access_options_exit_with_one_line(args, env, words):
    r = run_serve(*args, "--port", "1", env=env)
    assert r.returncode == 1 and r.stderr.startswith("error:") and words in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ---- CORS -------------------------------------------------------------------------------------------

PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}


def cors_headers(headers: dict) -> dict:
    return {k: v for k, v in headers.items() if k.startswith("access-control-")}


def test_cors_is_off_by_default(chat_server):
    status, headers, _ = request(chat_server, "OPTIONS", "/v1/chat/completions", None,
                                 {"Origin": ORIGIN, **PREFLIGHT})
    assert status >= 400 and not cors_headers(headers)
    status, headers, _ = request(chat_server, "GET", "/v1/models", None, {"Origin": ORIGIN})
    assert status == 200 and not cors_headers(headers)


def test_cors_lets_the_given_origin_in_and_no_other(keyed_server):
    status, headers, _ = request(keyed_server, "OPTIONS", "/v1/chat/completions", None,
                                 {"Origin": ORIGIN, **PREFLIGHT})  # a preflight carries no key
    assert status == 200 and headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in headers["access-control-allow-headers"].lower()
    assert "POST" in headers["access-control-allow-methods"]
    auth = {"Authorization": "Bearer " + KEY}
    status, headers, _ = request(keyed_server, "GET", "/v1/models", None, {"Origin": ORIGIN, **auth})
    assert status == 200 and headers["access-control-allow-origin"] == ORIGIN
    status, headers, _ = request(keyed_server, "GET", "/v1/models", None, {"Origin": ORIGIN})
    assert status == 401 and headers["access-control-allow-origin"] == ORIGIN  # the page can read why
    other = "http://elsewhere.example"
    status, headers, _ = request(keyed_server, "OPTIONS", "/v1/chat/completions", None, {"Origin": other, **PREFLIGHT})
    assert status == 400 and "access-control-allow-origin" not in headers
    status, headers, _ = request(keyed_server, "GET", "/v1/models", None, {"Origin": other, **auth})
    assert status == 200 and "access-control-allow-origin" not in headers


def test_cors_star_lets_any_origin_in(runtime):
    from starlette.testclient import TestClient
    from tinyllm.server import Access, create_app
    with TestClient(create_app(runtime, "chat15M", access=Access(cors_origins=["*"]))) as client:
        r = client.options("/v1/completions", headers={"Origin": "http://any.example", **PREFLIGHT})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
        r = client.get("/v1/models", headers={"Origin": "http://any.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"


# ---- the web page asks for the key -------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.mark.slow
@pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                    reason=f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian: apt install chromium chromium-driver)")
def test_web_page_asks_for_the_key_and_then_chats(keyed_server, runtime):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-background-networking",
                "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.get(keyed_server.url + "/")
        for answer in ("wrong", KEY):  # a wrong key is asked for again
            alert = WebDriverWait(driver, 15).until(expected_conditions.alert_is_present())
            assert "--api-key" in alert.text
            alert.send_keys(answer)
            alert.accept()
        WebDriverWait(driver, 15).until(lambda d: d.find_element(By.ID, "model-name").text == "chat15M")
        driver.execute_script("document.getElementById('temperature').value = 0;"
                              "document.getElementById('max-tokens').value = 24;")
        driver.find_element(By.ID, "prompt").send_keys("你好")
        driver.find_element(By.ID, "send").click()
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#log .msg.assistant")
                                        and not d.find_elements(By.CSS_SELECTOR, "#log .msg.streaming"))
        assert not driver.find_elements(By.CSS_SELECTOR, "#log .msg.error")
        reply = driver.execute_script(
            "return document.querySelector('#log .msg.assistant .content').textContent")
        assert reply == runtime.chat([{"role": "user", "content": "你好"}], max_new_tokens=24, temperature=0)
        driver.refresh()  # the key is kept for the tab: no question this time
        WebDriverWait(driver, 15).until(lambda d: d.find_element(By.ID, "model-name").text == "chat15M")
    finally:
        driver.quit()
