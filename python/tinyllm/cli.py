"""The `tinyllm` command: one subcommand per stage of the pipeline.

    tinyllm tokenizer train   raw text -> SentencePiece .model + the runtime's tok{N}.bin
    tinyllm data prepare      raw text -> token shards + meta.json
    tinyllm pretrain          shards -> checkpoint
    tinyllm sft               checkpoint + chat data -> fine-tuned checkpoint (loss on answers)
    tinyllm dpo               checkpoint + preference pairs -> DPO checkpoint (`dpo make-pairs` builds pairs)
    tinyllm rl                checkpoint + prompts + reward (rule or model) -> GRPO checkpoint
    tinyllm lora merge        LoRA checkpoint (sft/dpo/pretrain --lora-rank) + its base -> plain checkpoint
    tinyllm lora export       LoRA checkpoint -> GGUF LoRA adapter for the base's GGUF (llama.cpp, run -a)
    tinyllm reward train      checkpoint + preference pairs -> reward model (`reward score` scores JSONL)
    tinyllm export            checkpoint -> llama2.c .bin, GGUF or HF (verified against the C runtime)
    tinyllm convert           any model file -> any other format (.bin, GGUF, HF, checkpoint)
    tinyllm sample            checkpoint -> text (torch, for a quick look)
    tinyllm eval              perplexity, bits/char, C-Eval accuracy, generations (torch or C runtime)
    tinyllm serve             model -> OpenAI-compatible HTTP API and web chat page (C runtime)

Every subcommand is a class here with HELP, optionally DESCRIPTION, add_arguments(parser) and run(args)
-> exit code; add it to STAGES (or to a group in GROUPS, or under a stage in SUBSTAGES) and it becomes
a subcommand. This module is the top layer: nothing imports it, and run() calls the library.
Errors the user can fix print `error: <what> (<file>)` and exit 1, without a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from . import eval as eval_module
from .config import add_config_arguments, config_fields, overrides_from_args
from .corpus import parse_drop_filters, parse_source, planned_texts, read_texts
from .data import prepare
from .errors import InvalidArgumentError, TinyLLMError
from .eval import (CHANCE, answer_eval, generations, held_out_split, load_backend, multiple_choice, perplexity,
                   read_mc, read_prompts)
from .fileio import atomic_write
from .formats.convert import convert
from .runtime import Runtime
from .sampling import Sampler, SampleParams
from .tokenizer import Tokenizer, train_tokenizer
from .train.pairs import make_pairs
from .train.sft_data import SHORT_ANSWER_CHARS, add_data_arguments, load_conversations


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
    p.add_argument("--keep-t2s-zhe", action="store_true",
                   help="keep 著 as written (default: where OpenCC's t2s left 著 for the particle 着, as in 随著时间 or "
                        "看著他, it is read as 着; 显著, 著名, 著作 and the like are never changed)")


def _reader_kwargs(args) -> dict:
    return {"field": args.field, "doc_sep": args.doc_sep, "drop": parse_drop_filters(args.drop_field_values),
            "skip_invalid_utf8": args.skip_invalid_utf8, "collapse_openings": not args.keep_repeated_openings,
            "fix_zhe": not args.keep_t2s_zhe}


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
            if src["zhe_fixed"]:
                filtered += f", {src['zhe_fixed']} 著 read as the particle 着"
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
the logit drift against fp32); hf (a transformers LlamaForCausalLM directory, not checked). A LoRA
checkpoint is written merged into its base; `tinyllm lora export` writes its adapters alone."""

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
        from .formats.checkpoint import load_model  # torch: the training extras
        from .formats.verify import check_export
        args.checkpoint = pick_checkpoint(args.checkpoint)
        model, _ = load_model(args.checkpoint)  # first: a runtime model given as --checkpoint is refused here
        info = convert(args.checkpoint, args.out, args.format, type=args.type, tokenizer=args.tokenizer,
                       version=args.version, allow_no_tokenizer=args.no_tokenizer)
        _report_tokenizer(info)
        if args.format == "hf":
            files = ", ".join(sorted(p.name for p in Path(args.out).iterdir()))
            print(f"wrote {args.out} (hf: {files}); not checked against the C runtime. Load it with "
                  f"transformers.AutoModelForCausalLM.from_pretrained({str(args.out)!r})"
                  + (" and AutoTokenizer.from_pretrained(the same)" if info["tokenizer"] else ""), file=sys.stderr)
            return 0
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


# ---- training stages -----------------------------------------------------------------------------
# They need torch (the training extras): their modules are imported when the command runs, so that
# `tinyllm --help` and the commands of a runtime-only install never load it.

RESUMED = "with --resume: the run's"


def _add_lora_arguments(parser, base: str, merged_by: str = "`tinyllm export`"):
    """--lora-rank/--lora-alpha/--lora-targets (tinyllm.lora), saved in the run's checkpoints."""
    group = parser.add_argument_group(f"LoRA: train low-rank adapters of the projections on the frozen {base}")
    group.add_argument("--lora-rank", type=int, metavar="R",
                       help=f"train rank-R adapters instead of all weights; checkpoints then hold only the adapters "
                            f"and name their base (path and weights' sha256); {merged_by} merges them (default: "
                            f"off; {RESUMED})")
    group.add_argument("--lora-alpha", type=float, metavar="A",
                       help=f"the adapters' update is scaled by A / R (default: 2R; {RESUMED})")
    group.add_argument("--lora-targets", metavar="LIST",
                       help=f"projections to adapt in every layer: attn (wq,wk,wv,wo), ffn (w1,w2,w3), all, or a "
                            f"comma list of those names (default: all; {RESUMED})")


