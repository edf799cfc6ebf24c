"""Tokenizers of the bundled models: byte-level BPE (as LLaDA's and Dream's are), ``tokenizer.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from formats.errors import QdllmError

SPECIAL_TOKENS = ("<|endoftext|>", "<|bos|>", "<|mask|>")  # eos/pad, bos, mask


def train_bpe(texts: Iterable[str], vocab_size: int, specials: tuple[str, ...] = SPECIAL_TOKENS):
    """A byte-level BPE (GPT-2 pre-tokenizer) with ``specials`` as the last ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(list(specials))
    return tok


def load_tokenizer(folder: str | Path):
    """The ``tokenizer.json`` of a model folder, or a clear error."""
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise QdllmError(f"{path}: not found; a model folder needs its tokenizer.json to encode text (or use --prompt-ids)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception subclasses
        raise QdllmError(f"{path}: not a valid tokenizer.json ({e})") from None
