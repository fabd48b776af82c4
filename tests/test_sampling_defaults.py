"""One table of sampling defaults (tinyllm.sampling.DEFAULTS) for every entry point, generation and
chat alike: the C header `run` reads, tinyllm.Runtime and the server (tests/test_server.py and
tests/test_web.py check the server and its page)."""
import re
import subprocess

import pytest

from conftest import PLAIN_GREEDY, ROOT, RUN_BIN

MODEL = ROOT / "models" / "chat15M.bin"
STORY_MODEL = ROOT / "models" / "stories15M.bin"


def header_constants() -> dict:
    text = (ROOT / "runtime" / "tinyllm.h").read_text()
    return {name: float(value.rstrip("f")) for name, value in re.findall(r"#define (TL_\w+) ([0-9.]+f?)", text)}


def test_the_c_header_holds_the_python_table():
    from tinyllm.sampling import DEFAULTS, REPETITION_WINDOW
    c = header_constants()
    assert (c["TL_DEFAULT_TEMPERATURE"], c["TL_DEFAULT_TOP_P"], c["TL_DEFAULT_TOP_K"]) == \
        (DEFAULTS["temperature"], DEFAULTS["top_p"], DEFAULTS["top_k"])
    assert (c["TL_DEFAULT_REPETITION_PENALTY"], c["TL_DEFAULT_REPETITION_WINDOW"], c["TL_DEFAULT_NO_REPEAT_NGRAM"]) == \
        (DEFAULTS["repetition_penalty"], REPETITION_WINDOW, DEFAULTS["no_repeat_ngram"])


def test_run_help_states_the_table():
    from tinyllm.sampling import DEFAULTS, REPETITION_WINDOW
    out = subprocess.run([RUN_BIN, "-h"], capture_output=True, text=True, timeout=30).stdout
    assert f"temperature, 0 = greedy (default {DEFAULTS['temperature']})" in out
    assert f"(default {DEFAULTS['top_p']})" in out
    assert f"repetition penalty for the last {REPETITION_WINDOW} tokens, 1 = off (default " \
           f"{DEFAULTS['repetition_penalty']})" in out
    assert f"n-gram of this size, 0 = off (default {DEFAULTS['no_repeat_ngram']})" in out


@pytest.mark.noasan
def test_run_generates_with_the_repetition_controls_unless_told():
    """Greedy from 从前, the bundled story model loops without them (models/repetition.py)."""
    def run(*flags):
        r = subprocess.run([RUN_BIN, str(STORY_MODEL), "-t", "0", "-n", "60", "-i", "从前", *flags],
                           capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout
    from tinyllm.sampling import DEFAULTS
    default = run()
    assert default == run("-r", str(DEFAULTS["repetition_penalty"]), "-g", str(DEFAULTS["no_repeat_ngram"]))
    assert default != run("-r", "1", "-g", "0")


@pytest.mark.noasan
def test_runtime_without_arguments_samples_with_the_table():
    from tinyllm import Runtime
    from tinyllm.sampling import DEFAULTS
    rt = Runtime(MODEL)
    messages = [{"role": "user", "content": "你好"}]
    assert rt.generate("从前", max_new_tokens=30, seed=3) == rt.generate("从前", max_new_tokens=30, seed=3, **DEFAULTS)
    assert rt.chat(messages, max_new_tokens=30, seed=3) == rt.chat(messages, max_new_tokens=30, seed=3, **DEFAULTS)
    story = Runtime(STORY_MODEL)
    assert story.generate("从前", 60, temperature=0) == story.generate("从前", 60, **{**DEFAULTS, "temperature": 0})
    assert story.generate("从前", 60, temperature=0) != story.generate("从前", 60, **PLAIN_GREEDY)
