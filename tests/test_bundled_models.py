"""The models shipped in models/ still are what their model card (models/README.md, card.json) says:
greedy outputs as recorded, bits/char on held-out text within 2%, C runtime and torch agreeing."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import PLAIN_GREEDY, ROOT, RUN_BIN, SHARED_DATA

MODELS = ROOT / "models"
CARD = json.loads((MODELS / "card.json").read_text(encoding="utf-8"))
pytestmark = pytest.mark.noasan
sys.path.insert(0, str(MODELS))
import measure  # noqa: E402  (models/measure.py: the held-out rules and greedy prompts of the card)
import repetition  # noqa: E402  (models/repetition.py: the loop measure and its prompts)


@pytest.fixture(scope="module")
def heldout():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"held-out text comes from {SHARED_DATA}, which is absent")
    return measure.test_slice(measure.heldout_texts(SHARED_DATA))


def test_per_source_figures_hold_out_the_cards_documents():
    """The recipe study's later mixes append sources to the card's: the documents the card holds out stay
    held out, so its bits/char and the study's per-source figures are on the same text."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"held-out text comes from {SHARED_DATA}, which is absent")
    card = measure.heldout_texts(SHARED_DATA)
    by_source = measure.heldout_by_source(SHARED_DATA)
    assert len(measure.PER_SOURCE) > len(measure.HELDOUT["inputs"])
    assert by_source["modern"] == card["modern"] and by_source["classical_novels"] == card["classical"]
    assert len(card["modern"]) == 68 and all(by_source[name] for name in by_source)


@pytest.mark.parametrize("name", sorted(CARD["models"]))
def test_greedy_output_is_the_recorded_one(name, float_path):
    """card.json's greedy text was written on the float path (vnni's rounded activations may part from it)."""
    import tinyllm
    entry = CARD["models"][name]
    rt = tinyllm.Runtime(MODELS / name)
    assert measure.greedy(rt, entry["mode"], entry["prompt"]) == entry["greedy"]


@pytest.mark.parametrize("name", [n for n in sorted(CARD["models"]) if n.endswith(".bin")])
def test_bits_per_char_on_heldout_text_is_within_2_percent_of_the_card(name, heldout):
    import tinyllm
    from tinyllm.eval import CBackend, perplexity
    backend = CBackend(tinyllm.Runtime(MODELS / name))
    for group, texts in heldout.items():
        measured = perplexity(backend, texts)["bits_per_character"]
        card = CARD["models"][name]["bits_per_char_test_slice"][group]
        assert abs(measured - card) <= 0.02 * card, (group, measured, card)


@pytest.mark.parametrize("name", [n for n in sorted(CARD["models"]) if n.endswith(".bin")])
def test_torch_on_the_exported_file_agrees_with_the_c_runtime(name, float_path):
    import torch

    import tinyllm
    from tinyllm.formats.llama2c import load_model
    rt = tinyllm.Runtime(MODELS / name)
    model = load_model(MODELS / name)  # v2: the dequantized weights the C runtime multiplies with
    ids = rt.encode("从前有一个小村庄，村子里住着一位老人。")
    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0][0].numpy()
    got = rt.logits(ids)
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-4
    assert rt.generate_ids(ids, 32, temperature=0.0) == model.generate(ids, 32, temperature=0.0, eos_id=rt.eos_id)


def test_quickstart_commands_need_neither_torch_nor_shared_data(tmp_path):
    out = subprocess.run([RUN_BIN, str(MODELS / "stories15M.bin"), "-z", str(MODELS / "tok5000.bin"),
                          "-i", "从前", "-n", "64", "-s", "1"], capture_output=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr.decode()
    story = out.stdout.decode("utf-8")
    assert story.startswith("从前") and sum("\u4e00" <= ch <= "\u9fff" for ch in story) > 20
    code = ("import sys; sys.modules['torch'] = None\n"
            "import tinyllm\n"
            f"print(tinyllm.Runtime({str(MODELS / 'stories15M.bin')!r}).generate('从前', max_new_tokens=32))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr.decode()
    assert len(out.stdout.decode().strip()) > 5


def test_chat_model_answers_through_run_chat_mode():
    out = subprocess.run([RUN_BIN, str(MODELS / "chat15M.bin"), "-m", "chat", "-t", "0", "-n", "200"],
                         input="中国的首都是哪里？\n".encode(), capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    answer = out.stdout.decode()  # stdin is a pipe: the answer alone, no "Assistant: " label
    assert sum("\u4e00" <= ch <= "\u9fff" for ch in answer) > 3


def test_bundled_files_stay_under_60_mb():
    total = sum(p.stat().st_size for p in MODELS.iterdir() if p.is_file())
    assert total < 60 * 1024 * 1024


def test_readme_first_command_does_not_echo_its_prompt():
    # issue 14.12: the story model used to continue [BOS, 从前] with 从前 (p 0.51), so README's first
    # command printed "从前从前…"; the cause was the training data (every 从前 opening of one source
    # was doubled), now said once when corpora are read (tinyllm.corpus.collapse_repeated_opening).
    import tinyllm
    for name in ("stories15M.bin", "stories15M_q8_0.gguf"):
        rt = tinyllm.Runtime(MODELS / name)
        logits = rt.logits(rt.encode("从前", bos=True))[-1]
        p = np.exp(logits - logits.max())
        p /= p.sum()
        echo = rt.encode("从前", bos=False)
        assert len(echo) == 1 and p[echo[0]] < 0.1 and int(np.argmax(p)) != echo[0], (name, p[echo[0]])
    stories = [subprocess.run([RUN_BIN, str(MODELS / "stories15M.bin"), "-z", str(MODELS / "tok5000.bin"), "-i", "从前",
                               "-n", "24", "-s", str(seed)], capture_output=True, timeout=60).stdout.decode()
               for seed in range(1, 11)]
    assert sum(s.startswith("从前从前") for s in stories) <= 1, stories


@pytest.mark.parametrize("name", ["stories15M.bin", "chat15M.bin"])
def test_greedy_text_does_not_loop_with_the_default_repetition_controls(name, float_path):
    """Issue 15.5 on a few of models/repetition.py's prompts: 200 greedy tokens keep most of their character
    4-grams distinct with the defaults, and loop without the controls (the measure can fail)."""
    import tinyllm
    rt = tinyllm.Runtime(MODELS / name)
    mode, prompts = repetition.MODELS_MODES[name]
    prompts = prompts[:4]
    with_controls = repetition.measure(rt, mode, prompts, dict(temperature=0.0), seeds=[1] * len(prompts))
    plain = repetition.measure(rt, mode, prompts, PLAIN_GREEDY, seeds=[1] * len(prompts))
    assert all(r["distinct"] == 1.0 and r["distinct_chars"] >= 0.75 for r in with_controls), with_controls
    assert min(r["distinct_chars"] for r in plain) < 0.5, plain