class Pretrain:
    CONFIG_KEYS = True  # takes --KEY VALUE for every config field
    HELP = "pretrain a model on prepared token shards (next-token prediction)"
    DESCRIPTION = """\
Pretrain a llama-architecture model on shards written by `tinyllm data prepare`.

Settings come from the dataclass defaults, then the --config TOML preset, then --key value flags
(every key below; dashes or underscores). The model's vocab_size is taken from the data's meta.json.
Writes OUT_DIR/ckpt.pt (atomic; model, optimizer, step, RNG and data position), metrics.jsonl and
loss.png. Under `torchrun --nproc_per_node N` it trains with DDP (NCCL on GPU, gloo on CPU);
batch_size is per process, so N processes with grad_accum A equal 1 process with grad_accum N*A.
"""

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("--config", metavar="TOML", help="preset file, e.g. configs/stories15M.toml")
        parser.add_argument("--resume", action="store_true",
                            help="continue from OUT_DIR/ckpt.pt: its configs, weights, optimizer, RNG and data "
                                 "position (flags may still change train settings such as --max-steps)")
        parser.add_argument("--force", action="store_true",
                            help="start from scratch even if OUT_DIR already holds a checkpoint (it is replaced)")
        parser.add_argument("--init-from", metavar="CKPT", default=None,
                            help="start from the weights (and model shape) of this checkpoint, with a fresh optimizer "
                                 "and schedule; a runtime model becomes one with `tinyllm convert model.bin model.pt`")
        parser.add_argument("--dry-run", action="store_true",
                            help="print parameters, memory estimate, tokens per step and estimated time, then exit")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")
        parser.add_argument("--stop-at-step", type=int, default=None, metavar="N",
                            help="stop with a checkpoint at step N as if out of time (the schedule still follows "
                                 "--max-steps; --resume continues)")
        _add_lora_arguments(parser, "--init-from checkpoint")
        group = parser.add_argument_group("config keys (override the preset)")
        add_config_arguments(group)

    @staticmethod
    def run(args) -> int:
        from .train.loop import finish  # torch: the training extras
        from .train.pretrain import PRETRAIN_OPTIONS, continued_from, pretrain, resolve_run
        from .train.stage import main_process, options_from_args
        start = resolve_run(args.config, overrides_from_args(args), args.resume, args.force, args.init_from)
        init_from, lora = continued_from(start, options_from_args(args, PRETRAIN_OPTIONS))
        summary = pretrain(start.model_cfg, start.train_cfg, resume=start.resume, dry_run=args.dry_run,
                           stop_at_step=args.stop_at_step, progress=not args.no_progress,
                           warn_vocab=start.given("vocab_size"), init_from=init_from, lora=lora)
        if not main_process():
            return 0
        if "dry_run" in summary:
            print(summary["dry_run"])
            return 0
        return finish("trained", summary, args._argv)



class Sft:
    CONFIG_KEYS = True
    HELP = "fine-tune a pretrained checkpoint on instructions/conversations (loss on answers only)"
    DESCRIPTION = """\
Fine-tune a pretrained checkpoint on chat data formatted with the chat template
(<|system|>/<|user|>/<|assistant|>, answers closed by </s>). The loss covers the answer tokens and
their closing </s> only. The model's shape comes from the checkpoint.

Data (--data, repeatable): JSONL or a JSON list, optionally .gz/.xz, each record one of
  alpaca    {"instruction", "input"?, "output", "system"?, "history"?}
  ShareGPT  {"conversations": [{"from": "system"|"human"|"gpt", "value"}]}
  messages  {"messages": [{"role": "system"|"user"|"assistant", "content"}]}
Malformed JSON lines, missing fields and broken conversations stop with file:line, or are skipped
with --skip-bad; empty answers are always skipped. Both are counted in the report.

Length: a conversation longer than max_seq_len keeps its leading whole turns; a first turn that
alone is too long has its answer cut (its </s> is not learned); a first prompt with no room left
for any answer token is skipped. Batches are padded (one conversation per row), never packed.

--identity rewrite (the default) replaces first-person claims of other assistants in answers
("我是ChatGPT", "我是一个由OpenAI开发的...", "作为文心一言") by "我是tinyllm，一个小型中文语言模型";
drop skips such records; keep leaves them.

Settings: SFT defaults, then --config, then --key value flags. Writes OUT_DIR/ckpt.pt,
metrics.jsonl and loss.png like pretraining. ckpt.pt keeps this command's options (--checkpoint,
--data, --tokenizer, --system, --skip-bad, --identity, --val-fraction), so `tinyllm sft --out-dir
OUT_DIR --resume` continues the run with nothing else; an option given with --resume overrides the
saved one.
"""

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("--checkpoint", metavar="CKPT", help="pretrained checkpoint to start from")
        parser.add_argument("--data", action="append", metavar="FILE",
                            help=f"SFT data file; repeatable (required unless --resume; {RESUMED})")
        add_data_arguments(parser, resumable=True)
        parser.add_argument("--val-fraction", type=float,
                            help=f"conversations held out for val loss (default: 0.02; {RESUMED})")
        parser.add_argument("--short-repeat", type=int, metavar="N",
                            help=f"train on each short QA (one question, an answer of at most "
                                 f"{SHORT_ANSWER_CHARS} characters) N times per pass; the val split is unchanged "
                                 f"(default: 1; {RESUMED})")
        parser.add_argument("--config", metavar="TOML", help="preset file with train keys")
        parser.add_argument("--resume", action="store_true",
                            help="continue from OUT_DIR/ckpt.pt with the options it was started with; options "
                                 "given here override them")
        parser.add_argument("--force", action="store_true", help="replace an existing OUT_DIR/ckpt.pt")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")
        parser.add_argument("--stop-at-step", type=int, default=None, metavar="N",
                            help="stop with a checkpoint at step N as if out of time (--resume continues)")
        _add_lora_arguments(parser, "--checkpoint")
        group = parser.add_argument_group("config keys (train keys; the model comes from the checkpoint)")
        add_config_arguments(group)

    @staticmethod
    def run(args) -> int:
        from .train.loop import finish  # torch: the training extras
        from .train.sft import SFT_OPTIONS, resolve, sft
        from .train.stage import main_process, options_from_args
        start = resolve("sft", options_from_args(args, SFT_OPTIONS), overrides_from_args(args), args.config,
                        args.resume, args.force)
        master, o = main_process(), start.options
        summary = sft(start.model_cfg, start.train_cfg, start.tokenizer, o["data"], weights=start.weights,
                      resume=start.resume, system=o["system"], skip_bad=o["skip_bad"], identity=o["identity"],
                      val_fraction=o["val_fraction"], short_repeat=o["short_repeat"], checkpoint=o["checkpoint"],
                      stop_at_step=args.stop_at_step, progress=not args.no_progress,
                      log=lambda m: print(m, file=sys.stderr) if master else None, lora=start.lora)
        if not master:
            return 0
        return finish("fine-tuned", summary, args._argv)



