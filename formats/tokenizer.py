"""Tokenizers of the bundled models: byte-level BPE (as LLaDA's and Dream's are), ``tokenizer.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

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


def special_token_ids(source: Any, overrides: dict[str, int] | None = None) -> dict[str, int]:
    """bos / eos / pad / mask ids of a model (a ``TensorSource``): ``overrides`` first (keys "bos" or
    "bos_token_id"...), then the hparams, then the source's ``config.json``. Absent ids are left out;
    "mask" is always present."""
    hp = source.hparams
    cfg = getattr(source, "config", None) or {}
    from_hp = {k: v for k, v in (("bos", hp.bos_token_id), ("eos", hp.eos_token_id)) if v is not None and v >= 0}
    out: dict[str, int] = {}
    for key in ("bos", "eos", "pad"):
        for d in (overrides or {}, from_hp, cfg):
            v = d.get(key, d.get(f"{key}_token_id"))
            if isinstance(v, list):
                v = v[0] if v else None
            if v is not None:
                out[key] = int(v)
                break
    out["mask"] = int((overrides or {}).get("mask", hp.mask_token_id))
    return out
