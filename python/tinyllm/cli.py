"""The `tinyllm` command: one subcommand per stage of the pipeline.

    tinyllm tokenizer train   raw text -> SentencePiece .model + the runtime's tok{N}.bin
    tinyllm data prepare      raw text -> token shards + meta.json
    tinyllm pretrain          shards -> checkpoint
    tinyllm sft               checkpoint + chat data -> fine-tuned checkpoint (loss on answers)
    tinyllm dpo               checkpoint + preference pairs -> DPO checkpoint (`dpo make-pairs` builds pairs)
    tinyllm export            checkpoint -> llama2.c .bin (verified against the C runtime)
    tinyllm sample            checkpoint -> text (torch, for a quick look)
    tinyllm eval              perplexity, bits/char, C-Eval accuracy, generations (torch or C runtime)
    tinyllm serve             model -> OpenAI-compatible HTTP API and web chat page (C runtime)

A stage is a module (or object) with HELP, optionally DESCRIPTION, add_arguments(parser) and run(args)
-> exit code; add it to STAGES (or to a group in GROUPS) and it becomes a subcommand.
Errors the user can fix print `error: <what> (<file>)` and exit 1, without a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from pathlib import Path

from .config import config_fields
from .corpus import parse_drop_filters, parse_source, planned_texts
from .data import prepare
from .errors import TinyLLMError
from .formats.convert import convert
from .runtime import Runtime
from .sampling import Sampler, SampleParams
from .tokenizer import Tokenizer, train_tokenizer


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions' line breaks; appends real defaults (not None/False) to option help that does
    not already state its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) \
                and "%(default)" not in text and "(default" not in text:
            text += " (default: %(default)s)"
        return text


# ---- tokenizer train ----------------------------------------------------------------------------

class TokenizerTrain:
    HELP = "train a SentencePiece BPE tokenizer and write the runtime's tok{N}.bin beside it"
    DESCRIPTION = """\
Train a SentencePiece BPE tokenizer (byte fallback, digits split, identity normalization so the
C tokenizer reproduces it exactly, the chat tokens as user-defined symbols) on the given files.
Inputs are read like `tinyllm data prepare` reads them (plain text, .jsonl/.json, .gz/.xz);
train it on the same mix as the model."""

    @staticmethod
    def add_arguments(p):
        p.add_argument("--input", action="append", required=True, metavar="FILE[:WEIGHT]",
                       help="text/JSONL/JSON file, optionally .gz/.xz, with an optional sampling weight; repeat "
                            "for several. Weights, split and seed work as in `tinyllm data prepare`, so the "
                            "same --input list trains the tokenizer on the model's mix, without its val documents")
        p.add_argument("--val-fraction", type=float, default=0.01, help="as in `data prepare`")
        p.add_argument("--seed", type=int, default=1234, help="as in `data prepare`")
        p.add_argument("--vocab-size", type=int, default=5000, help="number of pieces")
        p.add_argument("--out", required=True, metavar="DIR", help="directory for tok.model and tok{N}.bin")
        p.add_argument("--character-coverage", type=float, default=0.995,
                       help="fraction of characters covered by pieces; the rest fall back to bytes")
        _add_reader_arguments(p)

    @staticmethod
    def run(args) -> int:
        sources = [parse_source(s) for s in args.input]
        for src in sources:
            if not os.path.isfile(src.path):
                raise TinyLLMError(f"input file not found ({src.path})")
        texts = (text for _, text in planned_texts(sources, "train", val_fraction=args.val_fraction, seed=args.seed,
                                                   **_reader_kwargs(args)))
        path = train_tokenizer(texts, args.vocab_size, args.out, character_coverage=args.character_coverage)
        print(f"wrote {path} and {os.path.join(args.out, f'tok{args.vocab_size}.bin')}", file=sys.stderr)
        return 0


def _add_reader_arguments(p):
    p.add_argument("--field", default="text", help="JSON field that holds the document text")
    p.add_argument("--doc-sep", choices=["blank", "line", "file"], default="blank",
                   help="plain text only: documents are separated by blank lines, are single lines, "
                        "or are whole files")
    p.add_argument("--drop-field-values", action="append", metavar="FIELD=V1,V2",
                   help="skip JSON records whose FIELD is one of the values, e.g. book=肉蒲团,灯草和尚; repeatable")
    p.add_argument("--skip-invalid-utf8", action="store_true",
                   help="drop invalid UTF-8 bytes and report how many (default: stop with the file and byte offset)")
    p.add_argument("--keep-repeated-openings", action="store_true",
                   help="keep a doubled opening word as written (default: '从前从前，有…' is read as '从前，有…', "
                        "which otherwise teaches the model to echo such a prompt; '很久很久以前' and repetitions "
                        "that go on are never changed)")


def _reader_kwargs(args) -> dict:
    return {"field": args.field, "doc_sep": args.doc_sep, "drop": parse_drop_filters(args.drop_field_values),
            "skip_invalid_utf8": args.skip_invalid_utf8, "collapse_openings": not args.keep_repeated_openings}


# ---- data prepare -------------------------------------------------------------------------------

class DataPrepare:
    HELP = "tokenize text into train/val token shards for pretraining"
    DESCRIPTION = """\