class Dpo:
    CONFIG_KEYS = True
    HELP = "preference-tune a checkpoint on chosen/rejected pairs (DPO); `dpo make-pairs` builds pairs"
    DESCRIPTION = """\
Train with DPO on preference pairs, starting from (and with a frozen reference of) a checkpoint,
usually the SFT model. Data (--data, repeatable; JSONL or a JSON list):
  {"prompt": "user text" | [messages...], "chosen": "...", "rejected": "...", "system"?: "..."}
  {"conversations": [{"from": "system"|"human", "value"}...], "chosen": {"from": "gpt", "value"},
   "rejected": {"from": "gpt", "value"}}           (LLaMA-Factory's dpo_zh_demo.json)
Logged per metrics line: loss, reward_accuracy (share of pairs whose chosen reward is higher),
reward_margin (mean chosen - rejected reward), chosen_reward and rejected_reward, where a reward is
beta * (log pi - log ref) of an answer. A pair longer than max_seq_len has its answers cut (the prompt
kept); one whose prompt alone fills the context is skipped. A pair with an empty chosen or rejected
answer stops the read with file:line, or is skipped and counted with --skip-bad (as `reward train`).

ckpt.pt keeps this command's options (--checkpoint, the reference; --data, --tokenizer, --system,
--skip-bad, --val-fraction, --beta), so `tinyllm dpo --out-dir OUT_DIR --resume` continues the run
with nothing else; an option given with --resume overrides the saved one.

`tinyllm dpo make-pairs` writes pairs from an SFT data set: chosen = its reference answer, rejected =
an answer sampled from our own model with the C runtime (fast), in the chat template."""

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("--checkpoint", metavar="CKPT",
                            help=f"checkpoint to start from and to use as the reference (required unless --resume; "
                                 f"{RESUMED})")
        parser.add_argument("--data", action="append", metavar="FILE",
                            help=f"preference pairs file; repeatable (required unless --resume; {RESUMED})")
        parser.add_argument("--beta", type=float,
                            help=f"DPO temperature: how far the policy may move (default: 0.1; {RESUMED})")
        parser.add_argument("--val-fraction", type=float, help=f"pairs held out for val loss (default: 0.05; {RESUMED})")
        parser.add_argument("--config", metavar="TOML", help="preset file with train keys")
        parser.add_argument("--resume", action="store_true",
                            help="continue from OUT_DIR/ckpt.pt with the options it was started with (data, beta, "
                                 "reference checkpoint, ...); options given here override them")
        parser.add_argument("--force", action="store_true", help="replace an existing OUT_DIR/ckpt.pt")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")
        parser.add_argument("--stop-at-step", type=int, default=None, metavar="N",
                            help="stop with a checkpoint at step N as if out of time (--resume continues)")
        parser.add_argument("--tokenizer", metavar="MODEL",
                            help=f"SentencePiece .model (default: the one the pretraining data was prepared with; "
                                 f"{RESUMED})")
        parser.add_argument("--system", help=f"system prompt for pairs without their own (default: none; {RESUMED})")
        parser.add_argument("--skip-bad", action="store_true", default=None,
                            help=f"skip (and count) malformed records instead of stopping (default: stop; {RESUMED})")
        _add_lora_arguments(parser, "--checkpoint (the reference is then the model with its adapters off)")
        group = parser.add_argument_group("config keys (train keys; the model comes from the checkpoint)")
        add_config_arguments(group)

    @staticmethod
    def run(args) -> int:
        from .train.dpo import DPO_DEFAULTS, DPO_OPTIONS, dpo  # torch: the training extras
        from .train.loop import finish
        from .train.sft import resolve
        from .train.stage import main_process, options_from_args
        start = resolve("dpo", options_from_args(args, DPO_OPTIONS), overrides_from_args(args), args.config,
                        args.resume, args.force, defaults=DPO_DEFAULTS, option_defaults=DPO_OPTIONS,
                        start_weights_on_resume=True)
        master, o = main_process(), start.options
        summary = dpo(start.model_cfg, start.train_cfg, start.tokenizer, o["data"], start.weights, resume=start.resume,
                      beta=o["beta"], system=o["system"], skip_bad=o["skip_bad"], val_fraction=o["val_fraction"],
                      checkpoint=o["checkpoint"], stop_at_step=args.stop_at_step, progress=not args.no_progress,
                      log=lambda m: print(m, file=sys.stderr) if master else None, lora=start.lora)
        if not master:
            return 0
        return finish("DPO", summary, args._argv)



class DpoMakePairs:
    HELP = "build pairs: reference answers vs our own model's samples"
    DESCRIPTION = """\
For each conversation of an SFT data set (same formats and options as `tinyllm sft`), the prompt is
the conversation up to its last user message, chosen is the reference answer and rejected is an
answer our model samples for that prompt with the C runtime (chat template, repetition controls on).
Pairs whose sample equals the reference or is empty are left out and counted. Writes JSONL records
{"prompt": text or messages, "chosen", "rejected"} that `tinyllm dpo --data` reads."""

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("--model", required=True, metavar="FILE", help="our SFT model as .bin or .gguf (C runtime)")
        parser.add_argument("--runtime-tokenizer", metavar="TOKBIN",
                            help="tok.bin for a .bin model (default: beside the model); a GGUF carries its own")
        parser.add_argument("--data", action="append", required=True, metavar="FILE", help="SFT data file; repeatable")
        parser.add_argument("--out", required=True, metavar="FILE", help="pairs JSONL to write")
        add_data_arguments(parser)
        parser.add_argument("--max-pairs", type=int, default=0, help="stop after this many pairs (0: all)")
        parser.add_argument("--max-new-tokens", type=int, default=256, help="longest sampled answer")
        parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
        parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling")
        parser.add_argument("--seed", type=int, default=1, help="pair i samples with seed + i")
        parser.add_argument("--threads", type=int, default=None, help="runtime threads (default: physical cores)")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    @staticmethod
    def run(args) -> int:
        conversations, report = load_conversations(args.data, system=args.system, skip_bad=args.skip_bad,
                                                   identity=args.identity)
        print(f"data: {report.summary()}", file=sys.stderr)
        runtime = Runtime(args.model, args.runtime_tokenizer, threads=args.threads)
        counts = make_pairs(runtime, conversations, args.out, max_pairs=args.max_pairs,
                            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, progress=not args.no_progress)
        print(f"wrote {counts['pairs']} pairs to {args.out} ({counts['same_as_reference']} samples equal to the "
              f"reference and {counts['empty_sample']} empty samples left out)", file=sys.stderr)
        return 0



