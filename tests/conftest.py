"""Shared fixtures: tiny random checkpoints and a CLI runner that returns (exit code, stdout, stderr)."""

from __future__ import annotations

import sys

import pytest

from tests.tiny import make_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    """{(family, dtype, shards): folder} for both families."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for fam in ("llada", "dream"):
        for dtype, shards in (("float32", 1), ("bfloat16", 3), ("float16", 2)):
            folder, _, _ = make_checkpoint(root / f"{fam}-{dtype}-{shards}", fam, n_shards=shards, dtype=dtype, seed=1)
            out[(fam, dtype, shards)] = folder
    return out


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run ``qdllm-export ARGS`` in-process; returns (exit code, stdout, stderr)."""
    from qdllm_export.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["qdllm-export", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return run
