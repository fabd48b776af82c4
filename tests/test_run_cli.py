"""The `run` command as a user meets it: llama2.c's meaning of -n, flags out of range refused, threads
capped, chat from a pipe and from a terminal, lines of any length and bad lines skipped, and a missing
tokenizer explained (issues 14.4, 14.9, 14.15, 13.8, 13.9)."""
import os
import pty
import subprocess

import pytest

from conftest import PLAIN_GREEDY_RUN, RUN_BIN, write_synthetic_tokenizer


def run_cli(*args, stdin=b"", cwd=None):
    return subprocess.run([RUN_BIN, *map(str, args)], capture_output=True, input=stdin, timeout=60, cwd=cwd)


@pytest.fixture
def model(model_file, tmp_path):
    """(config, torch model, model path, tok.bin path): a random model whose pieces are one character each."""
    cfg, torch_model, path = model_file("mha_tied", 1)
    tok = tmp_path / "tok.bin"
    write_synthetic_tokenizer(tok, cfg.vocab_size)
    return cfg, torch_model, path, tok


def _one_line_error(out, *words):
    err = out.stderr.decode()
    assert out.returncode != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: "), err
    for w in words:
        assert w in err, err


# ---- -n: llama2.c's steps (14.15) --------------------------------------------------------------------------

def test_n_counts_positions_as_llama2c_does(model_file, tmp_path):
    """llama2.c runs `while (pos < steps)` from BOS at position 0, printing the token each position gives
    (prompt tokens first): -n N prints N tokens in all. The torch model gives the greedy tokens (this
    shape's greedy path starts with a piece, not BOS)."""
    cfg, torch_model, path = model_file("mqa_separate_classifier", 1)
    tok = tmp_path / "tok.bin"
    pieces = write_synthetic_tokenizer(tok, cfg.vocab_size)
    greedy = torch_model.generate([1], 40, temperature=0.0, eos_id=2)
    assert len(greedy) == 40 and 2 not in greedy and greedy[0] != 1 and greedy[-1] != 1
    expected = b"".join(pieces[t] for t in greedy if t != 1).decode()  # BOS decodes to nothing
    out = run_cli(path, "-z", tok, *PLAIN_GREEDY_RUN, "-n", 40)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().rstrip("\n") == expected
    # a prompt counts: BOS + 1 prompt token, then 39 sampled, 40 printed
    out = run_cli(path, "-z", tok, *PLAIN_GREEDY_RUN, "-n", 40, "-i", pieces[greedy[0]].decode())
    assert out.stdout.decode().rstrip("\n") == expected


# ---- degenerate sampling flags (13.8) --------------------------------------------------------------------

@pytest.mark.parametrize("flag, value, words", [
    ("-s", "-1", ["-s"]), ("-s", "18446744073709551616", ["-s"]), ("-r", "nan", ["repetition_penalty"]),
    ("-r", "-5", ["repetition_penalty"]), ("-j", "4294967297", ["-j"]), ("-k", "4294967297", ["-k"]),
    ("-g", "4294967300", ["-g"]), ("-n", "4294967336", ["-n"]), ("-t", "nan", ["temperature"]),
    ("-t", "1e39", ["temperature"]), ("-p", "nan", ["top_p"]), ("-j", "-2", ["-j"]), ("-c", "f8", ["-c", "f16"]),
])
def test_out_of_range_flags_are_refused_not_changed(model, flag, value, words):
    _cfg, _m, path, tok = model
    _one_line_error(run_cli(path, "-z", tok, flag, value, "-n", 5), *words)


def test_tiny_temperature_is_greedy_not_unknown_tokens(model):
    _cfg, _m, path, tok = model
    greedy = run_cli(path, "-z", tok, "-t", "0", "-n", 30)
    for t in ("1e-45", "1e-38"):
        out = run_cli(path, "-z", tok, "-t", t, "-n", 30, "-s", 3)
        assert out.returncode == 0 and out.stdout == greedy.stdout and "\u2047".encode() not in out.stdout, t


def test_c_sampler_treats_a_temperature_that_overflows_the_logits_as_greedy():
    from capi import check, ffi, lib
    for temperature in (1e-38, 1e-45, 1e-30):
        params = ffi.new("tl_sample_params *", {"temperature": temperature, "top_p": 1.0, "seed": 5})
        sampler = ffi.new("tl_sampler **")
        check(lib.tl_sampler_new(5, params, sampler))
        for logits in ([1.0, 9.0, 3.0, -2.0, 0.5], [-7.0, -1.0, -3.0, -9.0, -4.0]):
            assert lib.tl_sampler_sample(sampler[0], ffi.new("float[]", logits)) == 1, (temperature, logits)
        lib.tl_sampler_free(sampler[0])