# ---- lora merge ------------------------------------------------------------------------------------

class LoraMerge:
    HELP = "fold a LoRA checkpoint's adapters into its base: a plain checkpoint"
    DESCRIPTION = """\
A run with --lora-rank (sft, dpo, pretrain --init-from) writes checkpoints that hold only its
adapters and name their base: its path and the sha256 of its weights. This writes the plain
checkpoint of base + adapters (W + alpha/rank * B A for every adapted projection; atomic), which
sft, dpo, export, eval and sample read like any other. `tinyllm export` merges by itself when the
base is where the adapter says; --base names it when it has moved. A base whose weights or shape
are not the adapter's is refused."""

    @staticmethod
    def add_arguments(p):
        p.add_argument("--checkpoint", required=True, metavar="CKPT", help=CHECKPOINT_HELP + " (a LoRA run's)")
        p.add_argument("--base", metavar="CKPT", help="the base checkpoint (default: the path the adapter names)")
        p.add_argument("--out", required=True, metavar="FILE", help="merged checkpoint to write (.pt)")

    @staticmethod
    def run(args) -> int:
        from .formats.checkpoint import merge_adapter_checkpoint  # torch: the training extras
        args.checkpoint = pick_checkpoint(args.checkpoint)
        record = merge_adapter_checkpoint(args.checkpoint, args.out, base=args.base)
        base = args.base or record["base"]["path"]
        print(f"wrote {args.out}: the rank-{record['rank']} adapters of {args.checkpoint} ({', '.join(record['targets'])}) "
              f"merged into {base}", file=sys.stderr)
        return 0


class LoraExport:
    HELP = "write a LoRA checkpoint's adapters as a GGUF LoRA adapter (llama.cpp's format) for its base's GGUF"
    DESCRIPTION = """\
Write the adapters of a LoRA checkpoint (sft, dpo, pretrain --init-from with --lora-rank) alone, as
the GGUF LoRA adapter that stock llama.cpp (--lora FILE, --lora-scaled FILE S) and our runtime (run
-a FILE -w S, tinyllm.Runtime(adapter=), tinyllm serve --adapter) load onto a GGUF of the base:

    tinyllm export --checkpoint base.pt --format gguf --out base.gguf      (the base, any --type)
    tinyllm lora export --checkpoint out/sft-lora --out adapter.gguf
    ./run base.gguf -a adapter.gguf

The base is where the adapter says, or --base; one whose weights (sha256) or shape are not the
adapter's is refused. The file is then checked: the C runtime on an fp32 base with the adapter must
give torch's logits for the base with the adapter merged. `tinyllm export` of the same checkpoint
writes the merged model instead."""

    @staticmethod
    def add_arguments(p):
        p.add_argument("--checkpoint", required=True, metavar="CKPT", help=CHECKPOINT_HELP + " (a LoRA run's)")
        p.add_argument("--base", metavar="CKPT", help="the base checkpoint (default: the path the adapter names)")
        p.add_argument("--out", required=True, metavar="FILE", help="GGUF LoRA adapter to write (.gguf)")
        p.add_argument("--type", choices=["f32", "f16"], default="f32", help="tensor type of A and B")

    @staticmethod
    def run(args) -> int:
        from .formats.checkpoint import export_adapter  # torch: the training extras
        from .formats.verify import check_adapter_export
        args.checkpoint = pick_checkpoint(args.checkpoint)
        info = export_adapter(args.checkpoint, args.out, base=args.base, type=args.type)
        check = check_adapter_export(args.out, info["base_weights"], info["merged"], info["config"])
        record = info["record"]
        print(f"wrote {args.out}: rank-{record['rank']} adapters (alpha {record['alpha']:g}) of {info['tensors'] // 2} "
              f"matrices, {info['parameters']:,} parameters, for a GGUF of {info['base_path']}; the C runtime's logits "
              f"with it match torch's merged model (max relative difference {check['max_rel_diff']:.2g}; max logit "
              f"drift vs fp32 {check['max_logit_drift']:.4g})", file=sys.stderr)
        return 0


# ---- reward model --------------------------------------------------------------------------------

