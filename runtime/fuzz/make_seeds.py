"""Seed inputs for the libFuzzer harnesses in runtime/fuzz/, written with the project's own exporters.

    python runtime/fuzz/make_seeds.py build/fuzz/seeds     (what `make fuzz-build` runs)

Writes <out>/llama2c (v0/v1/v2 model files), <out>/gguf (F32, F16, Q8_0, Q4_0, with and without a
tokenizer; dense and mixture-of-experts), <out>/tokbin (tok.bin files) and <out>/encode (text), plus the crafted good and bad files
of runtime/fuzz/crafted.py (crafted_* in llama2c, gguf and tokbin). Every seed stays under 64 KB (tiny
dims) so that the fuzzers run thousands of inputs a second. The tiny models and tokenizers come from
the test helpers (tests/conftest.py, tests/test_gguf.py), so seeds follow the formats as tested.
"""
import gzip
import itertools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "runtime" / "fuzz"))  # crafted.py: the hand-built corpus of both loaders

import conftest  # noqa: E402  (tests/ helpers: random_model, write_synthetic_tokenizer, SHARED_DATA)
from test_gguf import tiny_gguf  # noqa: E402  (a hand-built 1-layer GGUF, independent of our writer)

MAX_SEED = 64 * 1024

# shapes small enough for 64 KB files; "fuzz_q32" has rows of 32 values for GGUF's Q8_0/Q4_0 blocks
conftest.SHAPES.update({
    "fuzz_tied": dict(dim=8, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=16, hidden_dim=16, max_seq_len=8),
    "fuzz_gqa": dict(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=19, hidden_dim=24, max_seq_len=6),
    "fuzz_untied": dict(dim=8, n_layers=1, n_heads=1, n_kv_heads=1, vocab_size=11, hidden_dim=8, max_seq_len=4,
                        tie_embeddings=False),
    "fuzz_q32": dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=16, hidden_dim=32, max_seq_len=8),
    # mixture-of-experts GGUF (router + *_exps tensors): top-1 of 4 over 2 layers, top-2 of 3 in Q8_0/Q4_0 blocks
    "fuzz_moe": dict(dim=8, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=11, hidden_dim=8, max_seq_len=6,
                     n_experts=4, n_experts_active=1),
    "fuzz_moe_q32": dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=16, hidden_dim=32, max_seq_len=8,
                         n_experts=3, n_experts_active=2),
})

TEXTS = [
    "Hello, world!",
    "  leading spaces, double  spaces and a trailing one ",
    "Once upon a time there was a tiny model.\n",
    "从前有一只小猫，它很喜欢在花园里玩。",
    "今天天气很好，我们去公园散步吧！",
    "<|system|>\n你是一个乐于助人的助手。\n<|user|>\n你好\n<|assistant|>\n你好！有什么可以帮你的吗？</s>",
    "<s>special pieces as plain text</s><unk>",
    "\u2581literal U+2581 marks\u2581\u2581",
    "emoji 😀 and rare 𠀋 characters, tabs\tand\r\nline ends",
    "混合 mixed 文本 text 123 ４５６",
    "",
]


def write(path: Path, data: bytes):
    assert len(data) <= MAX_SEED, f"seed {path} is {len(data)} bytes; keep seeds under {MAX_SEED}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def llama2c_seeds(out: Path, tmp: Path):
    from tinyllm.formats.llama2c import write_model
    for shape in ("fuzz_tied", "fuzz_gqa", "fuzz_untied"):
        cfg, model = conftest.random_model(shape)
        for version in (0, 1, 2):
            path = tmp / f"{shape}_v{version}.bin"
            write_model(path, model, cfg, version=version, group_size=4 if version == 2 else None)
            write(out / path.name, path.read_bytes())


def gguf_seeds(out: Path, tmp: Path):
    from tinyllm.formats.gguf import write_gguf
    for shape in ("fuzz_tied", "fuzz_untied", "fuzz_q32", "fuzz_moe", "fuzz_moe_q32"):
        cfg, model = conftest.random_model(shape)
        tok = tmp / f"tok{cfg.vocab_size}.bin"
        conftest.write_synthetic_tokenizer(tok, cfg.vocab_size)
        types = ("f32", "f16", "q8_0", "q4_0") if cfg.dim % 32 == 0 else ("f32", "f16")
        for type_ in types:
            path = tmp / f"{shape}_{type_}.gguf"
            write_gguf(path, model, cfg, tokenizer=tok, type=type_, chat_template=None)
            write(out / path.name, path.read_bytes())
        path = tmp / f"{shape}_notok.gguf"
        write_gguf(path, model, cfg, tokenizer=None)
        write(out / path.name, path.read_bytes())
    write(out / "hand_built_v3.gguf", tiny_gguf(vocab=20))
    write(out / "hand_built_v2.gguf", tiny_gguf(version=2, vocab=20))
    write(out / "hand_built_q8_0.gguf", tiny_gguf(tensor_type=8, vocab=20))


def tokbin_seeds(out: Path, tmp: Path):
    for vocab in (4, 16, 40):
        path = tmp / f"synthetic{vocab}.bin"
        conftest.write_synthetic_tokenizer(path, vocab)
        write(out / path.name, path.read_bytes())
        data = path.read_bytes()  # the same pieces without our trailer: llama2.c's own layout
        write(out / f"synthetic{vocab}_notrailer.bin", data[:data.index(b"tltk")])
    real = (ROOT / "models" / "tok5000.bin").read_bytes()  # the bundled tokenizer: byte pieces, merges
    write(out / "tok5000.bin", real)
    write(out / "tok5000_notrailer.bin", real[:-(5000 + 16)])


def crafted_seeds(out: Path):
    """The crafted good and bad files of tests/test_reader_verdicts.py (runtime/fuzz/crafted.py): inputs
    next to every rule the loaders check, for the fuzzers to mutate from."""
    import crafted
    for name, data, _ in crafted.model_cases():
        write(out / ("gguf" if data[:4] == b"GGUF" else "llama2c") / f"crafted_{name}", data)
    for name, data, _ in crafted.tokbin_cases():
        write(out / "tokbin" / f"crafted_{name}", data)


def encode_seeds(out: Path):
    texts = list(TEXTS)
    stories = conftest.SHARED_DATA / "pretrain" / "tiny_chinese_stories_simplified.jsonl.gz"
    if stories.is_file():  # a few real lines when the shared corpus is there (never copied into the repo)
        with gzip.open(stories, "rt", encoding="utf-8") as f:
            texts += [json.loads(line)["text"][:400] for line in itertools.islice(f, 8)]
    for i, text in enumerate(texts):
        write(out / f"text{i:02d}.txt", text.encode("utf-8"))
    write(out / "invalid_utf8.txt", b"ok \xff\xfe \xc0\xaf \xed\xa0\x80 \xf4\x90\x80\x80 \xe4\xbd")


def main():
    import tempfile
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "build" / "fuzz" / "seeds")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        llama2c_seeds(out / "llama2c", tmp)
        gguf_seeds(out / "gguf", tmp)
        tokbin_seeds(out / "tokbin", tmp)
        crafted_seeds(out)
        encode_seeds(out / "encode")
    for sub in ("llama2c", "gguf", "tokbin", "encode"):
        files = list((out / sub).iterdir())
        print(f"{out / sub}: {len(files)} seeds, largest {max(f.stat().st_size for f in files)} bytes")


if __name__ == "__main__":
    main()