Tokenize documents into OUT/train_NNN.bin and OUT/val_NNN.bin (uint16 when the vocab has at most
65535 pieces, else uint32) plus OUT/meta.json (vocab, dtype, token counts, sources, weights,
tokenizer path and sha256). Every document is stored as BOS + tokens + EOS. The val documents are
also kept as text in OUT/val_texts.jsonl ({"source", "text"} per line) for `tinyllm eval --text`.

Inputs: plain text (documents split per --doc-sep), .jsonl (one JSON object per line) or .json
(a list of objects), each optionally .gz/.xz/.bz2. The text is the --field of each record.

Weights (--input FILE:W): each train document of FILE is written floor(W) times, plus once more
with probability W - floor(W) (W=2.5: every document 2 or 3 times; W=0.3: 30% of them), so a
small set can be weighted up against a large one. Val documents are written at most once (with
probability min(W, 1)), so val measures the same mix without repeats.

Split: each document goes to val with probability --val-fraction, from a generator seeded by
--seed and the input's position; the same inputs and seed give the same split. If no document
lands in val, the last train document moves there, so small corpora still get a val split.

OUT is built under a temporary name and renamed when complete, so a crash never leaves a
directory that looks finished. An existing OUT is only replaced with --force."""

    @staticmethod
    def add_arguments(p):
        p.add_argument("--input", action="append", required=True, metavar="FILE[:WEIGHT]",
                       help="input file with an optional sampling weight (default 1); repeat for several")
        p.add_argument("--tokenizer", required=True, metavar="MODEL", help="SentencePiece .model to encode with")
        p.add_argument("--out", required=True, metavar="DIR", help="output directory for shards and meta.json")
        _add_reader_arguments(p)
        p.add_argument("--val-fraction", type=float, default=0.01, help="probability that a document goes to val")
        p.add_argument("--seed", type=int, default=1234, help="seed for the split and fractional weights")
        p.add_argument("--workers", type=int, default=0, help="tokenizer processes (0: one per available core)")
        p.add_argument("--shard-tokens", type=int, default=50_000_000, help="maximum tokens per shard file")
        p.add_argument("--force", action="store_true", help="replace OUT if it exists")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    @staticmethod
    def run(args) -> int:
        meta = prepare([parse_source(s) for s in args.input], args.tokenizer, args.out,
                       val_fraction=args.val_fraction, seed=args.seed, workers=args.workers or None,
                       shard_tokens=args.shard_tokens, force=args.force, progress=not args.no_progress,
                       **_reader_kwargs(args))
        for src in meta["sources"]:
            extra = f", {src['invalid_utf8_bytes']} invalid UTF-8 bytes dropped" if src["invalid_utf8_bytes"] else ""
            filtered = f", {src['documents_filtered']} filtered" if src["documents_filtered"] else ""
            if src["openings_collapsed"]:
                n = src["openings_collapsed"]
                filtered += f", {n} doubled opening{'s' if n > 1 else ''} said once"
            print(f"{src['path']} (weight {src['weight']:g}): {src['documents_read']} documents read{filtered}, "
                  f"{src['documents_train']} train / {src['documents_val']} val written, "
                  f"{src['tokens_train']:,} / {src['tokens_val']:,} tokens{extra}", file=sys.stderr)
        print(f"wrote {meta['splits']['train']['tokens']:,} train and {meta['splits']['val']['tokens']:,} val tokens "
              f"({meta['dtype']}) to {os.path.abspath(args.out)}", file=sys.stderr)
        return 0


# ---- export --------------------------------------------------------------------------------------

class Export:
    HELP = "export a checkpoint to another file format and verify it against the C runtime"
    DESCRIPTION = """\