class RewardTrain:
    CONFIG_KEYS = True
    HELP = "train a reward model (a scalar head on our Transformer) on chosen/rejected pairs"
    DESCRIPTION = """\
Train a reward model on preference pairs: the starting checkpoint's Transformer (usually the SFT
model) without its next-token classifier, plus a scalar head on the final normed hidden state of the
</s> that closes prompt + answer. Loss: Bradley-Terry, -log sigmoid(r(chosen) - r(rejected)).
Data (--data, repeatable): the pair formats `tinyllm dpo` reads; a pair with an empty chosen or
rejected answer stops the read with file:line, or is skipped and counted with --skip-bad.

Logged: loss, reward_accuracy and reward_margin of the training pairs per metrics line, and at each
evaluation val_accuracy (share of held-out pairs whose chosen answer scores higher) and val_margin.
Writes OUT_DIR/ckpt.pt, best.pt, metrics.jsonl and loss.png like the other stages; ckpt.pt keeps
this command's options, so `tinyllm reward train --out-dir OUT_DIR --resume` continues the run.
The checkpoints are marked as a reward model: `tinyllm reward score` reads them, export, sample,
eval, sft and dpo refuse them. With --lora-rank the body stays frozen and only its LoRA adapters
and the head train; the checkpoints then hold those alone and name --checkpoint as their base."""

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("--checkpoint", metavar="CKPT",
                            help=f"SFT or pretrained checkpoint to start from (required unless --resume; {RESUMED})")
        parser.add_argument("--data", action="append", metavar="FILE",
                            help=f"preference pairs file; repeatable (required unless --resume; {RESUMED})")
        parser.add_argument("--val-fraction", type=float,
                            help=f"pairs held out for val loss and accuracy (default: 0.05; {RESUMED})")
        parser.add_argument("--tokenizer", metavar="MODEL",
                            help=f"SentencePiece .model (default: the one the pretraining data was prepared with; "
                                 f"{RESUMED})")
        parser.add_argument("--system", help=f"system prompt for pairs without their own (default: none; {RESUMED})")
        parser.add_argument("--skip-bad", action="store_true", default=None,
                            help=f"skip (and count) bad records instead of stopping (default: stop; {RESUMED})")
        parser.add_argument("--config", metavar="TOML", help="preset file with train keys")
        parser.add_argument("--resume", action="store_true",
                            help="continue from OUT_DIR/ckpt.pt with the options it was started with")
        parser.add_argument("--force", action="store_true", help="replace an existing OUT_DIR/ckpt.pt")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")
        parser.add_argument("--stop-at-step", type=int, default=None, metavar="N",
                            help="stop with a checkpoint at step N as if out of time (--resume continues)")
        _add_lora_arguments(parser, "--checkpoint (the reward head trains in full beside them)",
                            merged_by="`tinyllm reward score` (and rl --reward-model)")
        group = parser.add_argument_group("config keys (train keys; the model comes from the checkpoint)")
        add_config_arguments(group)

    @staticmethod
    def run(args) -> int:
        from .train.loop import finish  # torch: the training extras
        from .train.reward import REWARD_DEFAULTS, REWARD_OPTIONS, STAGE_NAME, reward_train
        from .train.sft import resolve
        from .train.stage import main_process, options_from_args
        start = resolve(STAGE_NAME, options_from_args(args, REWARD_OPTIONS), overrides_from_args(args), args.config,
                        args.resume, args.force, defaults=REWARD_DEFAULTS, option_defaults=REWARD_OPTIONS)
        master, o = main_process(), start.options
        summary = reward_train(start.model_cfg, start.train_cfg, start.tokenizer, o["data"], weights=start.weights,
                               resume=start.resume, system=o["system"], skip_bad=o["skip_bad"],
                               val_fraction=o["val_fraction"], checkpoint=o["checkpoint"],
                               stop_at_step=args.stop_at_step, progress=not args.no_progress,
                               log=lambda m: print(m, file=sys.stderr) if master else None, lora=start.lora)
        if not master:
            return 0
        return finish("trained the reward model", summary, args._argv)


class RewardScore:
    HELP = "score answers with a reward model (JSONL in, JSONL with rewards out)"
    DESCRIPTION = """\
Score every record's prompt + answer with a reward model from `tinyllm reward train`. Records
(JSONL or a JSON list): a preference pair (the formats `tinyllm dpo` reads; both sides are scored,
as chosen_reward and rejected_reward, and the pairs' accuracy and mean margin are reported),
{"prompt": text or messages, "answer": "..."}, or a conversation (messages, conversations or
alpaca) whose last assistant message is the answer (as reward). Each record is written back with
its rewards added, to --out (atomically) or stdout. Bad records stop with file:line (--skip-bad:
skipped and counted); a non-finite reward is an error and nothing is written."""

    @staticmethod
    def add_arguments(p):
        p.add_argument("--checkpoint", required=True, metavar="CKPT", help=CHECKPOINT_HELP + " (a reward model's)")
        p.add_argument("--data", action="append", required=True, metavar="FILE", help="records to score; repeatable")
        p.add_argument("--out", metavar="FILE", help="JSONL to write (default: stdout)")
        p.add_argument("--tokenizer", metavar="MODEL",
                       help="SentencePiece .model (default: the one the reward model was trained with)")
        p.add_argument("--system", help="system prompt for records without their own (default: none)")
        p.add_argument("--skip-bad", action="store_true", help="skip (and count) bad records instead of stopping")
        p.add_argument("--batch-size", type=int, default=16, help="sequences scored together")
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")

    @staticmethod
    def run(args) -> int:
        from .train.reward import load_reward_model, score_records, write_scored  # torch: the training extras
        from .train.sft import load_tokenizer
        if args.batch_size < 1:
            raise InvalidArgumentError(f"--batch-size must be at least 1, got {args.batch_size}")
        args.checkpoint = pick_checkpoint(args.checkpoint)
        model, ckpt = load_reward_model(args.checkpoint, args.device)
        tok = load_tokenizer(args.tokenizer or ckpt["extra"].get("tokenizer"), args.checkpoint,
                             (ckpt.get("train_config") or {}).get("data_dir"), model.config.vocab_size)
        scored, summary, report = score_records(model, tok, args.data, system=args.system or "",
                                                skip_bad=args.skip_bad, batch_size=args.batch_size, device=args.device)
        write_scored(scored, args.out)
        pairs = (f"; {summary['pairs']} pairs: accuracy {summary['accuracy']:.4f}, mean margin "
                 f"{summary['mean_margin']:.4f}") if summary["pairs"] else ""
        where = f" to {args.out}" if args.out else " to stdout"
        print(f"data: {report.summary()}; scored {summary['records']} records{pairs}; wrote them{where}",
              file=sys.stderr)
        return 0


# ---- rl --------------------------------------------------------------------------------------------

