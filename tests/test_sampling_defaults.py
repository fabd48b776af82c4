"""One table of sampling defaults (tinyllm.sampling.DEFAULTS / CHAT_DEFAULTS) for every entry point:
the C header `run` reads, tinyllm.Runtime and the server (tests/test_server.py and tests/test_web.py
check the server and its page)."""
import re
import subprocess

import pytest

from conftest import ROOT, RUN_BIN

MODEL = ROOT / "models" / "chat15M.bin"


def header_constants() -> dict:
    text = (ROOT / "runtime" / "tinyllm.h").read_text()
    return {name: float(value.rstrip("f")) for name, value in re.findall(r"#define (TL_\w+) ([0-9.]+f?)", text)}


def test_the_c_header_holds_the_python_table():
    from tinyllm.sampling import CHAT_DEFAULTS, DEFAULTS
    c = header_constants()
    assert (c["TL_DEFAULT_TEMPERATURE"], c["TL_DEFAULT_TOP_P"], c["TL_DEFAULT_TOP_K"]) == \
        (DEFAULTS["temperature"], DEFAULTS["top_p"], DEFAULTS["top_k"])
    assert (c["TL_CHAT_REPETITION_PENALTY"], c["TL_CHAT_REPETITION_WINDOW"], c["TL_CHAT_NO_REPEAT_NGRAM"]) == \
        (CHAT_DEFAULTS["repetition_penalty"], CHAT_DEFAULTS["repetition_window"], CHAT_DEFAULTS["no_repeat_ngram"])


def test_run_help_states_the_table():
    from tinyllm.sampling import DEFAULTS
    out = subprocess.run([RUN_BIN, "-h"], capture_output=True, text=True, timeout=30).stdout
    assert f"temperature, 0 = greedy (default {DEFAULTS['temperature']})" in out
    assert f"(default {DEFAULTS['top_p']})" in out


@pytest.mark.noasan
def test_runtime_without_arguments_samples_with_the_table():
    from tinyllm import Runtime
    from tinyllm.sampling import CHAT_DEFAULTS, DEFAULTS
    rt = Runtime(MODEL)
    table = {k: DEFAULTS[k] for k in ("temperature", "top_p", "top_k")}
    assert rt.generate("从前", max_new_tokens=30, seed=3) == rt.generate("从前", max_new_tokens=30, seed=3, **table)
    messages = [{"role": "user", "content": "你好"}]
    assert rt.chat(messages, max_new_tokens=30, seed=3) == \
        rt.chat(messages, max_new_tokens=30, seed=3, repetition_penalty=CHAT_DEFAULTS["repetition_penalty"],
                no_repeat_ngram=CHAT_DEFAULTS["no_repeat_ngram"], **table)