Write the checkpoint's model in another format (the same writers as `tinyllm convert`), then run a
few tokens through the C runtime and compare its logits with torch's; a mismatch is an error (a
silently broken export gives gibberish). Formats: llama2c (--version 0: legacy fp32, 1: fp32 with a
256-byte header, 2: Q8_0; the runtime's tok<vocab>.bin is written beside it); gguf (--type
f32|f16|q8_0|q4_0, tokenizer and chat template embedded; quantized types report bits per weight and
the logit drift against fp32); hf (a transformers LlamaForCausalLM directory, not checked)."""

    @staticmethod
    def add_arguments(p):
        p.add_argument("--checkpoint", required=True, metavar="CKPT", help=CHECKPOINT_HELP)
        p.add_argument("--format", required=True, choices=["llama2c", "gguf", "hf"], help="output format")
        p.add_argument("--out", required=True, metavar="FILE", help="output file")
        p.add_argument("--version", type=int, choices=[0, 1, 2], default=1, help="llama2c format version")
        p.add_argument("--tokenizer", metavar="MODEL",
                       help="SentencePiece .model, used by the check and embedded by gguf and hf (default: the one "
                            "the training data was prepared with; gguf and hf refuse to go without one)")
        p.add_argument("--no-tokenizer", action="store_true",
                       help="write the weights without a tokenizer (llama.cpp and transformers cannot use them alone)")
        p.add_argument("--type", choices=["f32", "f16", "q8_0", "q4_0"], default="f32",
                       help="gguf tensor type of the weight matrices (norms stay f32)")

    @staticmethod
    def run(args) -> int:
        args.checkpoint = pick_checkpoint(args.checkpoint)
        info = convert(args.checkpoint, args.out, args.format, type=args.type, tokenizer=args.tokenizer,
                       version=args.version, allow_no_tokenizer=args.no_tokenizer)
        _report_tokenizer(info)
        if args.format == "hf":
            files = ", ".join(sorted(p.name for p in Path(args.out).iterdir()))
            print(f"wrote {args.out} (hf: {files}); not checked against the C runtime. Load it with "
                  f"transformers.AutoModelForCausalLM.from_pretrained({str(args.out)!r})"
                  + (" and AutoTokenizer.from_pretrained(the same)" if info["tokenizer"] else ""), file=sys.stderr)
            return 0
        from .formats.checkpoint import load_model  # torch: the training extras
        from .formats.verify import check_export
        model, _ = load_model(args.checkpoint)
        check = check_export(args.out, model, tokenizer_path=info.get("tokenizer_path"))
        print(f"wrote {args.out} ({args.format}{_quantization_note(info)}); the C runtime's logits match torch's "
              f"(max relative difference {check['max_rel_diff']:.2g}; max logit drift vs fp32 "
              f"{check['max_logit_drift']:.4g})", file=sys.stderr)
        return 0


# ---- convert -------------------------------------------------------------------------------------

class Convert:
    HELP = "convert a model between llama2.c .bin, GGUF, Hugging Face directories and checkpoints"
    DESCRIPTION = """\
