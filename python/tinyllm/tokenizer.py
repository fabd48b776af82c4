"""SentencePiece BPE tokenizers: training on our corpora and a thin Tokenizer (the .model file itself is
read by tinyllm.formats.spmodel).

Training settings are chosen so that the C runtime (runtime/tokenizer.c, via tok.bin) can give
exactly SentencePiece's ids: identity normalization (the default nmt_nfkc rewrites full-width
Chinese punctuation, which the C side would have to reimplement), no dummy prefix, no whitespace
collapsing, byte fallback for characters outside the vocabulary.

Newlines: the trainer treats each input *line* as a sentence, so a corpus read line by line never
shows it a "\n" and every newline would later cost a byte-fallback token. We therefore read the
corpora ourselves and hand SentencePiece whole documents (newlines inside) through
sentence_iterator, cut at line ends into chunks of at most MAX_SENTENCE_BYTES. With identity
normalization "\n" is an ordinary character, so it gets its own piece and merges like "。\n".

Importing this module does not import torch.
"""
from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from .chat import SPECIAL_TOKENS
from .corpus import read_texts
from .errors import DataError, TokenizerError
from .fileio import atomic_write
from .formats.llama2c import write_tokenizer
from .formats.spmodel import user_pieces_as_control

MAX_SENTENCE_BYTES = 16384   # documents are cut at line ends into chunks of at most this many bytes


def _chunks(text: str, limit: int = MAX_SENTENCE_BYTES) -> Iterator[str]:
    """Split a document at line ends into pieces of at most limit UTF-8 bytes (keeping the newlines)."""
    if len(text.encode("utf-8")) <= limit:
        if text:
            yield text
        return
    buf, size = [], 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if buf and size + n > limit:
            yield "".join(buf)
            buf, size = [], 0
        while n > limit:  # one huge line: cut it by characters
            cut = line[: limit // 4]
            yield cut
            line = line[len(cut):]
            n = len(line.encode("utf-8"))
        buf.append(line)
        size += n
    if buf:
        yield "".join(buf)


# ---- training --------------------------------------------------------------------------------------

def train_tokenizer(inputs, vocab_size: int, out_dir, *, model_prefix: str = "tok", character_coverage: float = 0.995,
                    input_sentence_size: int = 2_000_000, num_threads: int | None = None, seed: int = 0,
                    text_field: str = "text", add_dummy_prefix: bool = False,
                    remove_extra_whitespaces: bool = False, write_bin: bool = True) -> Path:
    """Train a SentencePiece BPE model; return the .model path.

    inputs: a corpus file, a list of them (read as tinyllm.corpus.read_texts reads them: documents
    separated by blank lines in plain text, the text_field of JSON records), or an iterator of texts
    (pass iter(list_of_texts)). `tinyllm tokenizer train` passes the documents of the model's data mix.

    Also writes tok{vocab_size}.bin beside it for the C runtime (unless write_bin is False).
    """

    if vocab_size < 3 + len(SPECIAL_TOKENS) + 256:
        raise TokenizerError(f"vocab_size {vocab_size} is too small: byte fallback alone needs "
                             f"{3 + len(SPECIAL_TOKENS) + 256} pieces")
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if isinstance(inputs, (list, tuple)):
        for p in inputs:
            if not isinstance(p, (str, os.PathLike)) or not Path(p).is_file():
                raise DataError(f"corpus file not found ({p})")
        texts = read_texts([str(p) for p in inputs], field=text_field)
    else:
        texts = iter(inputs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seen = {"sentences": 0, "error": None}

    def sentences():
        try:
            for text in texts:
                if not isinstance(text, str):
                    raise DataError(f"expected text (str), got {type(text).__name__}")
                for chunk in _chunks(text):
                    seen["sentences"] += 1
                    yield chunk
        except Exception as e:  # kept to re-raise as itself, not as SentencePiece's RuntimeError
            seen["error"] = e
            raise

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            character_coverage=character_coverage, input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True, num_threads=num_threads or os.cpu_count() or 1,
            byte_fallback=True, split_digits=True, normalization_rule_name="identity",
            add_dummy_prefix=add_dummy_prefix, remove_extra_whitespaces=remove_extra_whitespaces,
            allow_whitespace_only_pieces=True, user_defined_symbols=SPECIAL_TOKENS,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=MAX_SENTENCE_BYTES + 16,
            minloglevel=2)
    except Exception as e:
        if seen["error"] is not None:
            raise seen["error"] from None
        if seen["sentences"] == 0:
            raise DataError("the corpus is empty: no text to train a tokenizer on") from None
        if isinstance(e, RuntimeError):
            raise TokenizerError(_explain_trainer_error(str(e), vocab_size)) from None
        raise
    path = out_dir / f"{model_prefix}.model"
    with atomic_write(path) as f:
        f.write(model.getvalue())
    if write_bin:
        write_tokenizer(path, out_dir / f"tok{vocab_size}.bin")
    return path


def _explain_trainer_error(message: str, vocab_size: int) -> str:
    """One clear line out of SentencePiece's 'INTERNAL: src/...cc(744) [...] ...' messages."""
    text = message.split("] ", 1)[-1].strip()
    if "Vocabulary size too high" in text:
        limit = text.rsplit("<=", 1)[-1].strip(" .")
        return f"vocab_size {vocab_size} is larger than this corpus supports (at most {limit}); use more text or a smaller vocab"
    if "Vocabulary size is smaller than required_chars" in text:
        m = re.search(r"(\d+) vs (\d+)", text)
        need = f" ({m.group(2)} needed with the special pieces)" if m else ""
        return (f"vocab_size {vocab_size} cannot hold the corpus's required characters{need}; "
                "raise vocab_size or lower character_coverage")
    return f"SentencePiece training failed: {text}"


# ---- using a trained model -----------------------------------------------------------------------------

class Tokenizer:
    """A SentencePiece model: text <-> ids. Thin on purpose; the C runtime gives the same ids."""

    def __init__(self, model_path):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise TokenizerError(f"tokenizer model not found ({self.path})")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"cannot load SentencePiece model ({self.path}): {str(e).splitlines()[0]}") from None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def encode(self, text: str, bos: bool = False, eos: bool = False, special: bool = True) -> list[int]:
        """Ids of text, optionally framed by BOS/EOS. special=False: text from a user, in which user-defined
        pieces such as "<|user|>" are plain text (see user_pieces_as_control)."""
        sp = self.sp if special else self._plain_processor()
        return sp.encode(text, add_bos=bos, add_eos=eos)

    def _plain_processor(self):
        """A second SentencePieceProcessor over the model with its user-defined pieces made CONTROL."""
        if getattr(self, "_plain_sp", None) is None:
            self._plain_sp = spm.SentencePieceProcessor()
            self._plain_sp.LoadFromSerializedProto(user_pieces_as_control(self.sp.serialized_model_proto()))
        return self._plain_sp

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode(list(ids))

    def piece_id(self, piece: str) -> int:
        """Id of an exact piece (e.g. "<|user|>"), or -1."""
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else -1
