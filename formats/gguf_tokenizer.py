"""A byte-level BPE ``tokenizers.Tokenizer`` to and from GGUF's ``tokenizer.ggml.*`` arrays.

llama.cpp reads ``tokenizer.ggml.model = "gpt2"`` (byte-level BPE), the pre-tokenizer name in
``tokenizer.ggml.pre``, the token strings (the byte-level unicode forms, as in ``tokenizer.json``),
token types and the merges as ``"left right"`` strings. ``tokenizer_from_gguf`` rebuilds an
equivalent ``tokenizers.Tokenizer`` from those arrays alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from formats.errors import QdllmError

# gguf TokenType
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp pre-tokenizer names for the split regexes of tokenizer.json files (byte-level BPE).
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_REGEX = {"gpt-2": _GPT2_REGEX, "qwen2": _QWEN2_REGEX, "llama-bpe": _LLAMA3_REGEX}


@dataclass
class GGUFVocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    add_bos: bool
    add_eos: bool


def detect_pre(tj: dict[str, Any]) -> str | None:
    """llama.cpp's ``tokenizer.ggml.pre`` for a tokenizer.json dict, or None if unknown."""
    pt = tj.get("pre_tokenizer") or {}
    if pt.get("type") == "ByteLevel" and pt.get("use_regex", True) and not pt.get("add_prefix_space", False):
        return "gpt-2"
    if pt.get("type") == "Sequence":
        items = pt.get("pretokenizers") or []
        splits = [p for p in items if p.get("type") == "Split"]
        bl = [p for p in items if p.get("type") == "ByteLevel"]
        if len(items) == 2 and len(splits) == 1 and len(bl) == 1 and not bl[0].get("use_regex", True):
            regex = (splits[0].get("pattern") or {}).get("Regex")
            for name, pattern in PRE_REGEX.items():
                if regex == pattern:
                    return name
    return None


def vocab_for_gguf(tok: Any, n_vocab: int, pre: str | None = None, where: str = "tokenizer") -> GGUFVocab:
    """The GGUF arrays of a byte-level BPE tokenizer, padded to ``n_vocab`` with ``[PAD{i}]`` (UNUSED)."""
    tj = json.loads(tok.to_str())
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise QdllmError(f"{where}: a {model.get('type')} tokenizer cannot be written as a GGUF 'gpt2' vocabulary (need BPE)")
    if pre is None:
        pre = detect_pre(tj)
        if pre is None:
            raise QdllmError(
                f"{where}: unknown pre-tokenizer {json.dumps(tj.get('pre_tokenizer'))[:200]}; pass tokenizer_pre= "
                f"(one of llama.cpp's names, e.g. {', '.join(PRE_REGEX)})"
            )
    vocab = tok.get_vocab(with_added_tokens=True)
    if vocab and max(vocab.values()) >= n_vocab:
        raise QdllmError(f"{where}: token id {max(vocab.values())} does not fit the model's {n_vocab} embedding rows")
    added = tok.get_added_tokens_decoder()
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(by_id[i])
            types.append((CONTROL if added[i].special else USER_DEFINED) if i in added else NORMAL)
    if len(set(tokens)) != len(tokens):
        raise QdllmError(f"{where}: duplicate token strings; llama.cpp needs every token string unique")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    plain = tok.encode("a", add_special_tokens=False).ids  # does the tokenizer add BOS / EOS itself?
    full = tok.encode("a", add_special_tokens=True).ids
    added_any = len(full) > len(plain)
    add_bos = added_any and full[:1] != plain[:1]
    add_eos = added_any and full[-1:] != plain[-1:]
    return GGUFVocab(tokens, types, merges, pre, bool(add_bos), bool(add_eos))


def tokenizer_from_gguf(tokens: list[str], types: list[int], merges: list[str], pre: str,
                        bos_id: int | None = None, add_bos: bool = False) -> Any:
    """A ``tokenizers.Tokenizer`` equivalent to the GGUF vocabulary (byte-level BPE)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise QdllmError(f"merge {m!r} is not 'left right'")
        pairs.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs))
    if pre == "gpt-2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre in PRE_REGEX:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRE_REGEX[pre]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        raise QdllmError(f"pre-tokenizer {pre!r} is not one qdllm can rebuild ({', '.join(PRE_REGEX)})")
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    if specials:
        tok.add_special_tokens(specials)
    if user:
        tok.add_tokens(user)
    if add_bos and bos_id is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos_id]} $A", pair=f"{tokens[bos_id]} $A $B", special_tokens=[(tokens[bos_id], bos_id)])
    return tok