Read IN (format told by content) and write OUT in the format its name implies (.bin llama2c, .gguf,
.pt checkpoint, anything else a Hugging Face directory) or the one --format names. The tokenizer
goes into a GGUF or Hugging Face OUT, and beside a .bin OUT as tok<vocab>.bin; it is found as
--tokenizer describes, and a GGUF or Hugging Face OUT without one is refused."""

    @staticmethod
    def add_arguments(p):
        p.add_argument("input", metavar="IN", help="model file or Hugging Face directory")
        p.add_argument("output", metavar="OUT", help="file or directory to write")
        p.add_argument("--format", choices=["llama2c", "gguf", "hf", "checkpoint"], default=None,
                       help="output format (default: from OUT's name)")
        p.add_argument("--type", choices=["f32", "f16", "q8_0", "q4_0"], default="f32", help="gguf tensor type")
        p.add_argument("--version", type=int, choices=[0, 1, 2], default=1, help="llama2c format version")
        p.add_argument("--tokenizer", metavar="FILE",
                       help="SentencePiece .model (or tok.bin for GGUF/.bin) to embed or write beside OUT (default: "
                            "the input's own, a checkpoint's training tokenizer, else tok.model, tok<vocab>.model, "
                            "tok<vocab>.bin or tokenizer.bin beside IN; a GGUF or Hugging Face OUT without one is "
                            "refused)")
        p.add_argument("--no-tokenizer", action="store_true",
                       help="write the weights without a tokenizer (llama.cpp and transformers cannot use them alone)")

    @staticmethod
    def run(args) -> int:
        info = convert(args.input, args.output, args.format, type=args.type, tokenizer=args.tokenizer,
                       version=args.version, allow_no_tokenizer=args.no_tokenizer)
        print(f"wrote {args.output} ({info['format']}{_quantization_note(info)})", file=sys.stderr)
        _report_tokenizer(info)
        return 0


def _quantization_note(info: dict) -> str:
    if "bits_per_weight" not in info or info["format"] != "gguf":
        return ""
    note = f", bits per weight {info['bits_per_weight']:.4g}"
    if "max_logit_drift" in info:
        drift = info["max_logit_drift"]
        note += f", max logit drift {drift:.4g}" if drift is not None else \
            ", logit drift not measured (needs torch: pip install -e '.[train]')"
    return note


def _report_tokenizer(info: dict):
    """Say which tokenizer went into (or beside) the output, and any file written besides OUT."""
    if info.get("tokenizer_file"):
        print(f"wrote {info['tokenizer_file']} (the runtime's tokenizer, from {info['tokenizer']})", file=sys.stderr)
    elif info["format"] in ("gguf", "hf"):
        origin = info["tokenizer"]
        print(f"tokenizer: {origin}" if origin else "tokenizer: none (--no-tokenizer)", file=sys.stderr)
    elif info["format"] == "llama2c":
        print("no tokenizer written beside it: give ./run one with -z", file=sys.stderr)


# ---- which checkpoint --------------------------------------------------------------------------------

CHECKPOINT_HELP = ("checkpoint written by training, or its out-dir: then best.pt (the best val loss) when "
                   "there is one, else ckpt.pt (the last step)")


def pick_checkpoint(path: str) -> str:
    """The checkpoint file a --checkpoint argument means, said on stderr when there is a choice: a
    training out-dir means its best.pt (else ckpt.pt). (load_checkpoint refuses a runtime model file.)"""
    from .train.loop import BEST_NAME, CHECKPOINT_NAME  # torch: the training extras
    if os.path.isdir(path):
        best, last = os.path.join(path, BEST_NAME), os.path.join(path, CHECKPOINT_NAME)
        if not os.path.isfile(best):
            if os.path.isfile(last):
                print(f"checkpoint: {last} (the last step; no {BEST_NAME} in {path})", file=sys.stderr)
            return last
        print(f"checkpoint: {best} ({_describe_checkpoint(best)[1]}; {last} holds the last step)", file=sys.stderr)
        return best
    best = os.path.join(os.path.dirname(path), BEST_NAME)
    if os.path.basename(path) == CHECKPOINT_NAME and os.path.isfile(best):
        (last_step, last_text), (best_step, best_text) = _describe_checkpoint(path), _describe_checkpoint(best)
        if best_step != last_step:
            print(f"checkpoint: {path} as given ({last_text}); {best} has the best val loss ({best_text})",
                  file=sys.stderr)
    return path


def _describe_checkpoint(path: str) -> tuple[int, str]:
    """(step, "step N, val loss X") of a checkpoint."""
    from .formats.checkpoint import load_checkpoint  # torch: the training extras
    ckpt = load_checkpoint(path)
    val, val_step = ckpt["extra"].get("val_loss"), ckpt["extra"].get("val_step")
    text = f"step {ckpt['step']}"
    if val is not None:
        text += f", val loss {val:.4f}" + (f" (of step {val_step})" if val_step not in (None, ckpt["step"]) else "")
    return ckpt["step"], text


# ---- sample --------------------------------------------------------------------------------------

class Sample:
    HELP = "generate text from a checkpoint with torch (a quick look, not the fast path)"
    DESCRIPTION = ("Generate from a checkpoint with the torch reference model and tinyllm.sampling (the C sampler's "
                   "algorithm and RNG). The C runtime (`run`) is the fast path.")

    @staticmethod
    def add_arguments(p):
        p.add_argument("--checkpoint", required=True, metavar="CKPT", help=CHECKPOINT_HELP)
        p.add_argument("--tokenizer", metavar="MODEL",
                       help="SentencePiece .model (default: the one the training data was prepared with)")
        p.add_argument("--prompt", default="", help="text to continue (empty: start from BOS)")
        p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most")
        p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
        p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens (0: all)")
        p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling (1: off)")
        p.add_argument("--num-samples", type=int, default=1, help="how many samples to print")
        p.add_argument("--seed", type=int, default=0,
                       help="sampling seed; sample i uses seed + i (the C runtime gives the same tokens)")

    @staticmethod
    def run(args) -> int:
        from .formats.checkpoint import load_checkpoint, load_model, training_tokenizer  # torch: the training extras
        args.checkpoint = pick_checkpoint(args.checkpoint)
        tok_path = args.tokenizer or training_tokenizer(load_checkpoint(args.checkpoint), args.checkpoint)
        tok = Tokenizer(tok_path)
        model, cfg = load_model(args.checkpoint)
        if tok.vocab_size != cfg.vocab_size:
            raise TinyLLMError(f"tokenizer has {tok.vocab_size} pieces but the model {cfg.vocab_size} ({tok_path})")
        prompt = tok.encode(args.prompt, bos=True)
        for i in range(args.num_samples):
            params = SampleParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                  seed=args.seed + i)
            out = model.generate(prompt, args.max_new_tokens, eos_id=tok.eos_id,
                                 sampler=Sampler(cfg.vocab_size, params))
            if out and out[-1] == tok.eos_id:
                out = out[:-1]
            print(args.prompt + tok.decode(out))
            if i + 1 < args.num_samples:
                print("-" * 40)
        return 0


# ---- serve ---------------------------------------------------------------------------------------

class Serve:
    HELP = "serve a model over HTTP: OpenAI-compatible API and a web chat page"
    DESCRIPTION = """\