class Rl:
    CONFIG_KEYS = True
    HELP = "RL with GRPO: answers sampled by the C runtime, scored by a rule or a reward model"
    DESCRIPTION = """\
Reinforcement learning with GRPO, starting from (and with a frozen KL reference of) a checkpoint,
usually the SFT model. Each step: the current policy is written to a temporary llama2.c snapshot, the
C runtime samples --group-size answers to each of batch_size prompts (plain sampling at
--temperature; seeds from --seed and the step, so a run repeats), each answer gets a reward, and
its advantage is its reward's distance from its group's mean in units of the group's std. Loss: the
clipped surrogate -min(ratio A, clip(ratio) A) per answer token plus --beta times the k3 estimate
of the KL to the reference, with log-probs recomputed in torch. GRPO needs no value network (PPO's
second model to train), and group-relative advantages suit rule rewards, whose scale is arbitrary.

Rewards: --reward-fn module:function or path/to/file.py:function, called as f(prompt, answer) ->
float (prompt: the user text; answer: the sampled text, </s> not included), or --reward-model, a
checkpoint of `tinyllm reward train`. A reward function that raises or returns NaN, inf or a
non-number stops the run with one line naming the prompt (the checkpoints on disk are whole).
Prompts (--prompts, repeatable): text (one per line), a JSON list, or JSONL with "prompt".

Logged per metrics line: loss, reward_mean, reward_std (mean std within groups), kl (per answer
token), response_length (sampled tokens), clip_fraction. Writes OUT_DIR/ckpt.pt, metrics.jsonl,
loss.png and rl.png (reward and KL over steps); ckpt.pt keeps this command's options, so
`tinyllm rl --out-dir OUT_DIR --resume` continues the run."""

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("--checkpoint", metavar="CKPT",
                            help=f"checkpoint to start from and KL reference (required unless --resume; {RESUMED})")
        parser.add_argument("--prompts", action="append", dest="data", metavar="FILE",
                            help=f"prompts file; repeatable (required unless --resume; {RESUMED})")
        parser.add_argument("--reward-fn", metavar="MOD:FN",
                            help=f"rule reward: module:function or path/to/file.py:function, f(prompt, answer) -> "
                                 f"float ({RESUMED})")
        parser.add_argument("--reward-model", metavar="RM_CKPT",
                            help=f"reward model checkpoint (tinyllm reward train) instead of --reward-fn ({RESUMED})")
        parser.add_argument("--group-size", type=int,
                            help=f"answers sampled per prompt, compared with each other (default: 4; {RESUMED})")
        parser.add_argument("--max-new-tokens", type=int,
                            help=f"tokens per answer at most (default: 64; {RESUMED})")
        parser.add_argument("--beta", type=float,
                            help=f"weight of the KL penalty to the reference (default: 0.04; {RESUMED})")
        parser.add_argument("--clip", type=float,
                            help=f"the ratio's clip range 1 +- CLIP (default: 0.2; {RESUMED})")
        parser.add_argument("--temperature", type=float,
                            help=f"sampling temperature, > 0 (default: 1.0; {RESUMED})")
        parser.add_argument("--updates-per-rollout", type=int, metavar="MU",
                            help=f"optimizer steps on each step's rollouts (GRPO's mu); above 1 the ratio moves "
                                 f"from 1 and --clip bounds it (default: 1; {RESUMED})")
        parser.add_argument("--tokenizer", metavar="MODEL",
                            help=f"SentencePiece .model (default: the one the pretraining data was prepared with; "
                                 f"{RESUMED})")
        parser.add_argument("--system", help=f"system prompt of every prompt (default: none; {RESUMED})")
        parser.add_argument("--threads", type=int, default=None, help="runtime threads (default: physical cores)")
        parser.add_argument("--config", metavar="TOML", help="preset file with train keys")
        parser.add_argument("--resume", action="store_true",
                            help="continue from OUT_DIR/ckpt.pt with the options it was started with")
        parser.add_argument("--force", action="store_true", help="replace an existing OUT_DIR/ckpt.pt")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")
        parser.add_argument("--stop-at-step", type=int, default=None, metavar="N",
                            help="stop with a checkpoint at step N as if out of time (--resume continues)")
        _add_lora_arguments(parser, "--checkpoint (the reference is then the model with its adapters off)")
        group = parser.add_argument_group("config keys (train keys, batch_size counts prompts; the model comes "
                                          "from the checkpoint)")
        add_config_arguments(group)

    @staticmethod
    def run(args) -> int:
        from .train.loop import finish  # torch: the training extras
        from .train.rl import RL_DEFAULTS, RL_OPTIONS, STAGE_NAME, rl
        from .train.sft import resolve
        from .train.stage import main_process, options_from_args
        given = options_from_args(args, RL_OPTIONS)
        if given["reward_fn"] is not None and given["reward_model"] is not None:
            raise InvalidArgumentError("give --reward-fn or --reward-model, not both")
        if not args.resume and not given["data"]:
            raise InvalidArgumentError("--prompts (a prompts file) is required unless --resume")
        start = resolve(STAGE_NAME, given, overrides_from_args(args), args.config, args.resume, args.force,
                        defaults=RL_DEFAULTS, option_defaults=RL_OPTIONS, start_weights_on_resume=True)
        master, o = main_process(), start.options
        if given["reward_fn"] is not None:  # a reward given with --resume replaces the saved one, of either kind
            o["reward_model"] = None
        elif given["reward_model"] is not None:
            o["reward_fn"] = None
        summary = rl(start.model_cfg, start.train_cfg, start.tokenizer, o["data"], start.weights,
                     reward_fn=o["reward_fn"], reward_model=o["reward_model"], resume=start.resume,
                     system=o["system"], group_size=o["group_size"], max_new_tokens=o["max_new_tokens"],
                     beta=o["beta"], clip=o["clip"], temperature=o["temperature"], checkpoint=o["checkpoint"],
                     stop_at_step=args.stop_at_step, progress=not args.no_progress,
                     log=lambda m: print(m, file=sys.stderr) if master else None, lora=start.lora,
                     threads=args.threads, updates_per_rollout=o["updates_per_rollout"])
        if not master:
            return 0
        return finish("RL", summary, args._argv)


# ---- eval ------------------------------------------------------------------------------------------