def test_an_f16_kv_cache_keeps_the_greedy_text(model):
    """-c f16 halves the KV cache; greedy text on this model stays the f32 cache's (the Python runtime's
    test holds the f16 logits to torch)."""
    _cfg, _m, path, tok = model
    half = run_cli(path, "-z", tok, "-t", "0", "-n", 40, "-c", "f16")
    assert half.returncode == 0 and half.stdout == run_cli(path, "-z", tok, "-t", "0", "-n", 40).stdout


def test_threads_beyond_the_cpus_are_capped_with_a_warning(model):
    from capi import lib
    _cfg, _m, path, tok = model
    cpus = len(os.sched_getaffinity(0))
    out = run_cli(path, "-z", tok, "-t", "0", "-n", 10, "-j", 1000)
    err = out.stderr.decode()
    assert out.returncode == 0 and f"warning: -j 1000 is more than the {cpus} CPUs" in err, err
    assert out.stdout == run_cli(path, "-z", tok, "-t", "0", "-n", 10, "-j", 1).stdout
    lib.tl_set_threads(1000)
    try:
        assert lib.tl_get_threads() == cpus
    finally:
        lib.tl_set_threads(0)


def test_runtime_warns_when_threads_are_capped(model):
    import tinyllm
    _cfg, _m, path, tok = model
    with pytest.warns(UserWarning, match="threads=1000 is more than"):
        tinyllm.Runtime(path, tok, threads=1000)
    tinyllm.Runtime(path, tok, threads=1)  # and back to one


# ---- a missing tokenizer (14.9) ---------------------------------------------------------------------------

def test_missing_tokenizer_names_every_path_tried_and_z(model, tmp_path):
    _cfg, _m, path, _tok = model
    lone = tmp_path / "my" / "tiny.bin"
    lone.parent.mkdir()
    lone.write_bytes(path.read_bytes())
    out = run_cli(lone, "-n", 5, cwd=tmp_path)  # no tok<vocab>.bin beside it, no ./tokenizer.bin
    _one_line_error(out, str(lone.parent / f"tok{_cfg.vocab_size}.bin"), "./tokenizer.bin", "-z")


# ---- chat mode (14.4, 13.9) --------------------------------------------------------------------------------

def test_chat_from_a_pipe_prints_the_answers_alone_ending_in_a_newline(model):
    _cfg, _m, path, tok = model
    out = run_cli(path, "-z", tok, "-m", "chat", "-n", 60, "-s", 1, stdin="丁七\n".encode())
    text = out.stdout.decode()
    assert out.returncode == 0, out.stderr.decode()
    assert text.strip() and "User:" not in text and "Assistant:" not in text and text.endswith("\n")


def test_chat_on_a_terminal_labels_the_turns(model):
    import select
    _cfg, _m, path, tok = model
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdin, stdout and stderr are the terminal
        os.execv(RUN_BIN, [RUN_BIN, str(path), "-z", str(tok), "-m", "chat", "-n", "30", "-s", "1"])
    os.write(fd, "丁七\n".encode())
    output = b""
    while b"full" not in output and select.select([fd], [], [], 30)[0]:  # the answer fills the context
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child has exited
            break
        if not chunk:
            break
        output += chunk
    os.kill(pid, 9) if b"full" not in output else None
    os.waitpid(pid, 0)
    os.close(fd)
    text = output.decode("utf-8", errors="replace")
    assert "User: " in text and "Assistant: " in text and "context of 30 tokens is full" in text, text


def test_chat_reads_a_line_longer_than_4095_bytes_whole(model):
    """Two ASCII letters then 3,000 two-byte characters: a 4,096-byte buffer would cut the line inside a
    character. None of them is a piece, so the line is one <unk> and fits the context."""
    _cfg, _m, path, tok = model
    line = "aa" + "é" * 3000
    out = run_cli(path, "-z", tok, "-m", "chat", "-n", 60, "-s", 1, stdin=(line + "\n").encode())
    err = out.stderr.decode()
    assert out.returncode == 0 and "UTF-8" not in err, err
    assert out.stdout.decode().strip()


@pytest.mark.parametrize("bad, words", [(b"\xe4\xb8\n", ["line 1", "UTF-8", "skipped"]),
                                        ("丁\0七\n".encode(), ["line 1", "NUL", "skipped"])])
def test_a_bad_chat_line_is_reported_and_the_conversation_goes_on(model, bad, words):
    _cfg, _m, path, tok = model
    out = run_cli(path, "-z", tok, "-m", "chat", "-n", 60, "-s", 1, stdin=bad + "丁七\n".encode())
    err = out.stderr.decode()
    assert "Traceback" not in err and all(w in err for w in words), err
    assert out.stdout.decode().strip()  # the next line was answered
    assert out.returncode == 1  # a skipped line is still reported in the exit status