Serve MODEL (llama2.c .bin or GGUF) with the C runtime over an OpenAI-compatible HTTP API:
/v1/completions, /v1/chat/completions (streamed with "stream": true), /v1/models, /health,
and a web chat page at / that works offline. Concurrent requests each get their own KV cache.

    tinyllm serve models/chat15M.bin
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "你好"}]}'

The `openai` client works with base_url="http://127.0.0.1:8000/v1" and any api_key."""

    @staticmethod
    def add_arguments(p):
        p.add_argument("model", help="model file: llama2.c .bin or GGUF")
        p.add_argument("--tokenizer", default=None,
                       help="tok{N}.bin (default: the GGUF's own tokenizer, else tok{vocab}.bin beside the model)")
        p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
        p.add_argument("--port", type=int, default=8000, help="TCP port")
        p.add_argument("--model-id", default=None, help="the model's name in the API (default: the file's stem)")
        p.add_argument("--threads", type=int, default=None, help="threads for the matmuls (default: physical cores)")
        p.add_argument("--max-tokens", type=int, default=0,
                       help="the most tokens a request may ask for (0: the model's context length)")
        p.add_argument("--max-body-kb", type=int, default=1024, help="largest request body accepted, in KiB")
        p.add_argument("--max-concurrent", type=int, default=64,
                       help="generations computed at once; further requests wait their turn")
        p.add_argument("--max-connections", type=int, default=512,
                       help="open connections at most (kept under the fd limit); idle ones make room, else 503")
        p.add_argument("--header-timeout", type=float, default=10.0,
                       help="seconds a connection may take to send a request's head")
        p.add_argument("--body-timeout", type=float, default=30.0, help="seconds a request may take to send its body")
        p.add_argument("--drain-seconds", type=float, default=10.0,
                       help="on SIGTERM/Ctrl-C, how long running generations may finish before their streams end "
                            "with an error event")
        p.add_argument("--api-docs", action="store_true", help="serve /docs, /redoc and /openapi.json")
        p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                       help="uvicorn's log level")

    @staticmethod
    def run(args) -> int:
        from .server import Limits, serve  # fastapi and uvicorn: the serve extras
        if args.max_concurrent < 1 or args.max_body_kb < 1 or args.max_tokens < 0 or args.max_connections < 1 \
                or not args.header_timeout > 0 or not args.body_timeout > 0 or not args.drain_seconds >= 0:
            raise TinyLLMError("--max-concurrent, --max-body-kb and --max-connections must be >= 1, --max-tokens "
                               ">= 0, the timeouts > 0")
        runtime = Runtime(args.model, args.tokenizer, threads=args.threads)
        model_id = args.model_id or os.path.splitext(os.path.basename(args.model))[0]
        limits = Limits(max_body_bytes=args.max_body_kb * 1024, max_tokens=args.max_tokens,
                        max_concurrent=args.max_concurrent, max_connections=args.max_connections,
                        header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                        drain_seconds=args.drain_seconds)
        serve(runtime, model_id, limits, args.host, args.port, args.log_level, args.api_docs)
        return 0


# ---- the command ---------------------------------------------------------------------------------

# name -> stage: a module path (imported lazily, so `tinyllm --help` does not import torch) or an object
STAGES = {
    "pretrain": "tinyllm.train.pretrain",
    "sft": "tinyllm.train.sft",
    "dpo": "tinyllm.train.dpo",
    "eval": "tinyllm.eval",
    "export": Export,
    "convert": Convert,
    "sample": Sample,
    "serve": Serve,
}
GROUPS = {
    "tokenizer": ("SentencePiece tokenizer", {"train": TokenizerTrain}),
    "data": ("training data", {"prepare": DataPrepare}),
}


def _stage(spec):
    return importlib.import_module(spec) if isinstance(spec, str) else spec


def _add_stage(subparsers, name, spec, command=None):
    stage = _stage(spec)
    p = subparsers.add_parser(name, help=stage.HELP, description=getattr(stage, "DESCRIPTION", stage.HELP),
                              formatter_class=_Formatter)
    stage.add_arguments(p)
    p.set_defaults(_run=stage.run, _config_keys=getattr(stage, "CONFIG_KEYS", False), _command=command or name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinyllm", description=__doc__.split("\n\n")[0],
                                     formatter_class=_Formatter)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for group, (help_text, stages) in GROUPS.items():
        gp = sub.add_parser(group, help=f"{help_text}: {', '.join(stages)}", formatter_class=_Formatter)
        gsub = gp.add_subparsers(title="commands", metavar="COMMAND", required=True)
        for name, spec in stages.items():
            _add_stage(gsub, name, spec, f"{group} {name}")
    for name, spec in STAGES.items():
        _add_stage(sub, name, spec)
    return parser


# optional packages -> the extra that brings them ("" for the base install)
EXTRAS = {"torch": "train", "matplotlib": "train", "fastapi": "serve", "uvicorn": "serve", "gguf": ""}


def missing_package_error(command: str, package: str) -> str:
    """One line naming the package a command needs and the install line, from a clone and from a wheel."""
    extra = EXTRAS[package]
    if not extra:
        return (f"`tinyllm {command}` needs the {package} package, part of the base install: "
                f"pip install -e . (in a clone) or pip install tinyllm (from a wheel)")
    return (f"`tinyllm {command}` needs {package}, from the {extra} extras: pip install -e '.[{extra}]' "
            f"(in a clone) or pip install 'tinyllm[{extra}]' (from a wheel)")


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings as one `warning: ...` line, without the source line Python prints by default."""
    print(f"warning: {message}", file=file or sys.stderr)


def main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    args._argv = argv  # for the resume command an interrupted training run prints
    if extra:
        if getattr(args, "_config_keys", False):
            print(f"error: unknown config keys or arguments {extra}; valid keys: "
                  f"{', '.join('--' + k.replace('_', '-') for k in sorted(config_fields()))}", file=sys.stderr)
            return 2
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    shown_by_python, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        return args._run(args)
    except TinyLLMError as e:
        print(f"error: {e}", file=sys.stderr)
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        print(f"error: {e.strerror} ({e.filename})", file=sys.stderr)
    except ModuleNotFoundError as e:
        package = (e.name or "").split(".")[0]
        if package not in EXTRAS:
            raise
        print(f"error: {missing_package_error(args._command, package)}", file=sys.stderr)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown_by_python
    return 1


if __name__ == "__main__":
    sys.exit(main())