class Eval:
    HELP = "evaluate a model: perplexity/bits per char, C-Eval multiple choice, generations (torch or C runtime)"
    DESCRIPTION = eval_module.__doc__.split("\n\n", 1)[0] + "\n\n" + eval_module.__doc__.split("\n\n", 2)[2]

    @staticmethod
    def add_arguments(p):
        p.add_argument("--model", required=True, metavar="FILE", help="checkpoint (.pt), llama2.c .bin or .gguf")
        p.add_argument("--backend", choices=["torch", "c"], default=None,
                       help="torch (reference) or c (the runtime; .bin/.gguf). Default: torch for .pt, else c")
        p.add_argument("--tokenizer", metavar="FILE",
                       help="SentencePiece .model for torch (default: the checkpoint's training tokenizer); "
                            "tok.bin for c on a .bin (default: beside the model)")
        p.add_argument("--text", action="append", metavar="FILE",
                       help="held-out text for perplexity (plain, .jsonl/.json, .gz/.xz; see --field); repeatable")
        p.add_argument("--field", default="text", help="JSON field holding the text")
        p.add_argument("--doc-sep", choices=["blank", "line", "file"], default="blank",
                       help="plain text: documents separated by blank lines, lines, or whole files")
        p.add_argument("--max-docs", type=int, default=0, help="evaluate at most this many documents (0: all)")
        p.add_argument("--ceval", action="append", metavar="PATH",
                       help="C-Eval- or CMMLU-format CSV file or directory; repeatable")
        p.add_argument("--max-per-subject", type=int, default=0, help="questions per subject at most (0: all)")
        p.add_argument("--template", choices=["plain", "chat"], default="plain",
                       help="multiple-choice prompt: plain text or the chat template's user turn")
        p.add_argument("--prompts", metavar="FILE", help="prompts to answer (one per line, or JSON/JSONL)")
        p.add_argument("--generations-out", default="generations.jsonl", metavar="FILE", help="where answers go")
        p.add_argument("--max-new-tokens", type=int, default=128, help="longest answer")
        p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
        p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling")
        p.add_argument("--seed", type=int, default=1, help="sampling seed")
        p.add_argument("--answers", action="append", metavar="FILE",
                       help="SFT data files, in the order `tinyllm sft --data` got them: answer ~100 questions of "
                            "their val split (see the selection rule above); repeatable")
        p.add_argument("--answers-count", type=int, default=eval_module.ANSWER_QUESTIONS, metavar="N",
                       help="questions in the answer evaluation")
        p.add_argument("--answers-val-fraction", type=float, default=eval_module.SFT_VAL_FRACTION, metavar="F",
                       help="the sft run's --val-fraction")
        p.add_argument("--answers-seed", type=int, default=eval_module.SFT_SEED, help="the sft run's --seed")
        p.add_argument("--answers-out", default="answers.jsonl", metavar="FILE",
                       help="one record per question: question, reference, greedy answer, F1, rank")
        p.add_argument("--out", metavar="FILE", help="write the results as JSON here (always printed to stdout)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    @staticmethod
    def evaluate(args) -> dict:
        """The results dict of the sections asked for."""
        backend = load_backend(args.model, args.backend, args.tokenizer)
        progress = not args.no_progress
        results = {"model": str(args.model), "backend": backend.name}
        if not (args.text or args.ceval or args.prompts or args.answers):
            raise InvalidArgumentError("nothing to evaluate: give --text, --ceval, --prompts and/or --answers")
        if args.answers and args.answers_count < 1:
            raise InvalidArgumentError(f"--answers-count must be at least 1, got {args.answers_count}")
        if args.text:
            texts = list(read_texts(args.text, field=args.field, doc_sep=args.doc_sep))
            results["perplexity"] = perplexity(backend, texts[:args.max_docs] if args.max_docs else texts, progress)
        if args.ceval:
            results["multiple_choice"] = multiple_choice(backend, read_mc(args.ceval), args.template,
                                                         args.max_per_subject, progress)
        if args.prompts:
            params = SampleParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
            gens = generations(backend, read_prompts(args.prompts), args.generations_out,
                               max_new_tokens=args.max_new_tokens, params=params, progress=progress)
            results["generations"] = {"file": args.generations_out, "prompts": len(gens)}
        if args.answers:
            train, val = held_out_split(args.answers, args.answers_val_fraction, args.answers_seed)
            results["answers"] = answer_eval(backend, train, val, args.answers_out, count=args.answers_count,
                                             max_new_tokens=args.max_new_tokens, progress=progress)
        return results

    @staticmethod
    def run(args) -> int:
        results = Eval.evaluate(args)
        text = json.dumps(results, ensure_ascii=False, indent=2)
        if args.out:
            with atomic_write(args.out, "w") as f:
                f.write(text + "\n")
        print(text)
        if "perplexity" in results:
            r = results["perplexity"]
            print(f"perplexity {r['perplexity']:.3f}, {r['bits_per_character']:.4f} bits/char over {r['characters']:,} "
                  f"characters", file=sys.stderr)
        if "multiple_choice" in results:
            o = results["multiple_choice"]["overall"]
            print(f"multiple choice: accuracy {o['accuracy']:.1%} (length-normalized {o['accuracy_norm']:.1%}) over "
                  f"{o['questions']} questions; chance {CHANCE:.0%}", file=sys.stderr)
        if "answers" in results:
            a = results["answers"]
            print(f"answers: {a['correct']:.1%} correct (char F1 >= {a['correct_f1']}), exact {a['exact']:.1%}, mean F1 "
                  f"{a['f1']:.3f} over {a['questions']} held-out questions; reference ranked first {a['rank1']:.1%} "
                  f"(chance {a['chance_rank1']:.0%}), MRR {a['mrr']:.3f} (chance {a['chance_mrr']:.3f}); val answer "
                  f"loss {a['val_answer_loss']['loss']:.3f}", file=sys.stderr)
        return 0


# ---- serve ---------------------------------------------------------------------------------------

class Serve:
    HELP = "serve a model over HTTP: OpenAI-compatible API and a web chat page"
    DESCRIPTION = """\
Serve MODEL (llama2.c .bin or GGUF) with the C runtime over an OpenAI-compatible HTTP API:
/v1/completions, /v1/chat/completions (streamed with "stream": true), /v1/models, /health,
/metrics (Prometheus), /tokenize and /detokenize (as llama-server has them), and a web chat page
at / that works offline. Concurrent requests are decoded together (continuous batching: one forward
step advances every running sequence); each has its own KV cache, and a request that starts as an
earlier one did (a system prompt, the next turn of a chat) reuses that one's cache. --adapter puts
a GGUF LoRA adapter on MODEL for every request (`tinyllm lora export` writes one from a LoRA run).

    tinyllm serve models/chat15M.bin
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "你好"}]}'

The `openai` client works with base_url="http://127.0.0.1:8000/v1" and any api_key, or the one
given to --api-key."""

    @staticmethod
    def add_arguments(p):
        p.add_argument("model", help="model file: llama2.c .bin or GGUF")
        p.add_argument("--tokenizer", default=None,
                       help="tok{N}.bin (default: the GGUF's own tokenizer, else tok{vocab}.bin beside the model)")
        p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
        p.add_argument("--port", type=int, default=8000, help="TCP port")
        p.add_argument("--model-id", default=None, help="the model's name in the API (default: the file's stem)")
        p.add_argument("--threads", type=int, default=None, help="threads for the matmuls (default: physical cores)")
        p.add_argument("--kv-cache", choices=["f32", "f16"], default="f32",
                       help="the KV caches' element type (f16: half the memory per sequence; logits move by ~3e-4)")
        p.add_argument("--adapter", metavar="FILE",
                       help="a GGUF LoRA adapter for MODEL (llama.cpp's format; `tinyllm lora export` writes one), "
                            "applied to every request; one made for another model is refused at start")
        p.add_argument("--adapter-scale", type=float, default=None, metavar="S",
                       help="the adapter's scale: each adapted matrix acts as W + S * alpha/rank * B A, as "
                            "llama.cpp's --lora-scaled (default: 1)")
        p.add_argument("--max-tokens", type=int, default=0,
                       help="the most tokens a request may ask for (0: the model's context length)")
        p.add_argument("--max-body-kb", type=int, default=1024, help="largest request body accepted, in KiB")
        p.add_argument("--parallel", "--max-concurrent", type=int, default=0, dest="parallel",
                       help="sequences decoded together in one batch (default 0: 32, fewer when their KV caches "
                            "would not fit in a quarter of the memory); more wait in the queue")
        p.add_argument("--max-queue", type=int, default=256,
                       help="sequences waiting for a slot at most; a request beyond that gets a 503")
        p.add_argument("--max-connections", type=int, default=512,
                       help="open connections at most (kept under the fd limit); idle ones make room, else 503")
        p.add_argument("--header-timeout", type=float, default=10.0,
                       help="seconds a connection may take to send a request's head")
        p.add_argument("--body-timeout", type=float, default=30.0, help="seconds a request may take to send its body")
        p.add_argument("--drain-seconds", type=float, default=10.0,
                       help="on SIGTERM/Ctrl-C, how long running generations may finish before their streams end "
                            "with an error event")
        p.add_argument("--api-docs", action="store_true", help="serve /docs, /redoc and /openapi.json")
        p.add_argument("--api-key", default=None, metavar="KEY",
                       help="require 'Authorization: Bearer KEY' on every request but / and /health (default: "
                            "$TINYLLM_API_KEY, which keeps the key out of the process list; unset: no key)")
        p.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                       help="let web pages from ORIGIN (http://host:port, or * for any) call the API; repeatable "
                            "(default: none, CORS off)")
        p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                       help="uvicorn's log level")

    @staticmethod
    def run(args) -> int:
        from .server import Access, Limits, serve  # fastapi and uvicorn: the serve extras
        access = Access(api_key=args.api_key if args.api_key is not None else os.environ.get("TINYLLM_API_KEY"),
                        cors_origins=args.cors_origin or ())
        if args.parallel < 0 or args.max_queue < 0 or args.max_body_kb < 1 or args.max_tokens < 0 \
                or args.max_connections < 1 or not args.header_timeout > 0 or not args.body_timeout > 0 \
                or not args.drain_seconds >= 0:
            raise TinyLLMError("--max-body-kb and --max-connections must be >= 1, --parallel, --max-queue and "
                               "--max-tokens >= 0, the timeouts > 0")
        if args.adapter_scale is not None and args.adapter is None:
            raise InvalidArgumentError("--adapter-scale scales an adapter: name one with --adapter")
        runtime = Runtime(args.model, args.tokenizer, threads=args.threads, kv_cache=args.kv_cache,
                          adapter=args.adapter, adapter_scale=1.0 if args.adapter_scale is None else args.adapter_scale)
        model_id = args.model_id or os.path.splitext(os.path.basename(args.model))[0]
        limits = Limits(max_body_bytes=args.max_body_kb * 1024, max_tokens=args.max_tokens,
                        parallel=args.parallel, max_queue=args.max_queue, max_connections=args.max_connections,
                        header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                        drain_seconds=args.drain_seconds)
        serve(runtime, model_id, limits, args.host, args.port, args.log_level, args.api_docs, access)
        return 0


# ---- the command ---------------------------------------------------------------------------------

# name -> stage: an object with HELP, DESCRIPTION (optional), add_arguments(parser) and run(args) -> exit code
STAGES = {
    "pretrain": Pretrain,
    "sft": Sft,
    "dpo": Dpo,
    "rl": Rl,
    "eval": Eval,
    "export": Export,
    "convert": Convert,
    "sample": Sample,
    "serve": Serve,
}
GROUPS = {
    "tokenizer": ("SentencePiece tokenizer", {"train": TokenizerTrain}),
    "data": ("training data", {"prepare": DataPrepare}),
    "lora": ("LoRA adapters", {"merge": LoraMerge, "export": LoraExport}),
    "reward": ("reward model", {"train": RewardTrain, "score": RewardScore}),
}
# stages under a stage: `tinyllm dpo make-pairs`
SUBSTAGES = {"dpo": {"make-pairs": DpoMakePairs}}


def _add_stage(subparsers, name, stage, command=None):
    p = subparsers.add_parser(name, help=stage.HELP, description=getattr(stage, "DESCRIPTION", stage.HELP),
                              formatter_class=_Formatter)
    stage.add_arguments(p)
    p.set_defaults(_run=stage.run, _config_keys=getattr(stage, "CONFIG_KEYS", False), _command=command or name)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinyllm", description=__doc__.split("\n\n")[0],
                                     formatter_class=_Formatter)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for group, (help_text, stages) in GROUPS.items():
        gp = sub.add_parser(group, help=f"{help_text}: {', '.join(stages)}", formatter_class=_Formatter)
        gsub = gp.add_subparsers(title="commands", metavar="COMMAND", required=True)
        for name, stage in stages.items():
            _add_stage(gsub, name, stage, f"{group} {name}")
    for name, stage in STAGES.items():
        p = _add_stage(sub, name, stage)
        if name in SUBSTAGES:
            p.allow_abbrev = False  # else `dpo make-pairs --out` would be read as dpo's --out-dir
            psub = p.add_subparsers(title="subcommands", metavar="COMMAND")
            for sub_name, sub_stage in SUBSTAGES[name].items():
                _add_stage(psub, sub_name, sub_stage, f"{name} {sub_name}")
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
